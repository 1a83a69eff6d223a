"""Hugging Face `transformers` speech models through nativeq: export, quantize, compile, verify, bench.

    pip install transformers        # not a nativeq dependency: the probe's only extra
    python -m benchmarks.transformers_probe [--models wav2vec2,parakeet_ctc] [--out DIR] [--no-bench]

Each model is its library's reference implementation built from a small random config (hidden 144, 4 heads, 2
layers, FFN 576; waveform models with seven 128-channel feature-encoder convs), wrapped to return its logits (or its
encoder's last hidden state), exported by `torch.onnx.export` (TorchScript, the dynamo exporter where that one fails)
with a symbolic length and checked against PyTorch at another length, quantized by `quantize_static` (QDQ, per
channel, u8 activations, s8 weights), compiled for the host, verified at 200 frames (32,000 samples) with rounding
ties accepted, and benched against ONNX Runtime's best at T=200 and T=1000 (`nativeq bench`, 2 threads, 20 runs per
engine). Prints one Markdown row per model (the table of docs/zoo.md, "A sixth probe set").
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.zoo.models import OnnxIO, export_dynamo_onnx, export_float_onnx
from benchmarks.zoo.quantize import CalibrationFeeds, quantize_model
from benchmarks.zoo.run import RunConfig, bench_ratio, compile_for, generic_contraction_kernels, probe_main, verify_cell

SAMPLES_PER_FRAME = 160
CALIBRATION_FRAMES = (64, 100, 150)
# models whose position computation (from shapes only) ONNX Runtime's calibrator gives an infinite scale (the log
# of a zero offset): quantized with those nodes left out, as a user would after nativeq names the tensor
SHAPE_ONLY_LEFT_FLOAT = ("wavlm",)


class _Output(torch.nn.Module):
    """`model(x)` (or `model(input_features=x)`) -> one tensor of its output."""

    def __init__(self, model, key: str = "logits", keyword: str | None = None):
        super().__init__()
        self.model, self.key, self.keyword = model, key, keyword

    def forward(self, x):
        out = self.model(**{self.keyword: x}) if self.keyword else self.model(x)
        return getattr(out, self.key)


def _models() -> dict:
    """name -> (builder, input kind): "S" waveform [1, S], "T80" / "T160" features [1, T, C], or a static shape."""
    import transformers as tf

    small = dict(hidden_size=144, num_hidden_layers=2, num_attention_heads=4, intermediate_size=576)
    wave = dict(small, conv_dim=(128,) * 7, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=16,
                vocab_size=32)
    seq2seq = dict(d_model=144, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=576, decoder_layers=1,
                   decoder_attention_heads=4, decoder_ffn_dim=576)
    return {
        "wav2vec2": (lambda: _Output(tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(**wave))), "S"),
        "wav2vec2_large_lv60": (lambda: _Output(tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(
            **wave, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True))), "S"),
        "hubert": (lambda: _Output(tf.HubertForCTC(tf.HubertConfig(**wave))), "S"),
        "wavlm": (lambda: _Output(tf.WavLMForCTC(tf.WavLMConfig(**wave, num_buckets=64, max_bucket_distance=200))),
                  "S"),
        "data2vec_audio": (lambda: _Output(tf.Data2VecAudioForCTC(tf.Data2VecAudioConfig(
            **dict(wave, num_conv_pos_embeddings=5)))), "S"),
        "unispeech_sat": (lambda: _Output(tf.UniSpeechSatForCTC(tf.UniSpeechSatConfig(**wave))), "S"),
        "sew": (lambda: _Output(tf.SEWForCTC(tf.SEWConfig(**dict(wave, conv_dim=(64,) * 13), squeeze_factor=2))), "S"),
        "sew_d": (lambda: _Output(tf.SEWDForCTC(tf.SEWDConfig(**dict(wave, conv_dim=(64,) * 13), squeeze_factor=2,
                                                             max_position_embeddings=512, position_buckets=64))), "S"),
        "w2v_conformer_rel": (lambda: _Output(tf.Wav2Vec2ConformerForCTC(tf.Wav2Vec2ConformerConfig(
            **wave, position_embeddings_type="relative", conv_depthwise_kernel_size=15))), "S"),
        "w2v_conformer_rotary": (lambda: _Output(tf.Wav2Vec2ConformerForCTC(tf.Wav2Vec2ConformerConfig(
            **wave, position_embeddings_type="rotary", conv_depthwise_kernel_size=15))), "S"),
        "w2v_bert": (lambda: _Output(tf.Wav2Vec2BertForCTC(tf.Wav2Vec2BertConfig(
            **small, vocab_size=32, feature_projection_input_dim=160, conv_depthwise_kernel_size=15,
            position_embeddings_type="relative_key", left_max_position_embeddings=64,
            right_max_position_embeddings=8)), keyword="input_features"), "T160"),
        "whisper_encoder": (lambda: _Output(tf.WhisperModel(tf.WhisperConfig(
            **seq2seq, num_mel_bins=80, max_source_positions=100)).encoder, "last_hidden_state", "input_features"),
            (1, 80, 200)),
        "speech2text": (lambda: _Output(tf.Speech2TextModel(tf.Speech2TextConfig(
            **seq2seq, input_feat_per_channel=80, max_source_positions=1500, conv_channels=256)).encoder,
            "last_hidden_state", "input_features"), "T80"),
        "parakeet_ctc": (lambda: _Output(tf.ParakeetForCTC(tf.ParakeetCTCConfig(encoder_config=tf.ParakeetEncoderConfig(
            **small, num_mel_bins=80, subsampling_conv_channels=64, conv_kernel_size=9).to_dict(), vocab_size=32)),
            keyword="input_features"), "T80"),
        "lasr_ctc": (lambda: _Output(tf.LasrForCTC(tf.LasrCTCConfig(encoder_config=tf.LasrEncoderConfig(
            **small, num_key_value_heads=4, num_mel_bins=80, subsampling_conv_channels=64,
            conv_kernel_size=15).to_dict(), vocab_size=32)), keyword="input_features"), "T80"),
        "moonshine_encoder": (lambda: _Output(tf.MoonshineModel(tf.MoonshineConfig(
            hidden_size=144, intermediate_size=576, encoder_num_hidden_layers=2, decoder_num_hidden_layers=1,
            encoder_num_attention_heads=4, decoder_num_attention_heads=4)).encoder, "last_hidden_state"), "S"),
        "ast": (lambda: _Output(tf.ASTForAudioClassification(tf.ASTConfig(
            **small, max_length=200, num_mel_bins=64, num_labels=10))), (1, 200, 64)),
    }


def _shape(kind, frames: int) -> tuple[list[int], dict, float]:
    """(input shape, symbolic axes, input scale) of an input `frames` 10 ms frames long: kind "S" a waveform
    [1, S], "T80" features [1, T, 80], "F80" features channels first [1, 80, T], a tuple a static shape."""
    if kind == "S":
        return [1, SAMPLES_PER_FRAME * frames], {1: "S"}, 0.1
    if isinstance(kind, str) and kind.startswith("F"):
        return [1, int(kind[1:]), frames], {2: "T"}, 1.0
    if isinstance(kind, str):
        return [1, frames, int(kind[1:])], {1: "T"}, 1.0
    return list(kind), {}, 1.0


def _dims(kind, frames: int) -> dict:
    return {} if not isinstance(kind, str) else ({"S": SAMPLES_PER_FRAME * frames} if kind == "S" else {"T": frames})


def _export(module, kind, path: Path) -> str:
    shape, axes, scale = _shape(kind, 100)
    example = torch.randn(*shape) * scale
    try:
        path.write_bytes(export_float_onnx(module, example, OnnxIO("x", "y", {"x": axes, "y": {1: "N"}} if axes else {})))
        return "torchscript"
    except Exception:  # noqa: BLE001 - the exporter torch uses by default is the user's next try
        path.write_bytes(export_dynamo_onnx(module, example, "x", axes))
        return "dynamo"


def _float_parity(module, kind, path: Path) -> float:
    shape, axes, scale = _shape(kind, 123 if _dims(kind, 1) else 100)
    x = torch.randn(*shape) * scale
    with torch.no_grad():
        expected = module(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    return float(np.abs(expected - got).max())


def _quantize(name: str, kind, float_path: Path, out: Path) -> None:
    feeds = [{"x": (np.random.default_rng(i).standard_normal(_shape(kind, f)[0]) * _shape(kind, f)[2]).astype(np.float32)}
             for i, f in enumerate(CALIBRATION_FRAMES if _dims(kind, 1) else (100, 100))]
    if name not in SHAPE_ONLY_LEFT_FLOAT:
        onnx.save(quantize_model("qdq_u8_pc", float_path, feeds), out)
        return
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(float_path))
    from_data = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type != "Shape" and any(i in from_data for i in node.input):
            from_data.update(node.output)
    shape_only = [n.name for n in model.graph.node if not any(o in from_data for o in n.output)]
    quantize_static(str(float_path), str(out), CalibrationFeeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=shape_only)


def probe(name: str, out_dir: Path, bench: bool) -> dict:
    builder, kind = _models()[name]
    return probe_module(name, builder, kind, out_dir, bench)


def probe_module(name: str, builder, kind, out_dir: Path, bench: bool) -> dict:
    """Export `builder()` (a torch module taking one tensor of `kind`), quantize, compile for the host, verify and
    (with `bench`) bench it; a dict of what was measured, or of the first failure ("error", "traceback")."""
    result: dict = {"model": name}
    try:
        torch.manual_seed(0)
        module = builder().eval()
        float_path, quantized = out_dir / f"{name}.float.onnx", out_dir / f"{name}.qdq_u8_pc.onnx"
        result["exporter"] = _export(module, kind, float_path)
        result["float_parity"] = _float_parity(module, kind, float_path)
        _quantize(name, kind, float_path, quantized)
        artifact = out_dir / f"{name}.host"
        started = time.perf_counter()
        compile_for(quantized, artifact, "host")
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["generic_contraction_kernels"] = generic_contraction_kernels(
            json.loads((artifact / "manifest.json").read_text()))
        result["verify"], result["verify_error"], _ = verify_cell(artifact, quantized, _dims(kind, 200))
        if bench:
            for frames in ((200, 1000) if _dims(kind, 1) else (200,)):
                ratio, report = bench_ratio(quantized, artifact, float_path, _dims(kind, frames), RunConfig())
                result[f"ratio_{frames}"] = round(ratio, 3)
                result[f"ms_{frames}"] = {e["name"]: round(e["median_ms"], 3) for e in report["engines"]}
    except Exception as e:  # noqa: BLE001 - a probe reports the first failure of each model and goes on
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["traceback"] = traceback.format_exc(limit=-3)
    return result


def markdown_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r.get('exporter', '-')} | {r['error']} | | | | | |"
    ms = r.get("ms_200", {})
    engines = ("nativeq int8 (host)", "ort qdq (opt all)", "ort fp32 (opt all)")
    ms_cell = " / ".join(f"{ms[e]:.2f}" for e in engines) if all(e in ms for e in engines) else "-"
    ratio = lambda key: f"{r[key]:.2f}x" if key in r else "-"  # noqa: E731
    return (f"| {r['model']} | {r['exporter']} | {r['verify']} | {r['compile_s']} | {r['generic_contraction_kernels']} "
            f"| {ms_cell} | {ratio('ratio_200')} | {ratio('ratio_1000')} |")


# the columns of `markdown_row`
HEADER = ["model", "exporter", "verify x86", "compile s", "generic contraction kernels",
          "T=200: nativeq / ORT QDQ / ORT float ms", "ratio T=200", "ratio T=1000"]


def main(argv=None) -> int:
    return probe_main(__doc__.splitlines()[0], list(_models()), probe, markdown_row, HEADER, argv)


if __name__ == "__main__":
    raise SystemExit(main())
