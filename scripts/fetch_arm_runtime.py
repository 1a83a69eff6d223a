"""Fetch the aarch64 TVM runtime (for the Raspberry Pi targets) and build the aarch64 runner.

Run by `make arm-runtime` (part of `make setup`). Downloads the aarch64 `apache-tvm` and
`apache-tvm-ffi` wheels of exactly the versions installed in this venv, keeps only
`libtvm_runtime.so`, `libtvm_ffi.so` and the tvm-ffi C++ headers in the cache directory (see
`nativeq.runtime.emulate.arm_runtime_dir`), then cross-compiles `nativeq_runner` against
them, and builds nativeq's qemu instruction-count plugin. Idempotent: does nothing when the cache already holds the matching versions.

    python scripts/fetch_arm_runtime.py [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from nativeq._fs import atomic_directory
from nativeq.errors import NativeqError
from nativeq.runtime import emulate

# (distribution, members kept from its aarch64 wheel: a prefix inside the wheel -> a cache subdir)
WHEELS = {
    "apache-tvm": {"tvm/lib/libtvm_runtime.so": "lib"},
    "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": "lib", "tvm_ffi/include/": "include"},
}


def _download(workdir: Path, versions: dict[str, str]) -> list[Path]:
    pins = [f"{name}=={version}" for name, version in versions.items()]
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_aarch64", "--python-version", py, "-d", str(workdir), *pins]
    print("fetching aarch64 wheels:", " ".join(pins))
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
                    rel = Path(info.filename).name
                if ".." in Path(rel).parts:
                    raise NativeqError(f"{wheel.name}: unsafe member {info.filename}")
                dest = out / subdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                count += 1
    return count


def fetch(force: bool = False) -> Path:
    versions = {name: metadata.version(name) for name in WHEELS}
    cache = emulate.arm_runtime_dir()
    stamp = cache / "versions.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == versions:
        print(f"aarch64 TVM runtime {versions} already in {cache}")
        return cache
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
    print(f"aarch64 TVM runtime {versions} -> {cache}")
    return cache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="download again even if the cache is current")
    args = parser.parse_args()
    try:
        fetch(force=args.force)
        runner = emulate.build_runner()
        print(f"aarch64 runner: {runner}")
        print(f"aarch64 RPC server: {emulate.build_rpc_server()}")
        plugin = emulate.build_insn_plugin()
        print(f"qemu instruction-count plugin: {plugin}")
    except NativeqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
