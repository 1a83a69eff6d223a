"""The demo's stages, in order; each returns what the report needs and raises on a failed check.

Sits on top of every other package: it only calls their public functions
(models -> qat -> export -> compile -> verify/bench) and `demo.report`.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nativeq.demo import VARIANTS, DemoConfig, DemoResult
from nativeq.errors import NativeqError

SUMMARY_NAME = "summary.json"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (qemu, compilers): wall time lies on a shared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Clock:
    """Prints one line per finished stage: index, name, what it found, its time and the total."""

    def __init__(self, echo, total: int):
        self.echo, self.total, self.index = echo, total, 0
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}

    def run(self, name: str, fn, *args):
        self.index += 1
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        try:
            result, line = fn(*args)
        except NativeqError as e:
            raise NativeqError(f"demo stage {self.index}/{self.total} ({name}) failed: {e}") from None
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        self.cpu_times[name] = _cpu_seconds() - cpu0
        self.echo(f"[{self.index}/{self.total}] {name:<8} {line}  ({seconds:.1f} s, cpu {self.cpu_times[name]:.1f} s, "
                  f"total {time.perf_counter() - self.started:.1f} s)")
        return result


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise NativeqError(message)


def _wer_ok(wer: float) -> bool:
    return math.isfinite(wer) and wer >= 0.0


# ----------------------------------------------------------------------------- 1 data
def stage_data(cfg: DemoConfig, work: Path):
    from nativeq.models.data import SynthConfig, check_audio, read_manifest, synthesize_corpus

    b = cfg.budget
    if cfg.data:
        data = Path(cfg.data)
        how = f"using {data}"
    else:
        data = work / "data"
        synthesize_corpus(data, SynthConfig(train=b.train, dev=b.dev, test=b.test, other=0, seed=cfg.seed,
                                            jobs=max(1, cfg.threads)), progress=False)
        how = f"synthesized {b.train}/{b.dev}/{b.test} train/dev/test utterances"
    counts = {split: len(check_audio(read_manifest(data, split))) for split in ("train", "dev", "test")}
    _check(all(counts.values()), f"{data}: an empty split ({counts})")
    return {"dir": str(data), "counts": counts, "synthesized": not cfg.data}, how


def _test_utterances(data: str, limit: int):
    from nativeq.models.data import check_audio, read_manifest

    return check_audio(read_manifest(data, "test"))[:limit]


# ----------------------------------------------------------------------------- 2 float model
def stage_float(cfg: DemoConfig, work: Path, data: dict):
    import torch

    from nativeq.export.float_onnx import export_float
    from nativeq.models.evaluate import evaluate_utterances
    from nativeq.models.pretrained import load_model, resolve_model_dir
    from nativeq.qat.quantize import quant_layers

    model, model_cfg = load_model(cfg.model)
    if quant_layers(model):
        raise NativeqError(f"{cfg.model} is a finetune run; the demo starts from a float model (its source run)")
    metrics = evaluate_utterances(model, _test_utterances(data["dir"], cfg.budget.test))
    _check(_wer_ok(metrics["wer"]), f"float WER {metrics['wer']} is not a number ≥ 0")
    onnx_path = work / "models" / "float.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    parity = export_float(cfg.model, onnx_path)
    params = sum(p.numel() for p in model.parameters())
    result = {"model": str(cfg.model), "model_dir": str(resolve_model_dir(cfg.model)), "config": asdict(model_cfg),
              "parameters": params, "wer": metrics["wer"], "cer": metrics["cer"], "stored_bytes": 4 * params,
              "onnx": str(onnx_path.relative_to(work)), "onnx_max_abs_diff": parity["max_abs_diff"]}
    torch.set_num_threads(cfg.threads)
    return result, f"WER {metrics['wer']:.3f} on {len(_test_utterances(data['dir'], cfg.budget.test))} test utterances, {params / 1e6:.2f} M params"


# ----------------------------------------------------------------------------- 3 QAT
def stage_qat(cfg: DemoConfig, work: Path, data: dict):
    from nativeq.models.evaluate import evaluate_utterances
    from nativeq.qat.convert import storage_bytes
    from nativeq.qat.finetune import FinetuneConfig, finetune, load_qat_model
    from nativeq.qat.sparsity import sparsity_report

    b = cfg.budget
    results = {}
    for name in cfg.variant_names:
        bits, sparsity, mixed = VARIANTS[name]
        run = work / "runs" / name
        started = time.perf_counter()
        finetune(FinetuneConfig(source=cfg.model, data=data["dir"], out=str(run), weight_bits=bits, sparsity=sparsity,
                                mixed=mixed, steps=b.qat_steps, batch_size=b.batch_size,
                                warmup_steps=max(1, b.qat_steps // 5), calibration_batches=min(8, b.train // b.batch_size),
                                threads=cfg.threads, max_dev=b.dev, seed=cfg.seed, progress=False))
        model, _, _ = load_qat_model(run)
        metrics = evaluate_utterances(model, _test_utterances(data["dir"], b.test))
        _check(_wer_ok(metrics["wer"]), f"{name}: WER {metrics['wer']} is not a number ≥ 0")
        violations = sum(r["violations"] for r in sparsity_report(model).values())
        _check(violations == 0, f"{name}: {violations} weight groups break the {sparsity} sparsity pattern after QAT")
        storage = storage_bytes(model)
        results[name] = {"weight_bits": bits, "sparsity": sparsity or "dense", "mixed_8bit_ends": mixed,
                         "steps": b.qat_steps, "wer": metrics["wer"], "cer": metrics["cer"],
                         "stored_bytes": storage["bytes"], "fraction_of_float": storage["fraction_of_float"],
                         "seconds": time.perf_counter() - started}
    line = ", ".join(f"{n} WER {r['wer']:.3f} ({r['stored_bytes'] / 1e6:.2f} MB)" for n, r in results.items())
    return results, f"a short run to show the recipe, {b.qat_steps} steps each: {line}"


# ----------------------------------------------------------------------------- 4 export + fidelity
def _feature_feeds(data: dict, count: int, max_frames: int) -> list[dict[str, np.ndarray]]:
    from nativeq.demo.transcribe import wav_features

    feeds = []
    for utt in _test_utterances(data["dir"], count):
        feeds.append({"feats": np.ascontiguousarray(wav_features(utt.path)[:, :max_frames])})
    return feeds


def stage_export(cfg: DemoConfig, work: Path, data: dict):
    import onnx
    import torch

    from nativeq.export.fidelity import compare_layers_isolated, ort_session
    from nativeq.qat.convert import convert
    from nativeq.qat.finetune import ExportRunConfig, export_run, load_qat_model

    feeds = _feature_feeds(data, 2, cfg.budget.verify_frames)
    results = {}
    for name in cfg.variant_names:
        onnx_path = work / "models" / f"{name}.onnx"
        exported = export_run(ExportRunConfig(run=str(work / "runs" / name), out=str(onnx_path)))
        proto = onnx.load(str(onnx_path))
        model = convert(load_qat_model(work / "runs" / name)[0])  # the integer model the QDQ file encodes
        layers = compare_layers_isolated(model, proto, feeds)
        worst = max(layers, key=lambda a: a.max_steps)
        exact = sum(a.exact * a.elements for a in layers) / max(1, sum(a.elements for a in layers))
        _check(worst.max_steps <= 1, f"{name}: layer {worst.name} differs between ORT and PyTorch by "
                                     f"{worst.max_steps} int8 steps (> 1)")
        session = ort_session(proto, threads=cfg.threads)
        same_text = 0
        from nativeq.demo.transcribe import greedy_text

        for feed in feeds:
            with torch.no_grad():
                ref = model(torch.from_numpy(feed["feats"]))[0][0].numpy()
            got = session.run(None, feed)[0][0]
            same_text += greedy_text(ref) == greedy_text(got)
        results[name] = {"onnx": str(onnx_path.relative_to(work)), "onnx_bytes": exported["bytes"],
                         "lint": exported["lint"], "layers": len(layers), "layer_max_steps": worst.max_steps,
                         "layer_exact_pct": 100.0 * exact, "same_transcript": f"{same_text}/{len(feeds)}"}
    line = ", ".join(f"{n}: {r['layers']} layers ≤ {r['layer_max_steps']} step, {r['layer_exact_pct']:.2f}% exact"
                     for n, r in results.items())
    return results, line


# ----------------------------------------------------------------------------- 5 shipped QAT models
def shipped_variant(cfg: DemoConfig, name: str) -> Path | None:
    """The QDQ model nativeq ships for `variant` of cfg.model (`pretrained/<model>-<variant>/model.onnx`),
    trained far longer than the demo's short QAT run; None for a model without one (e.g. a user's run)."""
    from nativeq._data import shipped_onnx_models

    return shipped_onnx_models().get(f"{cfg.model}-{name}")


def stage_shipped(cfg: DemoConfig, work: Path, data: dict):
    """Copy the shipped QAT models into OUT/models and measure them on the same test utterances in ONNX Runtime."""
    import shutil

    from nativeq.demo.transcribe import onnx_model_wer

    results = {}
    for name in cfg.variant_names:
        source = shipped_variant(cfg, name)
        if source is None:
            continue
        onnx_path = work / "models" / f"{name}-shipped.onnx"
        shutil.copyfile(source, onnx_path)
        card = json.loads((source.parent / "metrics.json").read_text())
        metrics = onnx_model_wer(onnx_path, _test_utterances(data["dir"], cfg.budget.test), cfg.threads)
        _check(_wer_ok(metrics["wer"]), f"shipped {source.parent.name}: WER {metrics['wer']} is not a number ≥ 0")
        results[name] = {"name": source.parent.name, "onnx": str(onnx_path.relative_to(work)), **card["recipe"],
                         "wer": metrics["wer"], "cer": metrics["cer"], "stored_bytes": card["storage"]["bytes"],
                         "fraction_of_float": card["storage"]["fraction_of_float"],
                         "card_test_wer": card["test"]["wer"]}
    if not results:
        return results, f"none shipped for {cfg.model}; the short QAT runs above are compiled"
    return results, ", ".join(f"{r['name']} ({r['steps']} QAT steps) WER {r['wer']:.3f} in ORT" for r in results.values())


# ----------------------------------------------------------------------------- 6 compile
def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_compile(cfg: DemoConfig, work: Path, exported: dict, shipped: dict):
    """Compile each variant for each target: its shipped QAT model when there is one, else this run's export."""
    from nativeq.compile import CompileConfig, compile_model

    results = {}
    for name in cfg.variant_names:
        onnx_rel, model = (shipped[name]["onnx"], "shipped") if name in shipped else (exported[name]["onnx"], "demo")
        for target in cfg.targets:
            key = f"{name}-{target}"
            started = time.perf_counter()
            out = work / "artifacts" / key
            out.parent.mkdir(parents=True, exist_ok=True)
            compiled = compile_model(work / onnx_rel, out, CompileConfig(target=target))
            manifest = compiled.manifest
            sizes = manifest.get("sizes") or {}
            results[key] = {"variant": name, "model": model, "onnx": onnx_rel, "target": target,
                            "dir": str(out.relative_to(work)),
                            "arch": manifest["target"].get("arch"), "bytes": _dir_bytes(out),
                            "weight_bytes": sizes.get("weight_bytes"), "library_bytes": sizes.get("library_bytes"),
                            "tuning": manifest.get("tuning"),
                            "int8_sites": manifest.get("int8_report"), "seconds": time.perf_counter() - started}
    line = ", ".join(f"{k} {r['seconds']:.0f} s" for k, r in results.items())
    return results, line


# ----------------------------------------------------------------------------- 7 verify
def stage_verify(cfg: DemoConfig, work: Path, data: dict, compiled: dict):
    from nativeq._fs import write_bytes_atomic
    from nativeq.verify import VerifyConfig, verify_artifact

    feed = _feature_feeds(data, 1, cfg.budget.verify_frames)[0]
    buffer = io.BytesIO()
    np.savez(buffer, **feed)
    inputs = work / "verify-inputs.npz"
    write_bytes_atomic(inputs, buffer.getvalue())
    results = {}
    for key, art in compiled.items():
        report = verify_artifact(work / art["dir"], work / art["onnx"],
                                 VerifyConfig(inputs=str(inputs), tol_steps=1.0))
        outputs = [o.to_json() for o in report.outputs]
        steps = max((o["max_steps"] for o in outputs if o["max_steps"] is not None), default=None)
        exact = min((o["exact_pct"] for o in outputs if o["exact_pct"] is not None), default=None)
        results[key] = {"target": art["target"], "variant": art["variant"], "model": art["model"],
                        "execution": report.execution,
                        "passed": report.passed, "max_steps": steps, "exact_pct": exact,
                        "frames": int(feed["feats"].shape[1]), "outputs": outputs}
        if not report.passed:
            problem = next((o.problem or o.tolerance for o in report.outputs if not o.passed), "")
            raise NativeqError(f"{key} ({report.execution}) disagrees with ONNX Runtime beyond tolerance: "
                               f"max {steps} steps ({problem})")
    line = ", ".join(f"{k} ≤{r['max_steps']:g} step {r['exact_pct']:.1f}% exact" for k, r in results.items())
    return results, line


# ----------------------------------------------------------------------------- 8 bench (+ compiled WER)
def _time_engines(runners: dict, warmup: int, repeat: int) -> list[dict]:
    """Median/p10/p90 ms per engine; runs are interleaved so load changes hit every engine alike."""
    from nativeq.verify.bench import time_interleaved

    return [e.to_dict() for e in time_interleaved(runners, warmup, repeat)]


def _latencies(cfg: DemoConfig, work: Path, art: dict, feats: np.ndarray) -> list[dict]:
    import torch

    from nativeq.models.pretrained import load_model
    from nativeq.runtime import load
    from nativeq.verify.bench import ort_session

    compiled = load(work / art["dir"])
    qdq = work / art["onnx"]
    qdq_best, level = ort_session(qdq, ("all", "basic", "disabled"), cfg.threads)
    qdq_plain, _ = ort_session(qdq, ("disabled",), cfg.threads)
    fp32, fp32_level = ort_session(work / "models" / "float.onnx", ("all", "basic", "disabled"), cfg.threads)
    model, _ = load_model(cfg.model)
    x = torch.from_numpy(feats)

    def pytorch():
        with torch.no_grad():
            model(x)

    feed = {"feats": feats}
    runners = {f"nativeq int8 ({art['target']})": lambda: compiled.run(feed),
               f"ort qdq (opt {level})": lambda: qdq_best.run(None, feed),
               "ort qdq (opt disabled)": lambda: qdq_plain.run(None, feed),
               f"ort fp32 (opt {fp32_level})": lambda: fp32.run(None, feed)}
    # NOTE: PyTorch is timed on its own, after the others: its OpenMP threads spin after each
    # run and, interleaved, took the cores of the next engine (nativeq int8: 3 ms alone, 12 ms after it).
    return (_time_engines(runners, warmup=2, repeat=cfg.budget.bench_repeat)
            + _time_engines({"pytorch fp32": pytorch}, warmup=2, repeat=cfg.budget.bench_repeat))


def _compiled_wer(artifact: Path, data: dict, limit: int) -> float:
    import jiwer

    from nativeq.demo.transcribe import TranscribeConfig, transcribe

    utts = _test_utterances(data["dir"], limit)
    hyps = [text for _, text in transcribe(TranscribeConfig(str(artifact), tuple(str(u.path) for u in utts)))]
    return float(jiwer.wer([u.text for u in utts], [h if h.strip() else "<empty>" for h in hyps]))


def stage_bench(cfg: DemoConfig, work: Path, data: dict, compiled: dict):
    from nativeq.runtime import machine_arch

    b = cfg.budget
    feats = _feature_feeds(data, 1, b.verify_frames)[0]["feats"]  # the real utterance verify used
    frames = feats.shape[1]
    results = {}
    for key, art in compiled.items():
        if art["arch"] != machine_arch():
            continue
        engines = _latencies(cfg, work, art, feats)
        wer = _compiled_wer(work / art["dir"], data, b.test)
        if not _wer_ok(wer):
            raise NativeqError(f"{key}: compiled WER {wer} is not a number ≥ 0")
        results[key] = {"variant": art["variant"], "model": art["model"], "target": art["target"], "frames": frames,
                        "threads": cfg.threads,
                        "engines": engines, "compiled_wer": wer}
    if not results:
        return results, "no artifact for this machine's architecture among --targets; nothing timed"
    line = ", ".join(f"{k} {r['engines'][0]['median_ms']:.1f} ms (WER {r['compiled_wer']:.3f})" for k, r in results.items())
    return results, f"T={frames} frames: {line}"


# ----------------------------------------------------------------------------- the run
def _machine() -> dict:
    from nativeq.runtime import cpu_features

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "features": sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avxvnni") if f in cpu_features())}


def _check_config(cfg: DemoConfig) -> None:
    from nativeq.targets import get_target

    from nativeq.models.pretrained import resolve_model_dir

    for name in cfg.variant_names:
        if name not in VARIANTS:
            raise NativeqError(f"unknown demo variant {name!r} (choose from {', '.join(VARIANTS)})")
    if not cfg.targets:
        raise NativeqError("--targets is empty (e.g. --targets host,rpi5)")
    for target in cfg.targets:
        get_target(target)  # a one-line error for an unknown target
    if cfg.threads < 1:
        raise NativeqError(f"--threads must be ≥ 1, got {cfg.threads}")
    resolve_model_dir(cfg.model)  # a one-line error before any work
    if cfg.data and not Path(cfg.data).is_dir():
        raise NativeqError(f"--data {cfg.data}: not a directory (a speech data dir with train/dev/test .tsv manifests)")


def run_demo(cfg: DemoConfig, echo=print) -> DemoResult:
    _check_config(cfg)  # before the heavy imports: a bad option fails in a moment

    import torch

    from nativeq._fs import atomic_directory, write_json_atomic
    from nativeq.demo.report import write_report

    out = Path(cfg.out)
    previous_demo = (out / SUMMARY_NAME).is_file()
    torch.set_num_threads(cfg.threads)
    # NOTE: the TVM thread pool reads TVM_NUM_THREADS when it first starts (the first native run).
    os.environ["TVM_NUM_THREADS"] = str(cfg.threads)
    clock = _Clock(echo, total=9)
    echo(f"nativeq demo{' --quick' if cfg.quick else ''}: {cfg.model}, variants {', '.join(cfg.variant_names)}, "
         f"targets {', '.join(cfg.targets)} -> {out}")
    with atomic_directory(out, force=cfg.force or previous_demo) as work, warnings.catch_warnings():
        work.chmod(0o755)  # a temporary directory is created private; the demo output is for everyone to read
        # the TorchScript ONNX exporter's constant-folding notes are not the user's concern here
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        data = clock.run("data", stage_data, cfg, work)
        floating = clock.run("float", stage_float, cfg, work, data)
        qat = clock.run("qat", stage_qat, cfg, work, data)
        exported = clock.run("export", stage_export, cfg, work, data)
        shipped = clock.run("shipped", stage_shipped, cfg, work, data)
        compiled = clock.run("compile", stage_compile, cfg, work, exported, shipped)
        verified = clock.run("verify", stage_verify, cfg, work, data, compiled)
        bench = clock.run("bench", stage_bench, cfg, work, data, compiled)
        summary = {"config": {**asdict(cfg), "variants": list(cfg.variant_names), "budget": asdict(cfg.budget)}, "machine": _machine(), "data": data,
                   "float": floating, "variants": qat, "export": exported, "shipped": shipped, "artifacts": compiled,
                   "verify": verified, "bench": bench, "stage_seconds": dict(clock.times),
                   "stage_cpu_seconds": dict(clock.cpu_times)}
        summary = json.loads(json.dumps(summary, default=str))
        clock.run("report", lambda: (write_report(work, summary), "report.md, wer_vs_size.png, latency.png, verify.png"))
        summary["stage_seconds"] = dict(clock.times)
        summary["stage_cpu_seconds"] = dict(clock.cpu_times)
        summary["total_seconds"] = sum(clock.times.values())
        write_json_atomic(work / SUMMARY_NAME, summary)
    echo(f"demo passed in {summary['total_seconds']:.0f} s: {out / 'report.md'}")
    return DemoResult(out=str(out), summary=summary)
