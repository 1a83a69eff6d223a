"""`nativeq bundle`: pack an artifact into one .tar.gz to copy to the device, and unpack one safely.

The bundle (`NAME/` is the archive's file name without `.tar.gz`)::

    NAME/README.md         how to install the runtime on the device and run the model
    NAME/model/            the artifact: the library and manifest.json (checked by sha256 first)
    NAME/run.py            Python runner: numpy + the TVM runtime wheel, nothing else
    NAME/frontend.py, NAME/vocab.json   WAV -> log-mel features and the CTC vocabulary (speech models)
    NAME/run.sh            C++ runner wrapper: needs nothing installed      (aarch64 artifacts)
    NAME/bin/nativeq_runner, NAME/lib/libtvm_runtime.so, NAME/lib/libtvm_ffi.so   (aarch64 artifacts)

The C++ runner is the one `nativeq verify` runs under qemu; its rpath is `$ORIGIN/../lib`.
`extract_bundle` refuses members with absolute paths, `..`, links that leave the tree or
members reached through a link, devices and duplicates, before writing anything.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from nativeq._fs import atomic_directory, write_bytes_atomic
from nativeq.errors import NativeqError
from nativeq.runtime.manifest import MANIFEST_NAME, check_files, read_manifest

RUNNER_DIR = Path(__file__).with_name("runner")
FRONTEND = Path(__file__).parents[1] / "models" / "frontend_np.py"  # numpy-only log-mel front end
SUFFIXES = (".tar.gz", ".tgz")


@dataclass(frozen=True)
class BundleConfig:
    """cpp_runner: include the C++ runner and the TVM runtime libraries (aarch64 artifacts only).
    speech: include the WAV front end and nativeq's CTC vocabulary; None: when the model looks like
    a nativeq speech model (input [1, T, 80] or [1, 80, T], first output's last dim = vocabulary size).
    force: replace an existing output file."""

    cpp_runner: bool = True
    speech: bool | None = None
    force: bool = False


@dataclass(frozen=True)
class BundleResult:
    path: Path
    name: str
    members: tuple[tuple[str, int], ...]  # (archive path, size in bytes)

    def summary(self) -> str:
        total = sum(size for _, size in self.members)
        lines = [f"wrote {self.path} ({self.path.stat().st_size / 1e6:.1f} MB, {total / 1e6:.1f} MB unpacked)"]
        lines += [f"  {name}  ({size / 1024:.0f} KiB)" for name, size in self.members]
        lines.append(f"on the device: tar xzf {self.path.name} && cat {self.name}/README.md")
        return "\n".join(lines)


def _bundle_name(out: Path) -> str:
    for suffix in SUFFIXES:
        if out.name.endswith(suffix) and len(out.name) > len(suffix):
            return out.name[: -len(suffix)]
    raise NativeqError(f"bundle output {out} must end in .tar.gz or .tgz")


def _looks_like_speech_model(manifest: dict, n_mels: int, vocab_size: int) -> bool:
    first_in, first_out = manifest["inputs"][0]["shape"] or [], manifest["outputs"][0].get("shape") or []
    return len(first_in) == 3 and n_mels in first_in[1:] and bool(first_out) and first_out[-1] == vocab_size


def _run_sh(library: str, features: list[str], entry: str) -> str:
    require = f" --require {','.join(features)}" if features else ""
    return f"""#!/bin/sh
# Run the model with the C++ runner (no Python, no installed TVM needed):
#   ./run.sh OUT_DIR INPUT0.npy [INPUT1.npy ...]     inputs in the order of model/manifest.json
# Writes OUT_DIR/out0.npy, out1.npy, ... Add --repeat N before the inputs to time N runs.
# Off the device, under emulation: NATIVEQ_EMULATOR="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a76" ./run.sh ...
set -e
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || {{ echo "usage: $0 OUT_DIR INPUT0.npy [INPUT1.npy ...]" >&2; exit 2; }}
out=$1; shift
mkdir -p "$out"
exec $NATIVEQ_EMULATOR "$here/bin/nativeq_runner" "$here/model/{library}" "$out"{require} --entry {entry} "$@"
"""


def _spec_text(spec: dict) -> str:
    return f"`{spec['name']}`: {spec['dtype']}[{', '.join(str(d) for d in spec['shape'] or [])}]"


def _readme(name: str, manifest: dict, cpp: bool, speech: bool) -> str:
    target = manifest["target"]
    tvm_version, ffi_version = manifest.get("tvm_version", "?"), manifest.get("tvm_ffi_version", "?")
    first = manifest["inputs"][0]
    example_shape = tuple(d if isinstance(d, int) else 200 for d in first["shape"])
    arch = target["arch"]
    device = "Raspberry Pi OS (64-bit, bookworm or newer)" if arch == "aarch64" else f"a 64-bit Linux {arch} machine"
    features = ", ".join(target.get("cpu_features") or []) or "none"
    lines = [
        f"# {name}: nativeq model for `{target['name']}` ({arch})",
        "",
        f"Compiled from `{manifest.get('source', {}).get('file', '?')}` by nativeq {manifest.get('nativeq_version', '?')} "
        f"with TVM {tvm_version}. Target: {target['name']}, int8 `{target.get('int8')}`; the CPU must have: {features} "
        f"(check with `grep -m1 -i -E '^(features|flags)' /proc/cpuinfo`).",
        "",
        "Inputs: " + "; ".join(_spec_text(s) for s in manifest["inputs"]) + ".",
        "Outputs: " + "; ".join(_spec_text(s) for s in manifest["outputs"]) + ".",
        "",
        f"Runs on {device}. Unpack:",
        "",
        "```sh",
        f"tar xzf {name}.tar.gz && cd {name}",
        "```",
        "",
        "A test input (WAV front end: compute the same log-mel features as in training and save them with `np.save`):",
        "",
        "```sh",
        f"python3 -c \"import numpy as np; np.save('features.npy', np.random.default_rng(0).normal(size={example_shape})"
        f".astype('{first['dtype']}'))\"",
        "```",
    ]
    if speech:
        lines += [
            "",
            "Speech: `run.py speech.wav` (16 kHz mono 16-bit; `sox in.wav -r 16000 -c 1 -b 16 speech.wav` converts)",
            "computes the log-mel features with `frontend.py` (numpy only) and prints the greedy CTC transcript",
            "(vocabulary in `vocab.json`).",
        ]
    if cpp:
        lines += [
            "",
            "## C++ runner (nothing to install)",
            "",
            "`bin/nativeq_runner` is linked against the TVM runtime in `lib/` (found through its rpath).",
            "",
            "```sh",
            "./run.sh out features.npy            # writes out/out0.npy ...",
            "./run.sh out --repeat 20 features.npy   # also prints the mean time per run",
            "```",
            "",
            "If the CPU lacks a feature the model was compiled for, it says so and exits with code 3.",
        ]
    lines += [
        "",
        "## Python runner (numpy + the TVM runtime wheel)",
        "",
        "```sh",
        "sudo apt-get install -y python3-venv",
        "python3 -m venv ~/tvm-runtime",
        f"~/tvm-runtime/bin/pip install numpy apache-tvm=={tvm_version} apache-tvm-ffi=={ffi_version}",
        "~/tvm-runtime/bin/python run.py features.npy -o outputs.npz --repeat 20",
        "```",
        "",
        "`run.py` sets `TVM_USE_RUNTIME_LIB=1`, so only `libtvm_runtime.so` is loaded, never the compiler.",
        "Models with several inputs: `run.py NAME=FILE.npy ...`.",
    ]
    return "\n".join(lines) + "\n"


def _add(tar: tarfile.TarFile, arcname: str, data: bytes, executable: bool, mtime: float, members: list) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mode = 0o755 if executable else 0o644
    info.mtime = int(mtime)
    info.uname = info.gname = "nativeq"
    tar.addfile(info, io.BytesIO(data))
    members.append((arcname, len(data)))


def bundle_artifact(artifact_dir, out, cfg: BundleConfig = BundleConfig()) -> BundleResult:
    """Write the deployable bundle of the artifact directory `artifact_dir` to `out` (.tar.gz), atomically."""
    artifact_dir, out = Path(artifact_dir), Path(out)
    name = _bundle_name(out)
    if out.exists() and not cfg.force:
        raise NativeqError(f"output {out} already exists (use --force to replace it)")
    manifest = read_manifest(artifact_dir)
    check_files(artifact_dir, manifest)
    arch = manifest["target"].get("arch")
    cpp = cfg.cpp_runner and arch == "aarch64"

    files: list[tuple[str, bytes, bool]] = []  # (path inside NAME/, content, executable)
    for fname in [*manifest["files"], MANIFEST_NAME]:
        files.append((f"model/{fname}", (artifact_dir / fname).read_bytes(), False))
    files.append(("run.py", (RUNNER_DIR / "run.py").read_bytes(), True))
    from nativeq.models import text
    from nativeq.models.frontend_np import N_MELS

    speech = cfg.speech if cfg.speech is not None else _looks_like_speech_model(manifest, N_MELS, text.VOCAB_SIZE)
    if speech:
        files.append(("frontend.py", FRONTEND.read_bytes(), False))
        files.append(("vocab.json", (json.dumps(list(text.VOCAB)) + "\n").encode(), False))
    if cpp:
        from nativeq.runtime.emulate import arm_runtime_dir, build_runner

        runner = build_runner()
        files.append(("bin/nativeq_runner", runner.read_bytes(), True))
        for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
            files.append((f"lib/{lib}", (arm_runtime_dir() / "lib" / lib).read_bytes(), False))
        run_sh = _run_sh(manifest["library"], list(manifest["target"].get("cpu_features") or []),
                         manifest.get("entry", "main"))
        files.append(("run.sh", run_sh.encode(), True))
    files.append(("README.md", _readme(name, manifest, cpp, speech).encode(), False))

    buffer = io.BytesIO()
    members: list[tuple[str, int]] = []
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for rel, data, executable in files:
            _add(tar, f"{name}/{rel}", data, executable, now, members)
    write_bytes_atomic(out, buffer.getvalue())
    return BundleResult(path=out, name=name, members=tuple(members))


# ----------------------------------------------------------------------------- extraction
def _check_member(member: tarfile.TarInfo, seen: set[str], links: set[str], archive: Path) -> None:
    name = member.name
    where = f"{archive}: member {name!r}"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise NativeqError(f"{where} has an absolute path; refusing to extract")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise NativeqError(f"{where} has an empty path; refusing to extract")
    if ".." in parts:
        raise NativeqError(f"{where} contains '..'; refusing to extract")
    norm = "/".join(parts)
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise NativeqError(f"{where} lies below the link {'/'.join(parts[:i])!r}; refusing to extract")
    if norm in seen:
        raise NativeqError(f"{where} appears twice; refusing to extract")
    seen.add(norm)
    if member.issym() or member.islnk():
        link = member.linkname
        base = posixpath.dirname(norm) if member.issym() else ""  # hard links name a path from the root
        target = posixpath.normpath(posixpath.join(base, link))
        if link.startswith("/") or target == ".." or target.startswith("../"):
            raise NativeqError(f"{where} links to {link!r}, outside the bundle; refusing to extract")
        links.add(norm)
    elif not (member.isfile() or member.isdir()):
        raise NativeqError(f"{where} is a device, fifo or other special file; refusing to extract")


def extract_bundle(archive, dest, force: bool = False) -> Path:
    """Unpack the bundle `archive` into the new directory `dest`, after checking every member."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise NativeqError(f"bundle {archive} does not exist")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise NativeqError(f"{archive} is not a readable tar archive: {e}") from None
    with tar:
        members = tar.getmembers()
        seen: set[str] = set()
        links: set[str] = set()
        for member in members:
            _check_member(member, seen, links, archive)
        with atomic_directory(dest, force=force) as tmp:
            # Python's own "data" filter (3.11.4+) re-checks every path against the file system.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            try:
                tar.extractall(tmp, members=members, **safety)
            except (tarfile.TarError, OSError) as e:
                raise NativeqError(f"extracting {archive} failed: {e}") from None
    return dest
