"""Compile, verify and bench every selected zoo entry through nativeq's user path; print a markdown table.

    .venv/bin/python -m benchmarks.zoo [--models a,b] [--quantizers x,y] [--no-bench] [--rpi5]
                                       [--out DIR] [--json FILE] [--threads 2] [--repeat 20]
    .venv/bin/python benchmarks/zoo/run.py ...    (the same)

Per (model, quantizer): generate the ONNX files (`zoo.build`, cached in OUT/models), compile for
`host` (`compile_model`), verify against ONNX Runtime at T=200 (`verify_artifact`), with --rpi5
also compile for `rpi5` and verify under qemu, then time the artifact at T=200 and T=1000 next to
ONNX Runtime on the quantized and the float model (`bench_model`, threads 2, batch 1): the ratio is
the artifact's median over the best ORT median (< 1: nativeq is faster). A failing entry records its
one-line error and the run goes on; the exit status is 1 if any entry failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import zoo  # noqa: E402
from nativeq._text import first_line  # noqa: E402
from nativeq.errors import NativeqError  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "zoo"  # benchmarks/out/ is git-ignored
VERIFY_FRAMES = 200
BENCH_FRAMES = (200, 1000)
CONTRACTION_WORDS = ("contraction", "matmul", "dense", "gemm", "conv")


@dataclass(frozen=True)
class RunConfig:
    models: tuple[str, ...] = ()  # empty: all
    quantizers: tuple[str, ...] = ()  # empty: all that apply
    bench: bool = True
    rpi5: bool = False
    out: Path = DEFAULT_OUT
    json_path: Path | None = None
    threads: int = 2
    repeat: int = 20


@dataclass
class EntryResult:
    model: str
    quantizer: str
    verify_x86: str = "-"
    verify_rpi5: str = "-"
    ratios: dict = field(default_factory=dict)  # frames -> compiled / best ORT median ("static": one run)
    compile_seconds: float | None = None
    generic_kernels: str = "?"
    errors: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.errors)


# ----------------------------------------------------------------------------- stages
def generic_contraction_kernels(manifest: dict) -> str:
    """How many contraction kernels (matmul/conv) run on the generic schedule, from manifest["kernels"]
    (a list of dicts, or a dict of dicts, with "kind" and "schedule"); "?" when the manifest has none."""
    kernels = manifest.get("kernels")
    if isinstance(kernels, dict):
        kernels = list(kernels.values())
    if not isinstance(kernels, list):
        return "?"

    def is_generic_contraction(kernel) -> bool:
        if not isinstance(kernel, dict):
            return False
        kind = str(kernel.get("kind", "")).lower()
        return str(kernel.get("schedule", "")).lower() == "generic" and any(w in kind for w in CONTRACTION_WORDS)

    return str(sum(is_generic_contraction(k) for k in kernels))


def compile_for(model_path: Path, out: Path, target: str):
    from nativeq.compile.api import CompileConfig, compile_model

    return compile_model(model_path, out, CompileConfig(target=target), force=True)


def verify_cell(artifact: Path, model_path: Path, dims: dict, localize: bool = True) -> tuple[str, str | None, dict]:
    """(table cell, one-line failure or None, report as JSON) of `verify_artifact` at `dims`.

    With `localize` a failure is localized and rounding ties are accepted (`verify --accept-ties`): the
    cell says so, and names the node of a difference that is not a tie."""
    from nativeq.errors import VerificationFailed
    from nativeq.verify.api import VerifyConfig, verify_artifact

    report = verify_artifact(artifact, model_path, VerifyConfig(runs=1, dims=dims, localize=localize,
                                                                accept_ties=localize))
    details = json.loads(report.to_json())
    try:
        report.raise_if_failed()
    except VerificationFailed as e:
        errors = [loc for loc in report.localizations if loc.kind != "tie"]
        where = (f" ({errors[0].kind}" + (f" at {errors[0].node}" if errors[0].node else "") + ")") if errors else ""
        return f"FAIL{where}", str(e), details
    if report.ties_accepted:
        return "pass (rounding ties accepted)", None, details
    worst = [o for o in report.outputs if o.quantized and o.max_steps is not None]
    if worst:
        steps = max(o.max_steps for o in worst)
        exact = min((o.exact_pct for o in worst if o.exact_pct is not None), default=100.0)
        return f"pass (≤{steps:.3g} step, {exact:.1f}% exact)", None, details
    return f"pass (max |diff| {max(o.max_abs for o in report.outputs):.2g})", None, details


def bench_ratio(model_path: Path, artifact: Path, float_path: Path, dims: dict, cfg: RunConfig) -> tuple[float, dict]:
    from nativeq.verify.bench import BenchConfig, bench_model

    report = bench_model(model_path, BenchConfig(target="host", artifact=str(artifact), float_onnx=str(float_path),
                                                 dims=dims, threads=cfg.threads, repeat=cfg.repeat))
    return report.ratio, report.to_dict()


def _record(result: EntryResult, stage: str, error: BaseException) -> None:
    if os.environ.get("NATIVEQ_DEBUG"):
        traceback.print_exception(error)
    text = first_line(error)
    if not isinstance(error, NativeqError):
        text = f"{type(error).__name__}: {text}"
    result.errors.append(f"{stage}: {text}")


def run_entry(name: str, quantizer: str, cfg: RunConfig, log) -> EntryResult:
    result = EntryResult(name, quantizer)
    spec = zoo.get_model(name)
    cache = cfg.out / "models"
    try:
        model_path = zoo.build(name, quantizer, cache)
        float_path = zoo.float_model(name, cache)
    except Exception as e:  # noqa: BLE001  (one broken entry must not stop the zoo)
        _record(result, "build", e)
        return result

    artifacts = cfg.out / "artifacts"
    host_artifact = artifacts / f"{name}.{quantizer}.host"
    try:
        log(f"{name} {quantizer}: compile host")
        compiled = compile_for(model_path, host_artifact, "host")
        result.compile_seconds = float(compiled.manifest.get("compile_seconds", 0.0))
        result.generic_kernels = generic_contraction_kernels(compiled.manifest)
    except Exception as e:  # noqa: BLE001
        _record(result, "compile host", e)
        host_artifact = None

    if host_artifact is not None:
        try:
            log(f"{name} {quantizer}: verify host")
            result.verify_x86, failure, result.details["verify_x86"] = verify_cell(
                host_artifact, model_path, spec.dims(VERIFY_FRAMES))
            if failure:
                result.errors.append(f"verify x86: {failure}")
        except Exception as e:  # noqa: BLE001
            result.verify_x86 = "error"
            _record(result, "verify x86", e)

    if cfg.rpi5:
        run_rpi5(result, model_path, artifacts / f"{name}.{quantizer}.rpi5", spec.dims(VERIFY_FRAMES), log,
                 host_artifact)

    if cfg.bench and host_artifact is not None:
        frames_list = BENCH_FRAMES if spec.symbolic_dims else ("static",)
        for frames in frames_list:
            dims = {} if frames == "static" else spec.dims(frames)
            try:
                log(f"{name} {quantizer}: bench {dims or 'static shape'}")
                result.ratios[frames], result.details[f"bench_{frames}"] = bench_ratio(
                    model_path, host_artifact, float_path, dims, cfg)
            except Exception as e:  # noqa: BLE001
                _record(result, f"bench {frames}", e)
    return result


def run_rpi5(result: EntryResult, model_path: Path, artifact: Path, dims: dict, log, host_artifact: Path | None) -> None:
    """Compile for rpi5 and verify under qemu (plain comparison). When that fails and the x86 build's
    outputs on the same inputs are bit-identical, the rpi5 build computes exactly what the x86 one does:
    the cell says so and carries the x86 verdict (which localizes and accepts rounding ties)."""
    try:
        log(f"{result.model} {result.quantizer}: compile rpi5")
        compile_for(model_path, artifact, "rpi5")
        log(f"{result.model} {result.quantizer}: verify rpi5 (qemu)")
        result.verify_rpi5, failure, result.details["verify_rpi5"] = verify_cell(artifact, model_path, dims, localize=False)
        if failure and host_artifact is not None and same_outputs(artifact, host_artifact, model_path, dims):
            result.verify_rpi5 = f"= x86, bit-identical: {result.verify_x86}"
            failure = None
        if failure:
            result.errors.append(f"verify rpi5: {failure}")
    except Exception as e:  # noqa: BLE001
        result.verify_rpi5 = "error"
        _record(result, "rpi5", e)


def same_outputs(artifact: Path, other: Path, model_path: Path, dims: dict) -> bool:
    """Whether two artifacts of one model give bit-identical outputs on verify's inputs (seed 0, `dims`)."""
    import tempfile

    import numpy as np
    import onnx

    from nativeq.runtime.manifest import input_specs, read_manifest
    from nativeq.runtime.profile import RunConfig, run_artifact, write_npz
    from nativeq.verify.inputs import random_inputs

    inputs = random_inputs(input_specs(read_manifest(artifact)), onnx.load(str(model_path)), dims, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.npz"
        write_npz(path, inputs)
        first, second = (run_artifact(a, RunConfig(inputs=str(path))).outputs for a in (artifact, other))
    return first.keys() == second.keys() and all(
        np.array_equal(first[k], second[k], equal_nan=True) for k in first)


# ----------------------------------------------------------------------------- report
def _ratio_cell(result: EntryResult, frames) -> str:
    if "static" in result.ratios:
        return f"{result.ratios['static']:.2f}x (static)" if frames == BENCH_FRAMES[0] else "-"
    value = result.ratios.get(frames)
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(results: list[EntryResult], rpi5: bool) -> str:
    header = ["model", "quantizer", "verify x86", "verify rpi5", *(f"ratio T={f}" for f in BENCH_FRAMES),
              "compile s", "generic contraction kernels", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.model, r.quantizer, r.verify_x86, r.verify_rpi5 if rpi5 else "(not run)",
                 *(_ratio_cell(r, f) for f in BENCH_FRAMES),
                 "-" if r.compile_seconds is None else f"{r.compile_seconds:.1f}", r.generic_kernels,
                 "; ".join(r.errors)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def write_json(results: list[EntryResult], path: Path) -> None:
    from nativeq._fs import write_json_atomic

    write_json_atomic(path, [{**asdict(r), "failed": r.failed} for r in results])


# ----------------------------------------------------------------------------- command line
def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip()) if text else ()


def parse_args(argv=None) -> tuple[RunConfig, bool]:
    """(config, --list given)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(zoo.ZOO)}")
    parser.add_argument("--quantizers", help=f"comma-separated, from: {', '.join(zoo.QUANTIZERS)}")
    parser.add_argument("--no-bench", action="store_true", help="compile and verify only")
    parser.add_argument("--rpi5", action="store_true", help="also compile for rpi5 and verify under qemu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="models/ and artifacts/ go here")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=2, help="bench threads for every engine")
    parser.add_argument("--repeat", type=int, default=20, help="bench turns per engine")
    parser.add_argument("--list", action="store_true", help="print the (model, quantizer) matrix and exit")
    args = parser.parse_args(argv)
    cfg = RunConfig(models=_names(args.models), quantizers=_names(args.quantizers), bench=not args.no_bench,
                    rpi5=args.rpi5, out=args.out, json_path=args.json, threads=args.threads, repeat=args.repeat)
    return cfg, args.list


def main(argv=None) -> int:
    try:
        cfg, list_only = parse_args(argv)
        selected = zoo.entries(cfg.models, cfg.quantizers)
    except NativeqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if list_only:
        for name, spec in zoo.ZOO.items():
            print(f"{name:22s} {', '.join(spec.quantizers)}")
        return 0
    if not selected:
        print("error: no zoo entry matches --models/--quantizers", file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_NUM_THREADS", str(cfg.threads))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    results = []
    for name, quantizer in selected:
        results.append(run_entry(name, quantizer, cfg, log))
        if results[-1].failed:
            log(f"{name} {quantizer}: FAILED: {results[-1].errors[0]}")
    print(markdown_table(results, cfg.rpi5))
    if cfg.json_path:
        write_json(results, cfg.json_path)
    failed = [r for r in results if r.failed]
    print(f"\n{len(results) - len(failed)} of {len(results)} entries passed"
          + (f"; failed: {', '.join(f'{r.model}.{r.quantizer}' for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


def probe_main(description: str, known: list[str], probe, markdown_row, header: list[str], argv=None) -> int:
    """The command line of a probe set (`transformers_probe`, `pretrained_probe`): `--models`, `--out`,
    `--no-bench`; runs `probe(name, out_dir, bench)` per model and prints a Markdown table with `header`'s
    columns, one `markdown_row(result)` per model. Exit 1 if any model failed."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, help="directory for the files the probe writes (default: a temporary one)")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(known)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="nativeq-probe-") as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name in names:
            results.append(probe(name, out_dir, not args.no_bench))
            print(markdown_row(results[-1]), flush=True)
    return 1 if any("error" in r for r in results) else 0
