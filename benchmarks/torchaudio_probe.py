"""torchaudio's model implementations through nativeq: export, quantize, compile, verify, bench.

    python -m benchmarks.torchaudio_probe [--models conformer,emformer] [--out DIR] [--no-bench]

torchaudio is not a nativeq dependency: the probe fetches its wheel with `pip download --no-deps` into a cache
directory and imports its pure-Python models only (`torchaudio.models`, without its compiled extension, which is
built for another torch). Each model is torchaudio's reference implementation (Meta's code, written apart from
nativeq) built from a small config with random weights, wrapped to take one tensor and return one, then run as
the Hugging Face probe runs its models (`benchmarks.transformers_probe`): exported by `torch.onnx.export` with a
symbolic length where the architecture allows, checked against PyTorch, quantized by `quantize_static` (QDQ, per
channel, u8 activations, s8 weights), compiled for the host, verified at 200 frames with rounding ties accepted and
benched against ONNX Runtime's best. Prints one Markdown row per model (docs/zoo.md, "An eighth probe set").
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.transformers_probe import HEADER, markdown_row, probe_module
from benchmarks.zoo.run import probe_main

TORCHAUDIO = "torchaudio==2.11.1"
CACHE = Path.home() / ".cache" / "nativeq" / "torchaudio-probe"


def _torchaudio_models():
    """`torchaudio.models`, from a wheel unpacked into `CACHE` (its compiled extension removed: the models are
    plain torch modules)."""
    site = CACHE / TORCHAUDIO.replace("==", "-")
    if not (site / "torchaudio").is_dir():
        wheels = CACHE / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), TORCHAUDIO],
                       check=True)
        wheel = next(wheels.glob("torchaudio-*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       check=True)
        for library in (site / "torchaudio" / "lib").glob("*.so"):
            library.unlink()
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    return importlib.import_module("torchaudio.models")


class _Lengths(torch.nn.Module):
    """`model.<method>(x, lengths)` with every batch element full length (x [B, T, ...]) -> the first output: the
    forward of a Conformer or Emformer, an Emformer RNN-T's `transcribe` (time reduction, Emformer, output linear and
    LayerNorm)."""

    def __init__(self, model, method: str = "forward"):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        return getattr(self.model, self.method)(x, lengths)[0]


class _First(torch.nn.Module):
    """`model(x)` -> its first output (a tuple's first tensor, or the tensor)."""

    def __init__(self, model, unsqueeze: int | None = None):
        super().__init__()
        self.model, self.unsqueeze = model, unsqueeze

    def forward(self, x):
        out = self.model(x if self.unsqueeze is None else x.unsqueeze(self.unsqueeze))
        return out[0] if isinstance(out, (tuple, list)) else out


def _models() -> dict:
    """name -> (builder, input kind), kinds as in `benchmarks.transformers_probe`."""
    models = _torchaudio_models()
    small = dict(num_heads=4, ffn_dim=576, num_layers=2)
    # Conformer takes the longest length as a Python int (`lengths.max().item()`) for its padding mask, Emformer builds
    # its block attention mask in Python loops over the length: the exporter records both as constants, so these are
    # exported at a static length
    return {
        "conformer": (lambda: _Lengths(models.Conformer(input_dim=144, **small, depthwise_conv_kernel_size=31)),
                      (1, 200, 144)),
        "conformer_group_norm_conv_first": (lambda: _Lengths(models.Conformer(
            input_dim=144, **small, depthwise_conv_kernel_size=15, use_group_norm=True, convolution_first=True)),
            (1, 200, 144)),
        "emformer": (lambda: _Lengths(models.Emformer(
            input_dim=144, **small, segment_length=16, left_context_length=32, right_context_length=4,
            max_memory_size=4, tanh_on_mem=True)), (1, 204, 144)),
        "emformer_rnnt_transcriber": (lambda: _Lengths(models.emformer_rnnt_model(
            input_dim=80, encoding_dim=256, num_symbols=64, segment_length=16, right_context_length=4,
            time_reduction_input_dim=128, time_reduction_stride=4, transformer_num_heads=4, transformer_ffn_dim=576,
            transformer_num_layers=2, transformer_dropout=0.0, transformer_activation="gelu",
            transformer_left_context_length=30, transformer_max_memory_size=0,
            transformer_weight_init_scale_strategy="depthwise", transformer_tanh_on_mem=True, symbol_embedding_dim=128,
            num_lstm_layers=2, lstm_layer_norm=True, lstm_layer_norm_epsilon=1e-3, lstm_dropout=0.0),
            "transcribe"), (1, 204, 80)),
        "conv_tasnet": (lambda: _First(models.ConvTasNet(
            num_sources=2, enc_kernel_size=16, enc_num_feats=128, msk_kernel_size=3, msk_num_feats=64,
            msk_num_hidden_feats=128, msk_num_layers=4, msk_num_stacks=2), unsqueeze=1), "S"),
        "deepspeech": (lambda: _First(models.DeepSpeech(n_feature=80, n_hidden=256, n_class=32), unsqueeze=1), "T80"),
        "wav2letter_mfcc": (lambda: _First(models.Wav2Letter(num_classes=32, input_type="mfcc", num_features=80)),
                            "F80"),
        "wav2letter_waveform": (lambda: _First(models.Wav2Letter(num_classes=32, input_type="waveform"),
                                               unsqueeze=1), "S"),
        "squim_objective": (lambda: _First(models.squim_objective_model(
            feat_dim=128, win_len=64, d_model=128, nhead=4, hidden_dim=128, num_blocks=2, rnn_type="LSTM",
            chunk_size=71)), "S"),
    }


def probe(name: str, out_dir: Path, bench: bool) -> dict:
    builder, kind = _models()[name]
    return probe_module(name, builder, kind, out_dir, bench)


def main(argv=None) -> int:
    return probe_main(__doc__.splitlines()[0], list(_models()), probe, markdown_row, HEADER, argv)


if __name__ == "__main__":
    raise SystemExit(main())
