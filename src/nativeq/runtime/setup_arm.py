"""`nativeq setup-arm`: the aarch64 TVM runtime and the aarch64 programs, for the Raspberry Pi targets.

Downloads the aarch64 `apache-tvm` and `apache-tvm-ffi` wheels of exactly the installed
versions (`pip download`), keeps only `libtvm_runtime.so`, `libtvm_ffi.so` and the tvm-ffi C++
headers in `emulate.arm_runtime_dir()` (the virtual environment's `share/nativeq/aarch64/` when
it is writable, else `~/.cache/nativeq/aarch64/`; `$NATIVEQ_ARM_RUNTIME` overrides), then
cross-compiles `nativeq_runner` and `nativeq_rpc_server` against them and builds nativeq's qemu
instruction-count plugin. Idempotent: the download is skipped when the directory already holds
the installed versions, the programs when their sources are unchanged.

Imports only the standard library and `runtime/` (runs wherever the TVM runtime does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from nativeq._fs import atomic_directory
from nativeq.errors import NativeqError
from nativeq.runtime import emulate

# (distribution, members kept from its aarch64 wheel: a prefix inside the wheel -> a subdirectory)
WHEELS = {
    "apache-tvm": {"tvm/lib/libtvm_runtime.so": "lib"},
    "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": "lib", "tvm_ffi/include/": "include"},
}
TOOLS = (emulate.CROSS_CXX, emulate.QEMU, emulate.HOST_CC)  # (tool, Debian package)


def check_tools() -> None:
    """A one-line NativeqError naming the apt packages of the missing cross compiler, qemu, C compiler."""
    missing = [(tool, package) for tool, package in TOOLS if shutil.which(tool) is None]
    if missing:
        tools = ", ".join(tool for tool, _ in missing)
        packages = " ".join(package for _, package in missing)
        raise NativeqError(f"setup-arm needs {tools}: install with `sudo apt-get install {packages}`")


def _download(workdir: Path, versions: dict[str, str]) -> list[Path]:
    pins = [f"{name}=={version}" for name, version in versions.items()]
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version", py, "-d", str(workdir), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise NativeqError(f"pip download of the aarch64 TVM wheels failed: {last}")
    return sorted(workdir.glob("*.whl"))


def _extract(wheel: Path, keep: dict[str, str], out: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            for prefix, subdir in keep.items():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                if prefix.endswith("/"):  # a directory: keep the tree below it
                    rel = Path(info.filename[len(prefix):])
                else:
                    rel = Path(Path(info.filename).name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise NativeqError(f"{wheel.name}: unsafe member {info.filename}")
                dest = out / subdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    return count


def installed_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in WHEELS}


def fetch_runtime(force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """The aarch64 TVM runtime of the installed versions in `arm_runtime_dir()` (downloaded if missing)."""
    versions = installed_versions()
    cache = emulate.arm_runtime_dir()
    stamp = cache / "versions.json"
    try:
        current = json.loads(stamp.read_text()) == versions
    except (OSError, ValueError):
        current = False
    if current and not force:
        echo(f"aarch64 TVM runtime {versions} already in {cache}")
        return cache
    pins = " ".join(f"{name}=={version}" for name, version in versions.items())
    echo(f"fetching the aarch64 wheels of {pins}")
    with tempfile.TemporaryDirectory(prefix="nativeq-arm-") as tmp, atomic_directory(cache, force=True) as out:
        wheels = _download(Path(tmp), versions)
        for name, keep in WHEELS.items():
            stem = name.replace("-", "_") + "-" + versions[name] + "-"
            match = [w for w in wheels if w.name.startswith(stem)]
            if len(match) != 1:
                raise NativeqError(f"expected one aarch64 wheel for {name}=={versions[name]}, got {[w.name for w in wheels]}")
            _extract(match[0], keep, out)
        (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
        out.chmod(0o755)
    echo(f"aarch64 TVM runtime {versions} -> {cache}")
    return cache


def setup_arm(force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Fetch the aarch64 TVM runtime and build the runner, the RPC server and the qemu plugin; returns the directory."""
    check_tools()
    cache = fetch_runtime(force=force, echo=echo)
    echo(f"aarch64 runner: {emulate.build_runner(force=force)}")
    echo(f"aarch64 RPC server: {emulate.build_rpc_server(force=force)}")
    echo(f"qemu instruction-count plugin: {emulate.build_insn_plugin(force=force)}")
    return cache
