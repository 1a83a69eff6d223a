"""Load and run compiled artifacts: what runs on the device.

`load(path)` checks the artifact (its sealed manifest, every file's sha256 against it, the
nativeq and TVM versions it was built with, whether this CPU can execute its target) and
returns a `CompiledModel`, which any number of threads may call at once (see
docs/reliability.md).

This package imports no torch and no TVM compiler: `load` uses tvm-ffi and TVM's runtime
library `libtvm_runtime.so` directly, never the `tvm` Python package, whose `__init__`
(apache-tvm 0.27.0.post1) loads the 259 MB `libtvm_compiler.so` and imports `tvm.relax`
unless `TVM_USE_RUNTIME_LIB=1` is set before the first `import tvm`. A process that also
compiles (imports `tvm` before or after `load`) shares the one `libtvm_runtime.so`.
tvm-ffi 0.1.14's `__init__` imports torch whenever torch is installed, with no switch to
turn that off; `load` imports tvm-ffi with torch hidden (see `model.import_tvm_ffi`), so
`nativeq.load` imports no torch unless the process already did.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path

from nativeq.errors import NativeqError
from nativeq.runtime.cpu import cpu_features, describe_features, machine_arch, missing_cpu_features
from nativeq.runtime.manifest import MANIFEST_NAME, TensorSpec, check_files, read_manifest
from nativeq.runtime.memory import parse_memory
from nativeq.runtime.model import CompiledModel, check_inputs, import_tvm_ffi, runtime_threads


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


_runtime_lock = threading.Lock()
_runtime_loaded = False


def _load_tvm_runtime(ffi) -> None:
    """Load `libtvm_runtime.so` (RTLD_GLOBAL: the Relax VM and the kernels' backend functions) once.

    From `TVM_LIBRARY_PATH` or the installed `tvm` package's `lib/`, found without importing `tvm`.
    """
    global _runtime_loaded
    if _runtime_loaded or "tvm" in sys.modules:  # `import tvm` loads it (and perhaps the compiler) itself
        return
    with _runtime_lock:
        if _runtime_loaded:
            return
        dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
        spec = importlib.util.find_spec("tvm")
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
        try:
            ffi.libinfo.load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=dirs)
        except (OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NativeqError(f"cannot load TVM's runtime library libtvm_runtime.so ({first}); "
                               f"install apache-tvm or set TVM_LIBRARY_PATH to its directory") from None
        _runtime_loaded = True


def _check_elf_segments(library: Path, data: bytes) -> None:
    """Refuse an ELF library whose loadable segments reach past its end (a truncated file).

    NOTE: the dynamic loader maps such segments anyway, and the first access to a page past the end of
    the file kills the process with SIGBUS. Anything else that is no valid ELF, dlopen refuses itself.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:  # ELF64: e_phoff at 32, e_phentsize and e_phnum at 54
        phoff = struct.unpack_from(order + "Q", data, 32)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", data, 54)
    else:  # ELF32: e_phoff at 28, e_phentsize and e_phnum at 42
        phoff = struct.unpack_from(order + "I", data, 28)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", data, 42)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + (56 if wide else 32) > len(data):
            raise NativeqError(f"artifact file {library} is cut short: its ELF program headers end past its "
                               f"{len(data)} bytes")
        if wide:
            kind, _, offset, _, _, size = struct.unpack_from(order + "IIQQQQ", data, at)
        else:
            kind, offset, _, _, size = struct.unpack_from(order + "IIIII", data, at)
        if kind == 1 and offset + size > len(data):  # PT_LOAD
            raise NativeqError(f"artifact file {library} is cut short: a loadable segment ends at byte "
                               f"{offset + size}, the file has {len(data)}")


def _load_library(library: Path, digest: str, ffi):
    """dlopen the artifact's library from a private copy of the bytes whose sha256 is checked here.

    NOTE: dlopen caches by path: a library rebuilt at the same path (`compile --force`) and loaded again
    in the same process would otherwise run the code of the first one. A private copy also cannot be
    swapped between the hash check and the load. It is unlinked once loaded (the mapping stays)."""
    data = library.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise NativeqError(f"artifact file {library} was modified (sha256 mismatch)")
    _check_elf_segments(library, data)
    handle, private = tempfile.mkstemp(prefix=f"nativeq-{digest[:16]}-", suffix=library.suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return ffi.load_module(private)
    finally:
        os.unlink(private)


def load(path, *, check_cpu: bool = True, threads: int | None = None, max_memory=None) -> CompiledModel:
    """Load the artifact directory `path` (written by `nativeq compile`) for this CPU.

    threads: TVM worker threads per calling thread for this model's kernels (None: TVM's default,
    `TVM_NUM_THREADS` or the number of physical cores). See `CompiledModel`.
    max_memory: bytes, or a size like "4GB", "4GiB", that one call may allocate; a call whose estimate
    (the manifest's memory formula) exceeds it is refused before it runs (None: `NATIVEQ_MAX_MEMORY`,
    else the available memory minus a margin; see `runtime/memory.py`).
    """
    if max_memory is not None:
        parse_memory(max_memory)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise NativeqError(f"threads must be a positive int or None, got {threads!r}")
    path = Path(path)
    manifest = read_manifest(path)
    check_versions(path, manifest)
    name = manifest["library"]
    check_files(path, manifest, skip=(name,))  # _load_library hashes the bytes it loads
    if check_cpu:
        check_runnable_here(path, manifest)

    ffi = import_tvm_ffi()
    _load_tvm_runtime(ffi)
    try:
        library = _load_library(path / name, manifest["files"][name], ffi)
        return CompiledModel(path, manifest, library, threads=threads, max_memory=max_memory)
    except NativeqError:
        raise
    except Exception as e:  # noqa: BLE001  (a foreign or broken .so: say which file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NativeqError(f"cannot load {path / name}: {first}") from None


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
    "runtime_threads",
]
