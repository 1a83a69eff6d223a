"""`nativeq bench`: latency of a compiled artifact next to ONNX Runtime, measured side by side.

Every engine runs on the same inputs with the same thread count, and the engines take turns
round-robin so that noise from a shared machine hits all engines alike: in an order where each engine's turn
follows each other engine's equally often (A, B, A, C, B, C, ...: `switch_order`), since what the previous engine
left in the caches differs (ORT's float session, 80 MB of weights for Wav2Letter, evicts the most). A turn is
`burst` consecutive timed runs. With burst 1 every run follows another engine's
run ("after switch": caches and thread pools cold, as in a streaming app that does other work
between chunks); with burst > 1 the report's median, p10 and p90 come from the 2nd..Nth run of
each turn ("steady": back-to-back inferences, as in batch transcription), and the median of
the first runs is reported next to it. The ratio is the compiled artifact's median over the
best ONNX Runtime median. Numbers belong in benchmarks and the README, never in timed unit tests.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from nativeq._data import onnx_model_path
from nativeq.errors import NativeqError


@dataclass(frozen=True)
class BenchConfig:
    """target: compile MODEL for it (ignored when `artifact` names an existing artifact).
    float_onnx: the float model the QDQ one came from, timed in ORT too.
    dims: sizes of symbolic dims (default 64 each). threads: for every engine.
    warmup / repeat: untimed runs per engine, and turns per engine. burst: timed runs per turn.
    emulate: instead of timing, count aarch64 instructions per inference under qemu for an
    int8 build per ARM target (`target` if it is an ARM target, else rpi4 and rpi5; or
    `artifact`) and a float build (the only speed signal without the device), and, with `ort`,
    for ONNX Runtime's aarch64 build on MODEL (and `float_onnx`) under the same emulated CPUs.
    """

    target: str = "host"
    artifact: str | None = None
    float_onnx: str | None = None
    dims: dict = field(default_factory=dict)
    threads: int = 2
    warmup: int = 3
    repeat: int = 20
    burst: int = 1
    seed: int = 0
    emulate: bool = False
    ort: bool = True


@dataclass
class EngineTiming:
    """times_ms: the runs the statistics describe (steady runs when turns were bursts);
    after_switch_ms: with bursts, the first run of every turn (right after another engine ran)."""

    name: str
    times_ms: list[float]
    after_switch_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.times_ms, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    @property
    def after_switch_median(self) -> float | None:
        return float(np.median(self.after_switch_ms)) if self.after_switch_ms else None

    def to_dict(self) -> dict:
        return {"name": self.name, "median_ms": self.median, "p10_ms": self.p10, "p90_ms": self.p90,
                "runs": len(self.times_ms), "after_switch_median_ms": self.after_switch_median}


@dataclass
class BenchReport:
    model: str
    target: str
    threads: int
    dims: dict
    engines: list[EngineTiming]
    burst: int = 1

    @property
    def compiled(self) -> EngineTiming:
        return self.engines[0]

    @property
    def ort_best(self) -> EngineTiming:
        return min((e for e in self.engines if e.name.startswith("ort")), key=lambda e: e.median)

    @property
    def ratio(self) -> float:
        """compiled median / best ORT median (< 1: the compiled artifact is faster)."""
        return self.compiled.median / self.ort_best.median

    @property
    def ratio_after_switch(self) -> float | None:
        """With bursts: the compiled artifact's first-run-of-turn median over the best ORT one."""
        if not self.compiled.after_switch_ms:
            return None
        best = min((e for e in self.engines if e.name.startswith("ort")), key=lambda e: e.after_switch_median)
        return self.compiled.after_switch_median / best.after_switch_median

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "target": self.target,
            "threads": self.threads,
            "dims": self.dims,
            "burst": self.burst,
            "engines": [e.to_dict() for e in self.engines],
            "ort_best": self.ort_best.name,
            "ratio_compiled_to_ort_best": self.ratio,
            "ratio_after_switch": self.ratio_after_switch,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items()) or "static"
        runs = "after a switch" if self.burst == 1 else f"steady, runs 2-{self.burst} of each turn"
        switch = self.burst > 1
        lines = [
            f"model {self.model}  target {self.target}  threads {self.threads}  dims {dims}  ({runs})",
            f"{'engine':<28} {'median ms':>10} {'p10 ms':>10} {'p90 ms':>10}" + (f" {'after switch':>13}" if switch else ""),
        ]
        for e in self.engines:
            lines.append(f"{e.name:<28} {e.median:>10.3f} {e.p10:>10.3f} {e.p90:>10.3f}"
                         + (f" {e.after_switch_median:>13.3f}" if switch else ""))
        lines.append(f"compiled / ORT best ({self.ort_best.name}): {self.ratio:.3f}x"
                     + (f"  (after switch: {self.ratio_after_switch:.3f}x)" if switch else ""))
        return "\n".join(lines)


def ort_session(path, levels: tuple[str, ...], threads: int):
    """(session, level) at the first graph-optimization level ("all", "basic", "disabled") ORT accepts.

    Intra-op thread spinning is off (see the NOTE below). ORT 1.2x-1.3x's extended QDQ
    transformers reject some valid QDQ graphs (a QuantizeLinear whose
    zero point is uint8 after propagation through Reshape); the next level is timed and named
    instead of failing the run over ORT's optimizer.
    """
    import onnxruntime as ort

    enums = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    failures = []
    for level in levels:
        options = ort.SessionOptions()
        options.graph_optimization_level = enums[level]
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # NOTE: engines are timed interleaved; ORT's pool threads spin after each run and would take
        # the cores of the next engine (nativeq at 2 threads: 1.4 ms alone, 44 ms right after ORT).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), level
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
            failures.append(f"{level}: {str(e).splitlines()[0][:160]}")
    raise NativeqError(f"ONNX Runtime cannot load {path} at any optimization level ({'; '.join(failures)})")


def _ort_runner(path, levels: tuple[str, ...], threads: int, feeds: dict):
    """(engine label suffix "opt LEVEL", a no-argument function running the session on `feeds`)."""
    session, level = ort_session(path, levels, threads)
    names = {i.name for i in session.get_inputs()}
    missing = names - set(feeds)
    if missing:
        raise NativeqError(f"{path}: inputs {sorted(missing)} are not inputs of the compiled model; cannot time it on the same inputs")
    own_feeds = {k: v for k, v in feeds.items() if k in names}
    return f"opt {level}", lambda: session.run(None, own_feeds)


def switch_order(engines: int) -> list[int]:
    """One cycle of turns over `engines` engines (indices) in which every turn follows another engine's and each
    ordered pair (i, then j != i) occurs once, the last turn followed by the first: a closed walk over every edge of
    the complete directed graph (Hierholzer's algorithm). Each engine has `engines - 1` turns per cycle; for two
    engines, A, B."""
    if engines < 2:
        return [0] * engines
    successors = {i: [j for j in range(engines) if j != i] for i in range(engines)}
    stack, walk = [0], []
    while stack:
        if successors[stack[-1]]:
            stack.append(successors[stack[-1]].pop(0))
        else:
            walk.append(stack.pop())
    return walk[::-1][:-1]  # the walk ends where it starts: the cycle repeats from its first turn


def time_interleaved(runners: dict, warmup: int, repeat: int, burst: int = 1) -> list[EngineTiming]:
    """Warm up every engine, then time at least `repeat` turns of `burst` runs each per engine, whole cycles of
    `switch_order`, so load changes and each other's cache footprint hit every engine alike. With burst > 1 the
    first run of each turn is kept apart."""
    if burst < 1:
        raise NativeqError(f"--burst must be ≥ 1, got {burst}")
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    cycle = switch_order(len(names))
    turns_per_cycle = max(len(names) - 1, 1)
    times = {name: [] for name in runners}
    for _ in range(-(-repeat // turns_per_cycle)):
        for index in cycle:
            name = names[index]
            for _ in range(burst):
                start = time.perf_counter()
                runners[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
    if burst == 1:
        return [EngineTiming(name, t) for name, t in times.items()]
    return [EngineTiming(name, [x for i, x in enumerate(t) if i % burst], t[::burst]) for name, t in times.items()]


def bench_emulated_model(model_path, cfg: BenchConfig):
    """Count aarch64 instructions per inference under qemu: nativeq's int8 build per ARM target (compiled
    here, or cfg.artifact) and a float build, next to ONNX Runtime's aarch64 build on the QDQ model (all
    optimizations and none) and on cfg.float_onnx, each under the same emulated CPU (unless cfg.ort is off)."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime.insn_bench import InsnBenchConfig, bench_emulated
    from nativeq.targets import get_target

    ort_models = ()
    if cfg.ort:
        from nativeq.compile import load_onnx
        from nativeq.runtime.ort_emulated import require_installed

        require_installed()  # before compiling: a clear error if `nativeq setup-arm` has not run
        ort_models = (("ort qdq", str(model_path), ("all", "basic")), ("ort qdq", str(model_path), ("disabled",)))
        if cfg.float_onnx:
            load_onnx(cfg.float_onnx)  # a clear error for a missing or broken file
            ort_models += (("ort fp32", str(cfg.float_onnx), ("all", "basic", "disabled")),)
    icfg = InsnBenchConfig(dims=cfg.dims, repeat=max(1, min(cfg.repeat, 5)), seed=cfg.seed, ort_models=ort_models)
    if cfg.artifact:
        return bench_emulated([cfg.artifact], icfg)
    requested = get_target(cfg.target)
    names = [requested.name] if requested.arch == "aarch64" else ["rpi4", "rpi5"]
    with tempfile.TemporaryDirectory(prefix="nativeq-bench-emulated-") as tmp:
        builds = []
        for name in names:
            builds.append(Path(tmp) / f"{name}-int8")
            compile_model(model_path, builds[-1], CompileConfig(target=name))
        builds.append(Path(tmp) / f"{names[0]}-float")
        compile_model(model_path, builds[-1], CompileConfig(target=names[0], int8=False))
        return bench_emulated(builds, icfg)


def bench_model(model_path, cfg: BenchConfig):
    """Compile (unless cfg.artifact is given) and time MODEL against ONNX Runtime.

    With cfg.emulate, count aarch64 instructions instead (see `bench_emulated_model`).
    """
    model_path = onnx_model_path(model_path)
    if cfg.float_onnx:
        cfg = replace(cfg, float_onnx=str(onnx_model_path(cfg.float_onnx)))
    if cfg.emulate:
        return bench_emulated_model(model_path, cfg)
    if cfg.threads < 1:
        raise NativeqError(f"--threads must be ≥ 1, got {cfg.threads}")
    # NOTE: the TVM thread pool reads TVM_NUM_THREADS when it first starts, so set it before any run.
    os.environ["TVM_NUM_THREADS"] = str(cfg.threads)
    from nativeq.compile import CompileConfig, compile_model, load_onnx
    from nativeq.runtime import load
    from nativeq.verify.inputs import check_dims, random_inputs

    onnx_model = load_onnx(model_path)
    with tempfile.TemporaryDirectory(prefix="nativeq-bench-") as tmp:
        if cfg.artifact:
            artifact = Path(cfg.artifact)
        else:
            artifact = Path(tmp) / "artifact"
            compile_model(model_path, artifact, CompileConfig(target=cfg.target))
        compiled = load(artifact)
        dims = check_dims(compiled.inputs, cfg.dims, compiled.manifest.get("build", {}).get("dims"))
        feeds = random_inputs(compiled.inputs, onnx_model, dims, cfg.seed)
        runners = {f"nativeq int8 ({compiled.target})": lambda: compiled.run(feeds)}
        for engine, path, levels in (("ort qdq", model_path, ("all", "basic")), ("ort qdq", model_path, ("disabled",)),
                                     ("ort fp32", cfg.float_onnx, ("all", "basic", "disabled"))):
            if path is None:
                continue
            load_onnx(path)  # a clear error for a missing or broken file
            label, run = _ort_runner(path, levels, cfg.threads, feeds)
            runners[f"{engine} ({label})"] = run
        engines = time_interleaved(runners, cfg.warmup, cfg.repeat, cfg.burst)
    dims = {s: cfg.dims.get(s, None) for spec in compiled.inputs for s in spec.shape if isinstance(s, str)}
    from nativeq.verify.inputs import DEFAULT_DIM

    dims = {k: (v if v is not None else DEFAULT_DIM) for k, v in dims.items()}
    return BenchReport(str(model_path), compiled.target, cfg.threads, dims, engines, cfg.burst)
