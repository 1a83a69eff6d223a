"""ONNX Runtime's aarch64 build under `qemu-aarch64`: the peer of nativeq's ARM artifacts without a Pi.

`nativeq setup-arm` puts Debian's arm64 python3 (the release this machine runs), extracted from
its .debs, and the aarch64 `onnxruntime` and `numpy` wheels of the installed versions into
`arm_python_dir()`. `runner/ort_run.py` runs there, under the same qemu CPU model as the
artifacts (`-cpu cortex-a72` for the Pi 4, `cortex-a76` for the Pi 5), with one ORT thread.

Counting uses the artifacts' instruction-count plugin the same way (`emulate.count_instructions`):
one process runs one inference, another 1 + N; the difference over N is one steady-state
inference, free of the (large, constant) python startup, imports and session creation.

qemu-user 7.2 shows guest programs the host's /proc/cpuinfo; ORT's cpuinfo library crashes on an
x86 one while ORT loads, so each run gets a prefix (`qemu -L`) that links the sysroot and adds a
/proc/cpuinfo of the emulated core (qemu looks a guest path up under the prefix first). The ISA
features ORT's MLAS kernels pick by (dotprod, ...) still come from qemu's HWCAP, as on a device.

Imports only numpy and the standard library (this is `runtime/`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError
from nativeq.runtime import emulate

RUNNER_SCRIPT = Path(__file__).with_name("runner") / "ort_run.py"
STAMP = "versions.json"
DEFAULT_TIMEOUT_S = 1800.0

# /proc/cpuinfo of the emulated cores (MIDR fields and the Linux feature names of their HWCAPs).
_CORES = {
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                        "asimdrdm lrcpc dcpop asimddp"),
}


def arm_python_dir() -> Path:
    """The aarch64 python sysroot with ORT: beside the aarch64 TVM runtime (`<runtime dir>-python`);
    `$NATIVEQ_ARM_PYTHON` overrides."""
    override = os.environ.get("NATIVEQ_ARM_PYTHON")
    if override:
        return Path(override)
    runtime = emulate.arm_runtime_dir()
    return runtime.with_name(runtime.name + "-python")


def installed(root: Path | None = None) -> dict | None:
    """The setup's record (python, onnxruntime, numpy versions, Debian packages), or None if not set up."""
    root = root or arm_python_dir()
    try:
        info = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None
    python = root / "sysroot" / "usr" / "bin" / f"python{info.get('python')}"
    return info if python.is_file() else None


def require_installed() -> dict:
    info = installed()
    if info is None:
        raise NativeqError(f"the aarch64 python with onnxruntime is not set up in {arm_python_dir()}: "
                           "run `nativeq setup-arm` (or `make setup`)")
    return info


def _present_cpus() -> int:
    """How many CPUs the guest sees in /sys (qemu passes the host's through)."""
    try:
        text = Path("/sys/devices/system/cpu/present").read_text().strip()
        count = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        return max(count, 1)
    except (OSError, ValueError):
        return os.cpu_count() or 1


def cpuinfo_text(cpu: str) -> str:
    """A Linux aarch64 /proc/cpuinfo for the emulated core (the A76's for `max` and other models)."""
    variant, part, revision, features = _CORES.get(cpu, _CORES["cortex-a76"])
    block = (f"BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
             f"CPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n")
    return "".join(f"processor\t: {i}\n{block}" for i in range(_present_cpus()))


def guest_prefix(workdir: Path, cpu: str, root: Path | None = None) -> Path:
    """A `qemu -L` prefix in `workdir`: links to the sysroot's top directories plus the core's /proc/cpuinfo."""
    sysroot = (root or arm_python_dir()) / "sysroot"
    prefix = workdir / "guest-root"
    (prefix / "proc").mkdir(parents=True, exist_ok=True)
    for entry in sysroot.iterdir():
        if entry.name != "proc":
            (prefix / entry.name).symlink_to(entry.resolve())
    (prefix / "proc" / "cpuinfo").write_text(cpuinfo_text(cpu))
    return prefix


def guest_env(home: Path) -> dict[str, str]:
    """The guest's whole environment: nothing of the host's python, virtualenv or OpenBLAS settings; an
    empty HOME (ORT keeps telemetry state under it)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home),
            "PYTHONHASHSEED": "0", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def python_command(prefix: Path, cpu: str, args: Sequence[str], plugin: Sequence[str] = (),
                   info: dict | None = None) -> list[str]:
    """qemu-aarch64 running the sysroot's python3 (found through `prefix`) with `args`."""
    info = info or require_installed()
    qemu = emulate.require_tool(*emulate.QEMU)
    python = prefix / "usr" / "bin" / f"python{info['python']}"
    return [qemu, "-L", str(prefix), "-cpu", cpu, *plugin, str(python), *args]


def run_python(args: Sequence[str], cpu: str = "cortex-a76", timeout: float = 600.0,
               root: Path | None = None, bytecode: bool = False) -> subprocess.CompletedProcess:
    """Run the aarch64 python with `args` under qemu (setup checks the install with it; `bytecode`: let
    python cache the bytecode of what it imports, which counted runs never write)."""
    info = installed(root) if root else require_installed()
    if info is None:
        raise NativeqError(f"no aarch64 python in {root}")
    with tempfile.TemporaryDirectory(prefix="nativeq-armpy-") as tmp:
        prefix = guest_prefix(Path(tmp), cpu, root)
        env = guest_env(Path(tmp))
        if bytecode:
            del env["PYTHONDONTWRITEBYTECODE"]
        return subprocess.run(python_command(prefix, cpu, args, info=info), capture_output=True, text=True,
                              timeout=timeout, env=env)


@dataclass(frozen=True)
class OrtRun:
    outputs: list[np.ndarray]
    level: str  # the optimization level ORT accepted
    plugin_log: str


def run_ort_emulated(model, inputs: Mapping[str, np.ndarray], *, cpu: str = "cortex-a76",
                     levels: Sequence[str] = ("all",), repeat: int = 0, plugin: Path | None = None,
                     timeout: float = DEFAULT_TIMEOUT_S) -> OrtRun:
    """Run MODEL with aarch64 ONNX Runtime under `qemu-aarch64 -cpu CPU` on `inputs` (name -> array).

    `levels`: graph-optimization levels tried in order ("all", "basic", "disabled").
    Returns the outputs in the session's order, the level used, and the plugin's log.
    """
    info = require_installed()
    model = Path(model)
    if not model.is_file():
        raise NativeqError(f"model {model} does not exist")
    with tempfile.TemporaryDirectory(prefix="nativeq-ort-emulated-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", **{k: np.require(v, requirements="C") for k, v in inputs.items()})
        log = work / "plugin.log"
        plugin_args = ["-plugin", str(plugin), "-d", "plugin", "-D", str(log)] if plugin else []
        args = [str(RUNNER_SCRIPT), str(model.resolve()), str(work / "inputs.npz"), str(work / "outputs.npz"),
                "--level", ",".join(levels), "--repeat", str(repeat)]
        command = python_command(guest_prefix(work, cpu), cpu, args, plugin_args, info)
        where = f"onnxruntime {info.get('onnxruntime')} (aarch64) on {model} under qemu-aarch64 -cpu {cpu}"
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=guest_env(work))
        except subprocess.TimeoutExpired:
            raise NativeqError(f"{where} did not finish in {timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            message = next((line for line in lines if line.startswith("ort_run:")), lines[-1] if lines else "no message")
            if proc.returncode < 0:
                message = f"died with {signal.Signals(-proc.returncode).name}: {message}"
            raise NativeqError(f"{where} failed: {message.removeprefix('ort_run:').strip()}")
        level = next((line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("outputs ")), levels[0])
        with np.load(work / "outputs.npz", allow_pickle=False) as data:
            outputs = [data[f"out{i}"] for i in range(len(data.files))]
        return OrtRun(outputs=outputs, level=level, plugin_log=log.read_text() if log.is_file() else "")


@dataclass(frozen=True)
class OrtInstructionCount:
    """Guest instructions of aarch64 ONNX Runtime under qemu: per inference (steady state), and the rest."""

    model: str
    cpu: str
    level: str
    per_inference: int
    startup: int  # python startup, imports, session creation and the first inference
    repeat: int
    onnxruntime: str


def count_ort_instructions(model, inputs: Mapping[str, np.ndarray], *, cpu: str = "cortex-a76",
                           levels: Sequence[str] = ("all",), repeat: int = 5,
                           timeout: float = DEFAULT_TIMEOUT_S) -> OrtInstructionCount:
    """Steady-state aarch64 instructions per ORT inference: (count(1 + repeat runs) - count(1 run)) / repeat."""
    if repeat < 1:
        raise NativeqError(f"repeat must be at least 1, got {repeat}")
    info = require_installed()
    plugin = emulate.build_insn_plugin()
    once = run_ort_emulated(model, inputs, cpu=cpu, levels=levels, plugin=plugin, timeout=timeout)
    many = run_ort_emulated(model, inputs, cpu=cpu, levels=levels, repeat=repeat, plugin=plugin, timeout=timeout)
    base, total = emulate._insns(once.plugin_log, model), emulate._insns(many.plugin_log, model)
    return OrtInstructionCount(model=str(model), cpu=cpu, level=once.level, per_inference=round((total - base) / repeat),
                               startup=base, repeat=repeat, onnxruntime=str(info.get("onnxruntime")))
