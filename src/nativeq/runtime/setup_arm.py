"""`nativeq setup-arm`: the aarch64 TVM runtime and the aarch64 programs, for the Raspberry Pi targets.

Downloads the aarch64 `apache-tvm` and `apache-tvm-ffi` wheels of exactly the installed
versions (`pip download`), keeps only `libtvm_runtime.so`, `libtvm_ffi.so` and the tvm-ffi C++
headers in `emulate.arm_runtime_dir()` (the virtual environment's `share/nativeq/aarch64/` when
it is writable, else `~/.cache/nativeq/aarch64/`; `$NATIVEQ_ARM_RUNTIME` overrides), then
cross-compiles `nativeq_runner` and `nativeq_rpc_server` against them and builds nativeq's qemu
instruction-count plugin. Idempotent: the download is skipped when the directory already holds
the installed versions, the programs when their sources are unchanged.

It also sets up ONNX Runtime's aarch64 build as the peer measured under the same emulated CPU
(`ort_emulated`): Debian's arm64 python3 of this machine's release, fetched with `apt-get
download` through a private apt state (arm64 package lists in a temporary directory: no root, no
`dpkg --add-architecture`, nothing installed) and unpacked with `dpkg-deb -x`, plus the aarch64
`onnxruntime` and `numpy` wheels of the installed versions unpacked into its dist-packages.
About 60 MB downloaded (9 MB package lists, 13 MB .debs, 39 MB wheels), 175 MB on disk.

Imports only the standard library and `runtime/` (runs wherever the TVM runtime does).
"""

from __future__ import annotations

import json
import os
import pwd
import re
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
from nativeq.runtime import emulate, ort_emulated

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


# ----------------------------------------------------------------------------- aarch64 python + ORT
PYTHON_WHEELS = ("onnxruntime", "numpy")  # aarch64 wheels of the installed versions
# Packages the first-alternative dependency walk never needs to follow (tools, not libraries).
_SKIP_DEBS = {"dpkg", "debconf", "install-info", "perl-base", "tar", "debianutils", "base-files"}
_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")


class _Apt:
    """apt-get / apt-cache for arm64 packages with their own state in `root` (the system's sources and keys)."""

    def __init__(self, root: Path):
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "status").write_text("")
        self.options = [
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", f"Dir::State={root / 'state'}", "-o", f"Dir::State::status={root / 'status'}",
            "-o", f"Dir::Cache={root / 'cache'}", "-o", "Debug::NoLocking=1",
            # NOTE: as root apt downloads as the `_apt` user, which cannot write a private temporary directory.
            "-o", f"APT::Sandbox::User={pwd.getpwuid(os.getuid()).pw_name}",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run([tool, *self.options, *args], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, "LC_ALL": "C"})
        # NOTE: `apt-get update` exits 0 when it cannot reach a mirror; it only warns "Failed to fetch".
        errors = [line for line in proc.stderr.splitlines() if line.startswith(("E:", "W: Failed to fetch"))]
        if proc.returncode != 0 or errors:
            last = (errors or proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise NativeqError(f"{tool} {args[0]} of the arm64 python packages failed (offline?): {last}")
        return proc.stdout


def _dependency_closure(apt: _Apt, roots: list[str]) -> list[str]:
    """The packages `roots` need (Depends, PreDepends; the first of each alternative), transitively."""
    seen, frontier = set(), list(roots)
    while frontier:
        out = apt.run("apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                      "--no-replaces", "--no-enhances", *frontier)
        seen.update(frontier)
        found, alternative = [], False
        lines = out.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^ ([ |])(?:Pre)?Depends: (\S+)", line)
            if not m:
                continue
            if not alternative:
                name = m.group(2)
                if name.startswith("<"):  # a virtual package: its first provider is on the next line
                    nxt = lines[i + 1] if i + 1 < len(lines) else ""
                    name = nxt.strip() if nxt.startswith("    ") else ""
                name = name.split(":")[0]
                if name:
                    found.append(name)
            alternative = m.group(1) == "|"
        frontier = sorted({n for n in found if n not in seen and n not in _SKIP_DEBS})
    return sorted(seen)


def _python_debs(apt: _Apt) -> tuple[str, list[str]]:
    """(python version "3.X", the arm64 packages of its interpreter, stdlib and libstdc++)."""
    out = apt.run("apt-cache", "depends", "python3-minimal")
    versions = re.findall(r"Depends: python(3\.\d+)-minimal", out)
    if not versions:
        raise NativeqError("apt-cache found no arm64 python3-minimal: is this machine's apt set up for Debian?")
    version = versions[0]
    return version, _dependency_closure(apt, [f"python{version}-minimal", f"libpython{version}-stdlib", "libstdc++6"])


def _download_wheels(workdir: Path, python: str, versions: dict[str, str]) -> list[Path]:
    pins = [f"{name}=={version}" for name, version in versions.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version", python.replace(".", ""),
           "-d", str(workdir), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise NativeqError(f"pip download of the aarch64 {' '.join(pins)} wheels for python {python} failed: {last}")
    return sorted(workdir.glob("*.whl"))


def _unpack_wheel(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            rel = Path(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise NativeqError(f"{wheel.name}: unsafe member {info.filename}")
        zf.extractall(site)
    for so in site.rglob("*.so*"):  # zipfile drops the permission bits
        so.chmod(0o755)


def python_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in PYTHON_WHEELS}


def fetch_arm_python(force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Debian's arm64 python3 + the aarch64 onnxruntime/numpy wheels in `ort_emulated.arm_python_dir()`."""
    versions = python_versions()
    root = ort_emulated.arm_python_dir()
    info = ort_emulated.installed(root)
    if info and not force and all(info.get(k) == v for k, v in versions.items()):
        echo(f"aarch64 python {info['python']} with onnxruntime {info['onnxruntime']} already in {root}")
        return root
    for tool, package in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise NativeqError(f"setting up the aarch64 python needs {tool} (Debian's {package})")
    pins = " ".join(f"{name}=={version}" for name, version in versions.items())
    echo(f"fetching Debian's arm64 python3 and the aarch64 wheels of {pins}")
    with tempfile.TemporaryDirectory(prefix="nativeq-armpy-") as tmp, atomic_directory(root, force=True) as out:
        tmp = Path(tmp)
        apt = _Apt(tmp / "apt")
        apt.run("apt-get", "update")
        python, debs = _python_debs(apt)
        (tmp / "debs").mkdir()
        apt.run("apt-get", "download", *debs, cwd=tmp / "debs")
        sysroot = out / "sysroot"
        packages = {}
        for deb in sorted((tmp / "debs").glob("*.deb")):
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(sysroot)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise NativeqError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[:200]}")
            name, version = deb.name.split("_")[:2]
            packages[name] = version.replace("%3a", ":")
        for sub in _TRIM:
            shutil.rmtree(sysroot / sub, ignore_errors=True)
        site = sysroot / "usr" / "lib" / "python3" / "dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        (tmp / "wheels").mkdir()
        for wheel in _download_wheels(tmp / "wheels", python, versions):
            _unpack_wheel(wheel, site)
        record = {"python": python, **versions, "debian": packages}
        (out / ort_emulated.STAMP).write_text(json.dumps(record, indent=2) + "\n")
        # Check it imports under qemu (and let python cache the bytecode of what it imports, once).
        check = "import numpy, onnxruntime; print(onnxruntime.__version__, numpy.__version__)"
        proc = ort_emulated.run_python(["-c", check], root=out, bytecode=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NativeqError(f"the aarch64 python cannot import onnxruntime under qemu: {last}")
        out.chmod(0o755)
    echo(f"aarch64 python {python} with onnxruntime {versions['onnxruntime']}, numpy {versions['numpy']} "
         f"({len(packages)} Debian packages) -> {root}")
    return root


def setup_arm(force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Fetch the aarch64 TVM runtime and build the runner, the RPC server and the qemu plugin; set up
    the aarch64 python with ONNX Runtime (the peer under emulation); returns the runtime directory."""
    check_tools()
    cache = fetch_runtime(force=force, echo=echo)
    echo(f"aarch64 runner: {emulate.build_runner(force=force)}")
    echo(f"aarch64 RPC server: {emulate.build_rpc_server(force=force)}")
    echo(f"qemu instruction-count plugin: {emulate.build_insn_plugin(force=force)}")
    fetch_arm_python(force=force, echo=echo)
    return cache
