"""Run an aarch64 artifact on this x86 machine under `qemu-aarch64`, for `nativeq verify`.

The artifact's library is executed by `nativeq_runner` (C++, `runtime/runner/`), cross-built
for aarch64 and linked against the aarch64 `libtvm_runtime.so`/`libtvm_ffi.so` taken from the
aarch64 TVM wheels (`nativeq setup-arm`). qemu emulates the target's CPU model
(`manifest["target"]["qemu_cpu"]`: cortex-a72 for the Pi 4, cortex-a76 for the Pi 5), so an
instruction the device lacks faults here as it would on the device; the runner checks the
artifact's required features with `getauxval(AT_HWCAP)` first and refuses with a clear
message instead of dying with SIGILL.

Imports only numpy and the standard library (this is `runtime/`: no TVM compiler, no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nativeq._data import in_writable_venv, user_cache_dir
from nativeq._fs import write_bytes_atomic
from nativeq.errors import NativeqError
from nativeq.runtime.manifest import check_files, input_specs, output_specs, read_manifest
from nativeq.runtime.model import check_inputs

RUNNER_SOURCE = Path(__file__).with_name("runner") / "nativeq_runner.cc"
RPC_SERVER_SOURCE = Path(__file__).with_name("runner") / "nativeq_rpc_server.cc"
PLUGIN_SOURCE = Path(__file__).with_name("runner") / "insn_count.c"
HOST_CC = ("gcc", "gcc")
CROSS_CXX = ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")  # (tool, Debian package)
QEMU = ("qemu-aarch64", "qemu-user")
QEMU_SYSROOT = Path("/usr/aarch64-linux-gnu")  # aarch64 glibc/libstdc++ of the cross toolchain
DEFAULT_TIMEOUT_S = 900.0

# Runner exit codes (see nativeq_runner.cc).
_EXIT_CPU = 3  # this CPU lacks a required feature (2: usage or input error, 4: TVM error)


def arm_runtime_dir() -> Path:
    """Where `nativeq setup-arm` puts the aarch64 TVM runtime and the runner: the virtual environment's
    share/nativeq/aarch64 when it is writable, else the per-user cache ($NATIVEQ_ARM_RUNTIME overrides)."""
    override = os.environ.get("NATIVEQ_ARM_RUNTIME")
    if override:
        return Path(override)
    if in_writable_venv():
        return Path(sys.prefix) / "share" / "nativeq" / "aarch64"
    return user_cache_dir() / "aarch64"


def require_tool(tool: str, package: str) -> str:
    """Absolute path of `tool`, or a NativeqError naming the apt package that provides it."""
    path = shutil.which(tool)
    if path is None:
        raise NativeqError(f"{tool} not found: install it with `sudo apt-get install {package}` (or `make setup`)")
    return path


def _runtime_libs(runtime_dir: Path) -> Path:
    lib = runtime_dir / "lib"
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        if not (lib / name).is_file():
            raise NativeqError(f"the aarch64 TVM runtime is not installed ({lib / name} is missing): run `nativeq setup-arm`")
    return lib


def _check_runtime_matches(artifact: Path, manifest: dict) -> None:
    """The aarch64 runtime in the cache is the TVM / tvm-ffi release the artifact was built with."""
    stamp = arm_runtime_dir() / "versions.json"
    try:
        cached = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return  # _runtime_libs reports a missing runtime
    for package, key in (("apache-tvm", "tvm_version"), ("apache-tvm-ffi", "tvm_ffi_version")):
        built, have = manifest.get(key), cached.get(package)
        if built and have and built != have:
            raise NativeqError(
                f"artifact {artifact} was built with {package} {built} but the aarch64 runtime in {stamp.parent} is "
                f"{have}: run `nativeq setup-arm` (it fetches the installed versions) or recompile the artifact"
            )


def _program_hash(source: Path, runtime_dir: Path, cxx: str) -> str:
    h = hashlib.sha256(source.read_bytes())
    versions = runtime_dir / "versions.json"
    h.update(versions.read_bytes() if versions.is_file() else b"")
    h.update(cxx.encode())
    return h.hexdigest()


def build_runner(force: bool = False) -> Path:
    """Cross-compile `nativeq_runner` for aarch64 (cached; rebuilt when its source or the runtime changes)."""
    return _build_device_program(RUNNER_SOURCE, force)


def build_rpc_server(force: bool = False) -> Path:
    """Cross-compile `nativeq_rpc_server` (a Python-free TVM RPC server) for aarch64, cached like the runner."""
    return _build_device_program(RPC_SERVER_SOURCE, force)


def _build_device_program(source: Path, force: bool) -> Path:
    """Cross-compile one C++ file of `runner/` against the aarch64 TVM runtime, into the runtime cache's bin/."""
    runtime_dir = arm_runtime_dir()
    lib = _runtime_libs(runtime_dir)
    cxx = require_tool(*CROSS_CXX)
    binary = runtime_dir / "bin" / source.stem
    stamp = binary.with_suffix(".sha256")
    digest = _program_hash(source, runtime_dir, cxx)
    if not force and binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return binary
    with tempfile.TemporaryDirectory(prefix="nativeq-runner-") as tmp:
        out = Path(tmp) / source.stem
        cmd = [
            cxx, "-std=c++17", "-O2", "-o", str(out), str(source),
            "-I", str(runtime_dir / "include"), "-L", str(lib),
            # NOTE: libtvm_runtime registers the Relax VM loaders in static initializers; keep it linked.
            "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
            "-Wl,-rpath,$ORIGIN/../lib",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise NativeqError(f"cross-compiling {source.name} with {CROSS_CXX[0]} failed: {first}")
        write_bytes_atomic(binary, out.read_bytes())
    binary.chmod(0o755)
    write_bytes_atomic(stamp, (digest + "\n").encode())
    return binary


def rpc_server_command(port: int, work_dir: str | Path, cpu: str = "max", host: str = "127.0.0.1",
                       key: str = "") -> list[str]:
    """The command that runs the aarch64 RPC server under qemu on this machine (a stand-in device)."""
    server = build_rpc_server()
    args = ["--port", str(port), "--host", host, "--work-dir", str(work_dir)] + (["--key", key] if key else [])
    return _qemu_command(cpu, [str(server), *args])


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.require(array, requirements="C"), allow_pickle=False)  # 0-d stays 0-d


def _qemu_command(cpu: str, program: list[str], plugin: list[str] | None = None) -> list[str]:
    qemu = require_tool(*QEMU)
    if not QEMU_SYSROOT.is_dir():
        raise NativeqError(
            f"the aarch64 sysroot {QEMU_SYSROOT} is missing: install it with `sudo apt-get install {CROSS_CXX[1]}`"
        )
    return [qemu, "-L", str(QEMU_SYSROOT), "-cpu", cpu, *(plugin or []), *program]


def _runner_failure(artifact: Path, target: dict, cpu: str, proc: subprocess.CompletedProcess) -> NativeqError:
    lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("nativeq_runner:")), lines[-1] if lines else "")
    message = message.removeprefix("nativeq_runner:").strip()
    where = f"artifact {artifact} (target {target.get('name')}) under qemu-aarch64 -cpu {cpu}"
    if proc.returncode == _EXIT_CPU:
        return NativeqError(f"{where}: {message}; emulate a CPU that has it (e.g. cpu='max') or compile for this one")
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return NativeqError(f"{where} died with {name}{': ' + message if message else ''}")
    return NativeqError(f"{where} failed (exit {proc.returncode}): {message or 'no message'}")


def _prepare(artifact_dir, inputs: Mapping[str, object], cpu: str | None, workdir: Path, runner_args=()):
    """Check the artifact and inputs; write the inputs as .npy; return (manifest, runner argv, cpu)."""
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    check_files(artifact, manifest)
    target = manifest["target"]
    if target.get("arch") != "aarch64":
        raise NativeqError(
            f"artifact {artifact} is for {target.get('arch')} (target {target.get('name')}); emulation runs aarch64 only"
        )
    cpu = cpu or target.get("qemu_cpu") or "max"
    arrays = check_inputs(input_specs(manifest), inputs, manifest.get("shape_checks") or ())
    runner = build_runner()
    _check_runtime_matches(artifact, manifest)
    argv = [str(runner), str((artifact / manifest["library"]).resolve()), str(workdir)]
    features = list(target.get("cpu_features") or [])
    if features:
        argv += ["--require", ",".join(features)]
    argv += ["--entry", manifest.get("entry", "main"), *runner_args]
    for i, array in enumerate(arrays):
        path = workdir / f"in{i}.npy"
        _write_npy(path, array)
        argv.append(str(path))
    return manifest, argv, cpu


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(argv: list[str], timeout: float, threads: int, artifact, cpu: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_child_env(threads))
    except subprocess.TimeoutExpired:
        raise NativeqError(f"artifact {artifact} under qemu-aarch64 -cpu {cpu} did not finish in {timeout:.0f} s") from None


@dataclass(frozen=True)
class EmulatedRun:
    """One run of an artifact under qemu: its outputs, the plugin's log, the guest's memory map."""

    outputs: list[np.ndarray]
    plugin_log: str  # "" without a plugin
    maps: str  # the guest's /proc/self/maps at the end of the run ("" unless asked for)
    library: str  # the artifact's library as the runner loaded it (its path in `maps`)


def _emulate(artifact_dir, inputs: Mapping[str, object], cpu: str | None, timeout: float, threads: int,
             runner_args: list[str] = (), plugin: Path | None = None) -> tuple[list[np.ndarray], str]:
    """Run the artifact once under qemu; return (outputs, the plugin log text or "")."""
    run = emulate_run(artifact_dir, inputs, cpu, timeout, threads, runner_args, plugin)
    return run.outputs, run.plugin_log


def emulate_run(artifact_dir, inputs: Mapping[str, object], cpu: str | None = None,
                timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1, runner_args: list[str] = (),
                plugin: Path | None = None, plugin_options: tuple[str, ...] = (), maps: bool = False) -> EmulatedRun:
    """Run the artifact once under qemu, with the qemu `plugin` given `plugin_options` ("key=value")
    if set, and the guest's memory map copied out at the end if `maps`."""
    with tempfile.TemporaryDirectory(prefix="nativeq-emulate-") as tmp:
        workdir = Path(tmp)
        maps_file = workdir / "maps.txt"
        extra = [*runner_args, "--maps", str(maps_file)] if maps else list(runner_args)
        manifest, argv, cpu = _prepare(artifact_dir, inputs, cpu, workdir, extra)
        log = workdir / "plugin.log"
        spec = ",".join([str(plugin), *plugin_options])
        plugin_args = ["-plugin", spec, "-d", "plugin", "-D", str(log)] if plugin else None
        proc = _run(_qemu_command(cpu, argv, plugin_args), timeout, threads, artifact_dir, cpu)
        if proc.returncode != 0:
            raise _runner_failure(Path(artifact_dir), manifest["target"], cpu, proc)
        outputs = sorted(workdir.glob("out*.npy"), key=lambda p: int(p.stem[3:]))
        expected = len(output_specs(manifest))
        if len(outputs) != expected:
            raise NativeqError(
                f"artifact {artifact_dir} returned {len(outputs)} outputs under qemu, its manifest lists {expected}"
            )
        return EmulatedRun(outputs=[np.load(p, allow_pickle=False) for p in outputs],
                           plugin_log=log.read_text() if log.is_file() else "",
                           maps=maps_file.read_text() if maps and maps_file.is_file() else "",
                           library=argv[1])


def run_emulated(artifact_dir, inputs: Mapping[str, object], *, cpu: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1) -> list[np.ndarray]:
    """Run the aarch64 artifact on `inputs` (name -> array) under qemu; return its outputs in manifest order.

    `cpu` overrides the emulated CPU model (default: the target's `qemu_cpu`), e.g. to show
    that a Pi 5 artifact refuses to run on a Pi 4's cortex-a72.
    """
    outputs, _ = _emulate(artifact_dir, inputs, cpu, timeout, threads)
    return outputs


# ----------------------------------------------------------------------------- instruction counts
def build_insn_plugin(force: bool = False) -> Path:
    """Build the qemu instruction-counting TCG plugin with the host C compiler (cached by source hash).

    Debian's qemu-user supports `-plugin` but ships no plugin library, so nativeq carries its own.
    """
    cc = require_tool(*HOST_CC)
    library = arm_runtime_dir() / "plugins" / "libnativeq_insn.so"
    stamp = library.with_suffix(".sha256")
    digest = hashlib.sha256(PLUGIN_SOURCE.read_bytes() + cc.encode()).hexdigest()
    if not force and library.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return library
    with tempfile.TemporaryDirectory(prefix="nativeq-plugin-") as tmp:
        out = Path(tmp) / library.name
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(PLUGIN_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise NativeqError(f"building the qemu plugin {PLUGIN_SOURCE.name} with {HOST_CC[0]} failed: {first}")
        write_bytes_atomic(library, out.read_bytes())
    write_bytes_atomic(stamp, (digest + "\n").encode())
    return library


@dataclass(frozen=True)
class InstructionCount:
    """Guest instructions executed under qemu: per inference, and for the process around it."""

    artifact: str
    target: str
    cpu: str
    per_inference: int  # one call of the entry function (VM dispatch + kernels), steady state
    startup: int  # everything else in a one-inference run: loading, VM init, .npy I/O, first call
    repeat: int

    def summary(self) -> str:
        return (f"{self.artifact} (target {self.target}, qemu -cpu {self.cpu}): "
                f"{self.per_inference / 1e6:.3f} M instructions per inference "
                f"(mean of {self.repeat}; startup and first call {self.startup / 1e6:.1f} M)")


def _insns(log: str, artifact) -> int:
    for line in log.splitlines():
        name, _, value = line.partition(" ")
        if name == "insns" and value.strip().isdigit():
            return int(value)
    raise NativeqError(f"the qemu instruction-count plugin reported nothing for artifact {artifact}")


def count_instructions(artifact_dir, inputs: Mapping[str, object], *, cpu: str | None = None, repeat: int = 5,
                       timeout: float = DEFAULT_TIMEOUT_S) -> InstructionCount:
    """Dynamic aarch64 instruction count of one inference, the only speed signal available without a device.

    Runs the artifact twice under qemu with the counting plugin: one inference, then 1 + `repeat`
    inferences; the difference divided by `repeat` is the steady-state count per inference.
    """
    if repeat < 1:
        raise NativeqError(f"repeat must be at least 1, got {repeat}")
    plugin = build_insn_plugin()
    _, once = _emulate(artifact_dir, inputs, cpu, timeout, 1, plugin=plugin)
    _, many = _emulate(artifact_dir, inputs, cpu, timeout, 1, runner_args=["--repeat", str(repeat)], plugin=plugin)
    base, total = _insns(once, artifact_dir), _insns(many, artifact_dir)
    manifest = read_manifest(artifact_dir)
    target = manifest["target"]
    return InstructionCount(
        artifact=str(artifact_dir),
        target=str(target.get("name")),
        cpu=cpu or target.get("qemu_cpu") or "max",
        per_inference=round((total - base) / repeat),
        startup=base,
        repeat=repeat,
    )
