"""Published speech models, as their PyPI packages ship them, through nativeq: quantize, compile, verify, bench.

    python -m benchmarks.pretrained_probe [--models silero_vad_16k_op15,dnsmos_sig_bak_ovr] [--out DIR] [--no-bench]

Not architectures written for nativeq but the ONNX files users deploy, with their trained weights, their
exporters (TorchScript of torch 1.9-2.11, dynamo, spox, tf2onnx, keras2onnx) and opsets (9-18): Silero VAD (the
`silero-vad` package's seven files and `faster-whisper`'s copy), openWakeWord (its melspectrogram front end, the
embedding CNN, the wake-word heads and its Silero VAD) and the DNSMOS / AECMOS / PLCMOS quality estimators of
`speechmos`. The wheels are fetched with `pip download --no-deps` (PyPI only; cached in the output directory). As a
user would: a float model below opset 13 is converted to 13 first (per-channel QDQ needs it), then quantized by
`quantize_static` (QDQ, per channel, u8 activations, s8 weights; per tensor where ONNX Runtime refuses its own
per-channel output), calibrated on eight inputs (speech synthesized by espeak-ng for waveform inputs, seeded normal
noise for feature and state inputs), compiled for the host, verified on a ninth input with rounding ties accepted,
and benched against ONNX Runtime's best (`nativeq bench`, 2 threads, 30 runs per engine). Prints one Markdown row
per model (the table of docs/zoo.md, "A seventh probe set").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
import wave
import zipfile
from pathlib import Path

import numpy as np
import onnx

from benchmarks.zoo.quantize import CalibrationFeeds, _quiet_root_logger
from benchmarks.zoo.run import RunConfig, bench_ratio, generic_contraction_kernels, probe_main

WHEELS = {"silero": "silero-vad==6.2.3", "faster_whisper": "faster-whisper==1.2.1",
          "openwakeword": "openwakeword==0.5.1", "speechmos": "speechmos==0.0.1.1"}
SENTENCE = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jumbo box of frozen plums"
CALIBRATION_INPUTS = 8


def _wave(*shape, rate: int = 16000, scale: float = 1.0):
    return ("wave", shape, rate, scale)


def _noise(*shape, positive: bool = False):
    return ("noise", shape, positive)


def _zeros(*shape):
    return ("zeros", shape)


def _sample_rate():
    return ("int", 16000)


# name -> (wheel, path in the wheel, {symbolic dim: size}, {input: how to make it}): sizes as the package uses them
# (Silero: 512 samples + 64 of context at 16 kHz; openWakeWord: 16 frames of its 96-dim embeddings; DNSMOS: 9 s)
MODELS = {
    "silero_vad": ("silero", "silero_vad/data/silero_vad.onnx", {},
                   {"input": _wave(1, 576), "state": _zeros(2, 1, 128), "sr": _sample_rate()}),
    "silero_vad_16k_op15": ("silero", "silero_vad/data/silero_vad_16k_op15.onnx", {"batch": 1, "sequence": 512},
                            {"input": _wave(1, 512), "state": _zeros(2, 1, 128), "sr": _sample_rate()}),
    "silero_vad_half": ("silero", "silero_vad/data/silero_vad_half.onnx", {"batch": 1, "sequence": 512},
                        {"input": _wave(1, 512), "state": _zeros(2, 1, 128)}),
    "silero_vad_op18_ifless": ("silero", "silero_vad/data/silero_vad_op18_ifless.onnx", {"batch": 1, "sequence": 512},
                               {"input": _wave(1, 512), "sr": _sample_rate(), "state": _zeros(2, 1, 128)}),
    "silero_vad_16k_sequence": ("silero", "silero_vad/data/silero_vad_16k_sequence.onnx", {"sequence_length": 8},
                                {"input": _wave(8, 576), "h": _zeros(1, 1, 128), "c": _zeros(1, 1, 128)}),
    "silero_vad_openvino_16k": ("silero", "silero_vad/data/silero_vad_openvino_16k.onnx", {},
                                {"input": _wave(1, 576), "state": _zeros(2, 1, 128)}),
    "silero_vad_v6_faster_whisper": ("faster_whisper", "faster_whisper/assets/silero_vad_v6.onnx", {"seq_len": 8},
                                     {"input": _wave(8, 576), "h": _zeros(1, 1, 128), "c": _zeros(1, 1, 128)}),
    "oww_melspectrogram": ("openwakeword", "openwakeword/resources/models/melspectrogram.onnx",
                           {"batch_size": 1, "samples": 16000}, {"input": _wave(1, 16000, scale=32767)}),
    "oww_embedding": ("openwakeword", "openwakeword/resources/models/embedding_model.onnx", {"unk__314": 1},
                      {"input_1": _noise(1, 76, 32, 1)}),
    "oww_alexa": ("openwakeword", "openwakeword/resources/models/alexa_v0.1.onnx", {},
                  {"onnx::Flatten_0": _noise(1, 16, 96)}),
    "oww_hey_jarvis": ("openwakeword", "openwakeword/resources/models/hey_jarvis_v0.1.onnx", {},
                       {"x.1": _noise(1, 16, 96)}),
    "oww_hey_mycroft": ("openwakeword", "openwakeword/resources/models/hey_mycroft_v0.1.onnx", {},
                        {"onnx::Flatten_0": _noise(1, 16, 96)}),
    "oww_timer": ("openwakeword", "openwakeword/resources/models/timer_v0.1.onnx", {},
                  {"onnx::Flatten_0": _noise(1, 34, 96)}),
    "oww_silero_vad": ("openwakeword", "openwakeword/resources/models/silero_vad.onnx", {"batch": 1, "sequence": 512},
                       {"input": _wave(1, 512), "sr": _sample_rate(), "h": _zeros(2, 1, 64), "c": _zeros(2, 1, 64)}),
    "dnsmos_sig_bak_ovr": ("speechmos", "speechmos/dnsmos_models/sig_bak_ovr.onnx", {"N": 1},
                           {"input_1": _wave(1, 144160)}),
    "dnsmos_bak_ovr": ("speechmos", "speechmos/dnsmos_models/bak_ovr.onnx", {"N": 1}, {"input_1": _noise(1, 901, 161)}),
    "dnsmos_model_v8": ("speechmos", "speechmos/dnsmos_models/model_v8.onnx", {"N": 1}, {"input_1": _noise(1, 900, 120)}),
    "aecmos_1663829550": ("speechmos", "speechmos/aecmos_models/Run_1663829550_Stage_0.onnx",
                          {"batch_size": 1, "frames": 200},
                          {"input": _noise(1, 3, 200, 160, positive=True), "h0": _zeros(4, 1, 64)}),
    "aecmos_1668423760": ("speechmos", "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
                          {"batch_size": 1, "frames": 200},
                          {"input": _noise(1, 3, 200, 160, positive=True), "h0": _zeros(4, 1, 96)}),
    "plcmos_v2": ("speechmos", "speechmos/plcmos_models/plcmos_v2.onnx", {"batch_size": 1, "frames": 200},
                  {"degraded_audio": _noise(1, 1, 200, 257), "rater_embed": _noise(1, 64)}),
}
# inputs whose symbolic dims the file leaves unnamed (spox writes dims without a name): given as --input-shapes
UNNAMED_DIMS = {"silero_vad": {"input": (1, 576), "state": (2, 1, 128)}}
# the sample-rate input Silero's If nodes choose the 16 kHz or the 8 kHz weights by: fixed as --input-value (the
# compile's warning or refusal names it), so only the 16 kHz model is compiled
INPUT_VALUES = {name: {"sr": (16000,)} for name in ("silero_vad", "silero_vad_op18_ifless", "oww_silero_vad")}


def fetch(wheel_key: str, cache: Path) -> Path:
    """The wheel of `WHEELS[wheel_key]`, downloaded from PyPI into `cache` unless it is there."""
    spec = WHEELS[wheel_key]
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"), key=lambda p: p.name.lower())
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), spec],
                       check=True)
        found = sorted(cache.glob(f"{name}-*.whl"))
    return found[0]


def _speech(samples: int, rate: int, seed: int, cache: Path) -> np.ndarray:
    """`samples` of espeak-ng speech at `rate` (a seeded window into one sentence) plus faint noise."""
    path = cache / f"speech_{rate}.npy"
    if not path.exists():
        wav = cache / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True)
        with wave.open(str(wav)) as f:
            audio = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768
            source_rate = f.getframerate()
        times = np.arange(int(len(audio) * rate / source_rate)) / rate
        np.save(path, np.interp(times, np.arange(len(audio)) / source_rate, audio).astype(np.float32))
    audio = np.load(path)
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, max(1, len(audio) - samples)))
    out = np.zeros(samples, np.float32)
    segment = audio[start:start + samples]
    out[:len(segment)] = segment
    return out + rng.normal(0, 1e-3, samples).astype(np.float32)


def make_inputs(name: str, seed: int, cache: Path) -> dict:
    """One input set of model `name` (seeded)."""
    feeds = {}
    rng = np.random.default_rng(seed)
    for input_name, (kind, *spec) in MODELS[name][3].items():
        if kind == "wave":
            shape, rate, scale = spec
            value = (_speech(int(np.prod(shape)), rate, seed, cache) * scale).reshape(shape)
        elif kind == "noise":
            shape, positive = spec
            value = rng.standard_normal(shape).astype(np.float32)
            value = np.abs(value) if positive else value
        elif kind == "zeros":
            value = np.zeros(spec[0], np.float32)
        else:
            value = np.array(spec[0], np.int64)
        feeds[input_name] = value
    return feeds


def _quantize(name: str, float_path: Path, out: Path, cache: Path) -> str:
    """quantize_static as a user runs it; returns how ("per channel", or "per tensor" when ONNX Runtime refuses
    its own per-channel model)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    feeds = [make_inputs(name, seed, cache) for seed in range(CALIBRATION_INPUTS)]
    for per_channel in (True, False):
        with _quiet_root_logger():
            quantize_static(str(float_path), str(out), CalibrationFeeds(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        try:
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            return "per channel" if per_channel else "per tensor"
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's quantizer wrote a model ONNX Runtime refuses
            refusal = str(e).splitlines()[0][:200]
    raise RuntimeError(f"ONNX Runtime refuses the model its quantizer wrote: {refusal}")


def probe(name: str, out_dir: Path, cache: Path, bench: bool) -> dict:
    wheel_key, member, dims, _ = MODELS[name]
    result: dict = {"model": name}
    try:
        float_path = out_dir / f"{name}.float.onnx"
        with zipfile.ZipFile(fetch(wheel_key, cache)) as wheel:
            float_path.write_bytes(wheel.read(member))
        model = onnx.load(str(float_path))
        result["producer"] = f"{model.producer_name} {model.producer_version}".strip()
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        result["opset"] = opset
        if opset < 13:
            from onnx import version_converter

            onnx.save(version_converter.convert_version(model, 13), float_path)
        quantized = out_dir / f"{name}.qdq_u8.onnx"
        result["quantized"] = _quantize(name, float_path, quantized, cache)
        artifact = out_dir / f"{name}.host"
        started = time.perf_counter()
        _compile(quantized, artifact, dims, UNNAMED_DIMS.get(name, {}), INPUT_VALUES.get(name, {}))
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["generic_contraction_kernels"] = generic_contraction_kernels(
            json.loads((artifact / "manifest.json").read_text()))
        inputs = out_dir / f"{name}.inputs.npz"
        np.savez(inputs, **make_inputs(name, CALIBRATION_INPUTS, cache))
        result["verify"], result["verify_error"] = _verify(artifact, quantized, inputs)
        if bench:
            ratio, report = bench_ratio(quantized, artifact, float_path, dims, RunConfig(repeat=30))
            result["ratio"] = round(ratio, 3)
            result["ms"] = {e["name"]: round(e["median_ms"], 3) for e in report["engines"]}
    except Exception as e:  # noqa: BLE001 - a probe reports the first failure of each model and goes on
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["traceback"] = traceback.format_exc(limit=-3)
    return result


def _compile(model_path: Path, artifact: Path, dims: dict, input_shapes: dict, input_values: dict) -> None:
    from nativeq.compile.api import CompileConfig, compile_model

    compile_model(model_path, artifact, CompileConfig(target="host", dims=dims, input_shapes=input_shapes,
                                                      input_values=input_values), force=True)


def _verify(artifact: Path, model_path: Path, inputs: Path) -> tuple[str, str | None]:
    """(table cell, one-line failure or None) of `verify --inputs --accept-ties`."""
    from nativeq.errors import VerificationFailed
    from nativeq.verify.api import VerifyConfig, verify_artifact

    report = verify_artifact(artifact, model_path, VerifyConfig(inputs=str(inputs), accept_ties=True))
    try:
        report.raise_if_failed()
    except VerificationFailed as e:
        return "FAIL", str(e)
    if report.ties_accepted:
        return "pass (rounding ties accepted)", None
    worst = [o for o in report.outputs if o.quantized and o.max_steps is not None]
    if worst:
        return f"pass (≤{max(o.max_steps for o in worst):.3g} step)", None
    return f"pass (max diff {max(o.max_abs for o in report.outputs):.2g})", None


def markdown_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r.get('producer', '-')} | {r.get('opset', '-')} | {r['error']} | | | | |"
    ms = r.get("ms", {})
    best = min((v for k, v in ms.items() if k.startswith("ort")), default=None)
    ms_cell = f"{ms['nativeq int8 (host)']:.3f} / {best:.3f}" if best is not None else "-"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    return (f"| {r['model']} | {r['producer']} | {r['opset']} | {r['verify']} | {r['quantized']} | {r['compile_s']} "
            f"| {r['generic_contraction_kernels']} | {ms_cell} | {ratio} |")


def main(argv=None) -> int:
    return probe_main(__doc__.splitlines()[0], list(MODELS), lambda name, out, bench: probe(name, out, out, bench),
                      markdown_row, ["model", "exporter", "opset", "verify x86", "quantize_static", "compile s",
                                     "generic contraction kernels", "nativeq / ORT best ms", "ratio"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
