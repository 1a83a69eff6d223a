"""Run an artifact on inputs from a file (`nativeq run`) and time each of its kernels (`nativeq profile`).

`run_artifact` feeds the arrays of an .npz (by input name; an .npy for a one-input model) or
seeded random inputs of the declared shapes to the artifact, natively, or under qemu for an
aarch64 artifact on another machine (`emulate.run_emulated`), and writes the outputs to an .npz.

`profile_artifact` times every call the Relax VM makes through its instrumentation hook
(`set_instrument` on the VM module: a callback before and after each Call instruction, given
the callee and its symbol name). The calls are timed on a second VM of the same executable, so
the model's own VM runs uninstrumented for the reference time: per inference, each kernel's
calls and milliseconds next to what the manifest's kernel table says of it (kind, schedule,
share of the multiply-accumulates); the VM's own calls (allocation, shape checks) summed apart;
and the instrumented run time against the plain one (what the timing itself costs).

Imports numpy and the standard library only, and tvm-ffi through `nativeq.runtime` (no torch, no
TVM compiler, no `tvm` package).
"""

from __future__ import annotations

import io
import json
import statistics
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter_ns

import numpy as np

from nativeq._fs import write_bytes_atomic
from nativeq._text import aligned_table, first_line, nodes_text
from nativeq.errors import NativeqError
from nativeq.runtime.cpu import machine_arch
from nativeq.runtime.manifest import (TensorSpec, by_onnx_op, by_onnx_op_line, input_specs, kernel_onnx_nodes,
                                     kernel_onnx_op, output_specs, read_manifest)
from nativeq.runtime.model import aligned, check_inputs, import_tvm_ffi, runtime_threads

_WIDE_INT_HIGH = 16  # random int32/int64 inputs (often lengths or indices) are drawn from [0, 16)
# the VM's builtins (vm.builtin.alloc_storage, vm.builtin.match_shape, ...) and the shape computations
# VMShapeLower generates (shape_func, shape_func1, ...): what is no kernel when the manifest has no kernel table
_VM_PREFIXES = ("vm.", "shape_func")
_NAME_WIDTH = 72  # kernel names in the table are cut in the middle to this width (--json has them whole)


# ----------------------------------------------------------------------------- inputs
def load_inputs(path, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Arrays by name from an .npz, or the one input of a one-input model from an .npy (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise NativeqError(f"inputs file {path} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] != b"PK" and magic != b"\x93NUMPY":
            raise NativeqError(f"inputs file {path} is neither an .npz nor an .npy (save the inputs with np.savez)")
        if path.suffix == ".npy":
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise NativeqError(f"inputs file {path}: an .npy holds one array but the model has inputs {names}; use an .npz")
            return {specs[0].name: np.load(path, allow_pickle=False)}
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise NativeqError(f"inputs file {path} holds one array, not arrays by input name; save them with np.savez")
        with data:
            return {name: data[name] for name in data.files}
    except NativeqError:
        raise
    except Exception as e:  # noqa: BLE001  (numpy raises many kinds for a damaged or foreign file)
        raise NativeqError(f"inputs file {path} is not a readable .npz/.npy: {first_line(e)}") from None


def random_inputs(specs: tuple[TensorSpec, ...], dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random arrays of the declared dtypes and shapes, each symbolic size taken from `dims` by name.

    Floats: standard normal; (u)int8/16: the dtype's full range; wider ints: [0, 16); bool: a fair coin.
    """
    symbolic = sorted({d for s in specs for d in (s.shape or ()) if isinstance(d, str)})
    for name in dims:
        if name not in symbolic:
            raise NativeqError(f"--dim {name}: the model has no symbolic dim {name!r} "
                               f"(its symbolic dims: {', '.join(symbolic) or 'none'})")
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = []
        for d in spec.shape or ():
            if isinstance(d, str) and d not in dims:
                raise NativeqError(f"input {spec.name!r} ({spec}) has the symbolic dim {d}: give its size with "
                                   f"--dim {d}=SIZE")
            shape.append(int(dims[d]) if isinstance(d, str) else d)
        dtype = np.dtype(spec.dtype) if spec.dtype in np.sctypeDict else None
        if spec.value is not None:  # fixed at compile time: its only value
            value = np.asarray(spec.value).reshape(shape)
        elif dtype is not None and dtype.kind == "f":
            value = rng.standard_normal(shape)
        elif dtype is not None and dtype.kind in "iu":
            info = np.iinfo(dtype)
            value = rng.integers(info.min, int(info.max) + 1, shape) if dtype.itemsize <= 2 \
                else rng.integers(0, _WIDE_INT_HIGH, shape)
        elif dtype is not None and dtype.kind == "b":
            value = rng.integers(0, 2, shape)
        else:
            raise NativeqError(f"input {spec.name!r}: cannot make random {spec.dtype} inputs; pass --inputs FILE.npz")
        inputs[spec.name] = value.astype(dtype)
    return inputs


@dataclass(frozen=True)
class InputsConfig:
    """Where a run's inputs come from: a file, or seeded random arrays (`random` or any `dims`)."""

    inputs: str | None = None  # .npz of arrays by input name, or .npy for a one-input model
    dims: dict[str, int] = field(default_factory=dict)  # symbolic sizes of random inputs, e.g. {"T": 200}
    random: bool = False  # random inputs for a model without symbolic sizes (implied by `dims`)
    seed: int = 0


def _check_random_input_memory(manifest: dict, specs, dims: Mapping[str, int]) -> None:
    """Refuse sizes whose inputs, or whose call (the manifest's memory bound), would not fit in memory."""
    from nativeq.runtime.memory import MemoryFormula, check_memory, default_limit, format_bytes

    limit = default_limit()
    need = sum(int(np.prod([dims.get(d, 1) if isinstance(d, str) else d for d in (s.shape or ())], dtype=np.float64))
               * np.dtype(s.dtype).itemsize for s in specs)
    if limit is not None and need > limit:
        raise NativeqError(f"random inputs of sizes {dict(dims)} need {format_bytes(need)} and the limit is "
                           f"{format_bytes(limit)}: use smaller sizes")
    check_memory(MemoryFormula.from_manifest(manifest), dict(dims), limit, f"the artifact of {manifest['source']['file']}")


def prepare_inputs(manifest: dict, cfg: InputsConfig) -> tuple[dict[str, np.ndarray], str]:
    """The checked inputs (`check_inputs`: names, dtypes, shapes, shape conditions) and where they came from."""
    specs = input_specs(manifest)
    wants_random = cfg.random or bool(cfg.dims)
    if cfg.inputs is not None and wants_random:
        raise NativeqError("--inputs and --dim/--random are exclusive: run on a file or on random inputs")
    if cfg.inputs is not None:
        inputs, source = load_inputs(cfg.inputs, specs), str(cfg.inputs)
    elif wants_random:
        _check_random_input_memory(manifest, specs, cfg.dims)
        inputs = random_inputs(specs, cfg.dims, cfg.seed)
        sizes = "".join(f", {k}={v}" for k, v in sorted(cfg.dims.items()))
        source = f"seeded random (seed {cfg.seed}{sizes})"
    else:
        symbolic = sorted({d for s in specs for d in (s.shape or ()) if isinstance(d, str)})
        example = " ".join(f"--dim {d}=SIZE" for d in symbolic) or "--random"
        raise NativeqError(f"no inputs: give --inputs X.npz (arrays by input name; .npy for a one-input model) "
                           f"or {example} for seeded random ones")
    check_inputs(specs, inputs, manifest.get("shape_checks") or ())
    return inputs, source


# ----------------------------------------------------------------------------- run
@dataclass(frozen=True)
class RunConfig(InputsConfig):
    out: str | None = None  # .npz to write the outputs to (by output name)
    threads: int | None = None  # TVM worker threads (None: TVM's default)


@dataclass(frozen=True)
class RunResult:
    artifact: str
    target: str
    execution: str  # "native" or "emulated (qemu-aarch64 -cpu ...)"
    inputs_from: str
    outputs: dict[str, np.ndarray]
    out: str | None

    def stats(self) -> list[dict]:
        rows = []
        for name, value in self.outputs.items():
            row = {"name": name, "dtype": str(value.dtype), "shape": list(value.shape), "min": None, "max": None}
            finite = value[np.isfinite(value)] if value.dtype.kind in "fc" else value
            if finite.size:
                cast = float if value.dtype.kind in "fc" else int
                row["min"], row["max"] = cast(finite.min()), cast(finite.max())
            if value.dtype.kind in "fc" and finite.size != value.size:
                row["nonfinite"] = int(value.size - finite.size)
            rows.append(row)
        return rows

    def summary(self) -> str:
        lines = [f"{self.artifact} (target {self.target}, {self.execution}) on {self.inputs_from}:"]
        rows = [(r["name"], r["dtype"], "[" + ", ".join(map(str, r["shape"])) + "]",
                 _number(r["min"]), _number(r["max"]) + (f"  ({r['nonfinite']} NaN/inf)" if r.get("nonfinite") else ""))
                for r in self.stats()]
        lines.append(aligned_table(("output", "dtype", "shape", "min", "max"), rows))
        if self.out:
            lines.append(f"wrote {self.out}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"artifact": self.artifact, "target": self.target, "execution": self.execution,
                           "inputs_from": self.inputs_from, "outputs": self.stats(), "out": self.out}, indent=2)


def _number(value) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def write_npz(path, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` as an .npz (what np.savez writes, any names), written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def _foreign_arch(artifact: Path, manifest: dict, what: str) -> NativeqError:
    target = manifest["target"]
    return NativeqError(f"artifact {artifact} is for {target.get('arch')} (target {target.get('name')}) and this "
                        f"machine is {machine_arch()}: {what}")


def run_artifact(artifact, cfg: RunConfig = RunConfig()) -> RunResult:
    """Run `artifact` once on the inputs `cfg` names; write the outputs to `cfg.out` if set.

    An aarch64 artifact on another machine runs under qemu (`emulate.run_emulated`).
    """
    from nativeq.runtime import load

    artifact = Path(artifact)
    if cfg.out is not None and Path(cfg.out).suffix != ".npz":
        raise NativeqError(f"-o {cfg.out}: the outputs are written as an .npz (arrays by output name); name it OUT.npz")
    manifest = read_manifest(artifact)
    inputs, source = prepare_inputs(manifest, cfg)
    arch = manifest["target"].get("arch")
    if arch == machine_arch():
        outputs, execution = load(artifact, threads=cfg.threads).run(inputs), "native"
    elif arch == "aarch64":
        from nativeq.runtime.emulate import run_emulated

        values = run_emulated(artifact, inputs, threads=cfg.threads or 1)
        outputs = {spec.name: value for spec, value in zip(output_specs(manifest), values)}
        execution = f"emulated, qemu-aarch64 -cpu {manifest['target'].get('qemu_cpu') or 'max'}"
    else:
        raise _foreign_arch(artifact, manifest, f"run it on a {arch} machine")
    if cfg.out is not None:
        write_npz(cfg.out, outputs)
    return RunResult(artifact=str(artifact), target=manifest["target"]["name"], execution=execution,
                     inputs_from=source, outputs=outputs, out=cfg.out)


# ----------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class ProfileConfig(InputsConfig):
    runs: int = 10  # timed inferences (after one warm-up), each plain and instrumented; emulated: the long run's extra ones
    threads: int | None = None  # TVM worker threads (None: TVM's default)
    emulate: bool = False  # count an aarch64 artifact's instructions per kernel under qemu instead (emulated_profile)


@dataclass(frozen=True)
class KernelTime:
    """One kernel's time per inference, with what the manifest's kernel table says of it."""

    name: str
    calls: float  # calls per inference, measured (an int for any model without control flow)
    ms: float  # milliseconds per inference, all its calls (mean over the runs)
    share: float  # of the time of all kernels
    kind: str | None = None  # contraction / reduction / elementwise (manifest)
    schedule: str | None = None  # the schedule it was built with (manifest)
    mac_share: float | None = None  # its share of the model's multiply-accumulates (manifest)
    manifest_calls: int | None = None  # call sites the compiler counted (manifest)
    onnx_nodes: tuple[str, ...] = ()  # the ONNX nodes its calls compute (manifest; compute nodes first)
    onnx_op: str | None = None  # the op of the first of them


@dataclass(frozen=True)
class Profile:
    artifact: str
    target: str
    threads: int  # TVM worker threads the runs used
    runs: int
    inputs_from: str
    kernels: tuple[KernelTime, ...]  # slowest first
    vm_ms: float  # per inference: the VM's own calls (allocation, shape checks, shape functions)
    vm_calls: float
    instrumented_ms: float  # median time of an instrumented inference
    plain_ms: float  # median time of an uninstrumented inference (the model's own VM)

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    @property
    def by_op(self) -> dict[str, float]:
        """Milliseconds per inference by the ONNX op of each kernel's first node (`manifest.by_onnx_op`)."""
        return by_onnx_op((k.onnx_op, k.ms) for k in self.kernels)

    @property
    def overhead_ms(self) -> float:
        return self.instrumented_ms - self.plain_ms

    @property
    def overhead_us_per_call(self) -> float:
        calls = sum(k.calls for k in self.kernels) + self.vm_calls
        return 1e3 * self.overhead_ms / calls if calls else 0.0

    def table(self, top: int | None = 20) -> str:
        shown = self.kernels if top is None or top <= 0 else self.kernels[:top]
        plural = "s" if self.threads != 1 else ""
        lines = [f"{self.artifact} (target {self.target}, {self.threads} thread{plural}) on {self.inputs_from}: "
                 f"{self.runs} runs after 1 warm-up, per inference"]
        rows = []
        for k in shown:
            name = k.name if len(k.name) <= _NAME_WIDTH else k.name[:_NAME_WIDTH - 28] + "..." + k.name[-25:]
            calls = _calls_text(k.calls) + ("" if k.manifest_calls in (None, k.calls) else f" (manifest {k.manifest_calls})")
            mac = "-" if k.mac_share is None else f"{100 * k.mac_share:.1f}%"
            rows.append((name, calls, f"{k.ms:.4f}", f"{100 * k.share:.1f}%", k.kind or "-", k.schedule or "-", mac,
                         nodes_text(k.onnx_nodes)))
        lines.append(aligned_table(("kernel", "calls", "ms", "time", "kind", "schedule", "MACs", "ONNX nodes"), rows))
        rest = self.kernels[len(shown):]
        if rest:
            lines.append(f"... {len(rest)} more kernel{'s' if len(rest) > 1 else ''}: {sum(k.ms for k in rest):.4f} ms "
                         f"({100 * sum(k.share for k in rest):.1f}%); --top 0 or --json lists all")
        idle = [k for k in self.kernels if k.calls == 0]
        if idle:
            sites = sum(k.manifest_calls or 0 for k in idle)
            lines.append(f"never called though the manifest counts {sites} call site{'s' if sites != 1 else ''}: "
                         f"{', '.join(k.name for k in idle)}")
        by_op = by_onnx_op_line(self.by_op, "kernel time")
        if by_op:
            lines.append(by_op)
        lines.append(f"kernels {self.kernel_ms:.4f} ms + VM calls {self.vm_ms:.4f} ms ({_calls_text(self.vm_calls)} "
                     f"allocation/shape calls) per instrumented inference")
        lines.append(f"instrumented inference {self.instrumented_ms:.4f} ms vs plain {self.plain_ms:.4f} ms (medians): "
                     f"the timing adds {self.overhead_ms:.4f} ms, {self.overhead_us_per_call:.1f} us per VM call, "
                     f"up to which each kernel call's time reads high")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        data["kernels"] = [asdict(k) for k in self.kernels]
        data.update(kernel_ms=self.kernel_ms, by_onnx_op_ms=self.by_op, overhead_ms=self.overhead_ms,
                    overhead_us_per_call=self.overhead_us_per_call)
        return json.dumps(data, indent=2)


def _calls_text(calls: float) -> str:
    return str(int(calls)) if float(calls).is_integer() else f"{calls:.2f}"


class _Recorder:
    """The VM instrument: times each call between its before and after callbacks, by symbol."""

    def __init__(self):
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._starts: list[int] = []

    def reset(self) -> None:
        self.ns.clear()
        self.calls.clear()

    def __call__(self, func, symbol, before, ret_value, *args):
        now = perf_counter_ns()
        if before:
            self._starts.append(perf_counter_ns())
        else:
            name = str(symbol)
            self.ns[name] = self.ns.get(name, 0) + now - self._starts.pop()
            self.calls[name] = self.calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind::kNoOp: run the call


def _manifest_kernels(manifest: dict) -> dict[str, dict]:
    """The manifest's kernel records by name (an artifact without a kernel table: none)."""
    records = manifest.get("kernels")
    if not isinstance(records, list):
        return {}
    return {r["name"]: r for r in records if isinstance(r, dict) and isinstance(r.get("name"), str)}


def _is_vm_call(symbol: str, known: dict[str, dict]) -> bool:
    if known:
        return symbol not in known
    return symbol.startswith(_VM_PREFIXES)


def _optional(record: dict, key: str, kinds):
    value = record.get(key)
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def profile_artifact(artifact, cfg: ProfileConfig = ProfileConfig()):
    """Time each kernel of `artifact` over `cfg.runs` inferences on this machine (see the module docstring).

    With `cfg.emulate`, count each kernel's aarch64 instructions under qemu instead
    (`emulated_profile.profile_emulated`, an `EmulatedProfile`; same `table`/`to_json`).
    """
    from nativeq.runtime import load

    if cfg.emulate:
        from nativeq.runtime.emulated_profile import profile_emulated

        return profile_emulated(artifact, cfg)
    if isinstance(cfg.runs, bool) or not isinstance(cfg.runs, int) or cfg.runs < 1:
        raise NativeqError(f"--runs must be at least 1, got {cfg.runs!r}")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if manifest["target"].get("arch") != machine_arch():
        raise _foreign_arch(artifact, manifest, "profile it on the device (times under qemu say nothing of it); "
                                                f"`nativeq profile {artifact} --emulate` counts its instructions per "
                                                f"kernel here")
    inputs, source = prepare_inputs(manifest, cfg)
    model = load(artifact, threads=cfg.threads)
    ffi = import_tvm_ffi()
    arrays = [aligned(a) for a in check_inputs(model.inputs, inputs, manifest.get("shape_checks") or ())]
    tensors = [ffi.from_dlpack(a) for a in arrays]
    plain = model._entry()  # the calling thread's VM (and its thread pool, set to `threads`)
    vm = model._new_vm()
    recorder = _Recorder()
    vm["set_instrument"](ffi.convert(recorder))
    timed = vm[manifest["entry"]]

    plain(*tensors)
    timed(*tensors)
    recorder.reset()
    plain_ns, timed_ns = [], []
    for _ in range(cfg.runs):  # interleaved, so a drift of the machine's speed touches both alike
        start = perf_counter_ns()
        plain(*tensors)
        plain_ns.append(perf_counter_ns() - start)
        start = perf_counter_ns()
        timed(*tensors)
        timed_ns.append(perf_counter_ns() - start)

    known = _manifest_kernels(manifest)
    runs = cfg.runs
    per_run = {name: (recorder.ns[name] / runs / 1e6, recorder.calls[name] / runs) for name in recorder.ns}
    vm_ms = sum(ms for name, (ms, _) in per_run.items() if _is_vm_call(name, known))
    vm_calls = sum(calls for name, (_, calls) in per_run.items() if _is_vm_call(name, known))
    timed_kernels = {name: value for name, value in per_run.items() if not _is_vm_call(name, known)}
    for name in known:
        timed_kernels.setdefault(name, (0.0, 0.0))  # built but never called on these inputs
    total = sum(ms for ms, _ in timed_kernels.values())
    kernels = []
    for name, (ms, calls) in timed_kernels.items():
        record = known.get(name, {})
        kernels.append(KernelTime(
            name=name, calls=int(calls) if float(calls).is_integer() else calls, ms=ms,
            share=ms / total if total else 0.0, kind=_optional(record, "kind", str),
            schedule=_optional(record, "schedule", str), mac_share=_optional(record, "share", (int, float)),
            manifest_calls=_optional(record, "calls", int), onnx_nodes=kernel_onnx_nodes(record),
            onnx_op=kernel_onnx_op(record)))
    kernels.sort(key=lambda k: (-k.ms, k.name))
    return Profile(
        artifact=str(artifact), target=manifest["target"]["name"], threads=cfg.threads or runtime_threads(),
        runs=runs, inputs_from=source, kernels=tuple(kernels), vm_ms=vm_ms,
        vm_calls=int(vm_calls) if float(vm_calls).is_integer() else vm_calls,
        instrumented_ms=statistics.median(timed_ns) / 1e6, plain_ms=statistics.median(plain_ns) / 1e6,
    )
