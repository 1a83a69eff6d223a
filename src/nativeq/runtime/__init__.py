"""Load and run compiled artifacts: what runs on the device.

`load(path)` checks the artifact (every file's sha256 against its manifest, the nativeq and
TVM versions it was built with, whether this CPU can execute its target) and returns a
`CompiledModel`.

This package imports no torch and no TVM *compiler* API: only `tvm.runtime` (the Relax VM,
`load_module`, tensors), numpy and the standard library.

Runtime-only TVM (measured with apache-tvm 0.27.0.post1): `import tvm` always runs
`tvm/__init__.py`, which by default loads both `libtvm_runtime.so` and the 259 MB
`libtvm_compiler.so`. With the environment variable `TVM_USE_RUNTIME_LIB=1` set *before*
the first `import tvm`, only `libtvm_runtime.so` is loaded (`tvm.base._RUNTIME_ONLY` is
True, `tvm.relax` is not imported) and `nativeq.load(...)` works unchanged: the exported
library plus `tvm.runtime.load_module` and `tvm.runtime.vm.VirtualMachine` are all it
needs. nativeq does not set the variable itself, because a process that also compiles
(tests, `nativeq verify` after `nativeq compile` in one Python session) needs the compiler.
On a device, run with `TVM_USE_RUNTIME_LIB=1` (or install a runtime-only TVM build).
Note that tvm-ffi 0.1.14's `__init__` itself does `import torch` when torch is installed (a
workaround for a symbol clash), so on a development machine `import tvm` also pays torch's
import time; nativeq's runtime never imports torch, and on a device without torch nothing does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

from nativeq.errors import NativeqError
from nativeq.runtime.cpu import cpu_features, describe_features, machine_arch, missing_cpu_features
from nativeq.runtime.manifest import MANIFEST_NAME, TensorSpec, check_files, read_manifest
from nativeq.runtime.model import CompiledModel, check_inputs


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def tvm_version() -> str:
    """The installed TVM version, read from package metadata so no TVM library gets loaded."""
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:  # a source build: ask the module
        import tvm

        return tvm.__version__


def tvm_ffi_version() -> str:
    try:
        return importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError:
        import tvm_ffi

        return tvm_ffi.__version__


def check_versions(path: Path, manifest: dict) -> None:
    """Refuse an artifact built by another nativeq major.minor, TVM or tvm-ffi version."""
    import nativeq

    built = manifest.get("nativeq_version", "?")
    if _major_minor(built) != _major_minor(nativeq.__version__):
        raise NativeqError(
            f"artifact {path} was built by nativeq {built}; this is nativeq {nativeq.__version__}: recompile it"
        )
    for what, have in (("tvm_version", tvm_version()), ("tvm_ffi_version", tvm_ffi_version())):
        built = manifest.get(what, "?")
        if built != have:
            label = "TVM" if what == "tvm_version" else "tvm-ffi"
            raise NativeqError(f"artifact {path} was built with {label} {built}; this machine has {label} {have}: recompile it")


def check_runnable_here(path: Path, manifest: dict) -> None:
    """The artifact's target arch is this machine's, and this CPU has every feature it needs."""
    target = manifest["target"]
    arch = target.get("arch")
    if arch != machine_arch():
        raise NativeqError(
            f"artifact {path} is for {arch} (target {target.get('name')}) and this machine is {machine_arch()}: "
            f"use `nativeq verify {path} --onnx MODEL.onnx` (runs it emulated) or copy it to the device"
        )
    missing = missing_cpu_features(target.get("cpu_features", []))
    if missing:
        raise NativeqError(
            f"this CPU lacks {describe_features(missing)}, which artifact {path} (target {target.get('name')}) needs: "
            f"compile for a target this CPU supports (see `nativeq targets`, e.g. `host`)"
        )


def _load_library(library: Path, digest: str, runtime):
    """dlopen the artifact's library from a private copy of the bytes whose sha256 is checked here.

    NOTE: dlopen caches by path: a library rebuilt at the same path (`compile --force`) and loaded again
    in the same process would otherwise run the code of the first one. A private copy also cannot be
    swapped between the hash check and the load. It is unlinked once loaded (the mapping stays)."""
    data = library.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise NativeqError(f"artifact file {library} was modified (sha256 mismatch)")
    handle, private = tempfile.mkstemp(prefix=f"nativeq-{digest[:16]}-", suffix=library.suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return runtime.load_module(private)
    finally:
        os.unlink(private)


def load(path, *, check_cpu: bool = True) -> CompiledModel:
    """Load the artifact directory `path` (written by `nativeq compile`) for this CPU."""
    path = Path(path)
    manifest = read_manifest(path)
    check_versions(path, manifest)
    check_files(path, manifest)
    if check_cpu:
        check_runnable_here(path, manifest)

    from tvm import runtime
    from tvm.runtime.vm import VirtualMachine

    name = manifest["library"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise NativeqError(f"artifact {path}: manifest field 'library' must name a file inside the artifact, got {name!r}")
    digest = manifest["files"].get(name) if isinstance(manifest["files"], dict) else None
    if not isinstance(digest, str):
        raise NativeqError(f"artifact {path}: manifest field 'files' records no sha256 for the library {name}")
    device = runtime.cpu(0)
    try:
        library = _load_library(path / name, digest, runtime)
        vm = VirtualMachine(library, device)
    except Exception as e:  # noqa: BLE001  (a foreign or broken .so: say which file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NativeqError(f"cannot load {path / manifest['library']}: {first}") from None
    return CompiledModel(path, manifest, vm, device)


__all__ = [
    "MANIFEST_NAME",
    "CompiledModel",
    "TensorSpec",
    "check_files",
    "check_inputs",
    "check_runnable_here",
    "check_versions",
    "cpu_features",
    "load",
    "machine_arch",
    "missing_cpu_features",
    "read_manifest",
]
