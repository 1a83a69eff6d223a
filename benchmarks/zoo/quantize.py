"""The ways users quantize a float ONNX model, as named quantizers of the zoo.

ONNX Runtime (`onnxruntime.quantization`), called the way `tests/qdq_models.py` calls it:

    qdq_u8_pc   quantize_static, QDQ, uint8 activations, int8 weights per channel
    qdq_u8_pt   quantize_static, QDQ, uint8 activations, int8 weights per tensor
    qdq_s8_pc   quantize_static, QDQ, int8 activations, int8 weights per channel
    qoperator   quantize_static, QOperator (QLinearConv / QLinearMatMul / com.microsoft QLinear*),
                uint8 activations, int8 weights per channel
    dynamic     quantize_dynamic: DynamicQuantizeLinear + MatMulInteger (and DynamicQuantizeLSTM);
                convolutions stay float

Options users pass to quantize_static (QDQ, per channel, uint8 activations otherwise), run only when asked for
with `--quantizers` (`registry.OPTION_QUANTIZERS`):

    qdq_int4          weight_type=QInt4: below opset 21 ORT writes contrib-domain (com.microsoft) Q/DQ
    qdq_a16w8         activation_type=QUInt16: 16-bit activations, int8 weights
    qdq_weight_pairs  extra_options={"AddQDQPairToWeight": True}: float weights behind a Q/DQ pair (the
                      encoding NNCF and PyTorch's PT2E export write too)

and nativeq's own path for the shipped model:

    qat         nativeq's integer QAT model (`qat.quantize.quantize_` with the `nativeq finetune`
                defaults), scales calibrated on random features (the `--calibrate-only` recipe:
                no speech data needed), written by `nativeq export` (`qat.finetune.export_run`)

Static quantizers calibrate on a few seeded random inputs (`CalibrationFeeds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from nativeq.errors import NativeqError

# ORT's dynamic quantizer also knows Conv (ConvInteger, uint8 weights only on CPU), Attention and
# Gather; the zoo quantizes what users quantize dynamically in acoustic models.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm", "LSTM")


@dataclass(frozen=True)
class StaticQuantizer:
    """`quantize_static` with calibration: format "qdq" or "qoperator", activation "uint8", "int8" or "uint16",
    weight "int8" or "int4"; weight_pairs: float weights behind a Q/DQ pair (`AddQDQPairToWeight`)."""

    quant_format: str
    activation: str
    per_channel: bool
    weight: str = "int8"
    weight_pairs: bool = False

    def quantize(self, float_path: Path, out_path: Path, feeds: list[dict]) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        quantize_static(
            str(float_path), str(out_path), CalibrationFeeds(feeds),
            quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[self.quant_format],
            per_channel=self.per_channel,
            activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8,
                             "uint16": QuantType.QUInt16}[self.activation],
            weight_type={"int8": QuantType.QInt8, "int4": QuantType.QInt4}[self.weight],
            extra_options={"AddQDQPairToWeight": True} if self.weight_pairs else None,
        )


@dataclass(frozen=True)
class DynamicQuantizer:
    """`quantize_dynamic` (weights int8 per tensor, activations quantized at run time)."""

    op_types: tuple[str, ...] = DYNAMIC_OP_TYPES

    def quantize(self, float_path: Path, out_path: Path, feeds: list[dict]) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(float_path), str(out_path), op_types_to_quantize=list(self.op_types),
                         weight_type=QuantType.QInt8)


@dataclass(frozen=True)
class NativeqQat:
    """nativeq's integer model of a shipped float model, calibrated on `feeds`, exported by `export_run`."""

    source: str = "conformer-tiny"

    def quantize(self, float_path: Path, out_path: Path, feeds: list[dict]) -> None:
        export_nativeq_qat(self.source, out_path, [next(iter(f.values())) for f in feeds])


QUANTIZERS = {
    "qdq_u8_pc": StaticQuantizer("qdq", "uint8", per_channel=True),
    "qdq_u8_pt": StaticQuantizer("qdq", "uint8", per_channel=False),
    "qdq_s8_pc": StaticQuantizer("qdq", "int8", per_channel=True),
    "qoperator": StaticQuantizer("qoperator", "uint8", per_channel=True),
    "dynamic": DynamicQuantizer(),
    "qat": NativeqQat(),
    "qdq_int4": StaticQuantizer("qdq", "uint8", per_channel=True, weight="int4"),
    "qdq_a16w8": StaticQuantizer("qdq", "uint16", per_channel=True),
    "qdq_weight_pairs": StaticQuantizer("qdq", "uint8", per_channel=True, weight_pairs=True),
}


def get_quantizer(name: str):
    if name not in QUANTIZERS:
        raise NativeqError(f"unknown zoo quantizer {name!r}; choose one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]


def describe(quantizer) -> dict:
    """The quantizer's settings as plain data (part of the cache key)."""
    return {"type": type(quantizer).__name__, **dataclasses.asdict(quantizer)}


class CalibrationFeeds(CalibrationDataReader):
    """ORT's CalibrationDataReader over a fixed list of input dicts (seeded by the caller)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = list(feeds)
        self._iter = iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._feeds)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs to the root logger: a warning per int64 shape tensor it skips and
    a reminder to run its pre-processing. Neither is news for the zoo."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_model(quantizer_name: str, float_path: Path, feeds: list[dict]) -> onnx.ModelProto:
    """Quantize the float model at `float_path` with the named quantizer; returns the checked ModelProto."""
    quantizer = get_quantizer(quantizer_name)
    with tempfile.TemporaryDirectory(prefix="nativeq-zoo-quantize-") as tmp, _quiet_root_logger():
        out = Path(tmp) / "quantized.onnx"
        quantizer.quantize(Path(float_path), out, feeds)
        model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------- nativeq QAT (shipped model)
def export_nativeq_qat(source: str, out_path: Path, features: list[np.ndarray]) -> None:
    """`source` (shipped model or float run) -> nativeq QAT model calibrated on `features` -> `nativeq export`.

    Mirrors `nativeq finetune --calibrate-only` (quantize_, calibrate, save_run) with random
    features in place of a speech corpus, then calls `export_run` as `nativeq export` does.
    """
    import torch

    from nativeq.models.pretrained import load_model
    from nativeq.models.train import save_run
    from nativeq.qat.finetune import ExportRunConfig, FinetuneConfig, example_features, export_run
    from nativeq.qat.quantize import calibrate, quantize_

    recipe = FinetuneConfig(source=source)
    quant = recipe.quant_config()
    model, _ = load_model(source)
    quantize_(model, quant, example_inputs=example_features(model))
    calibrate(model, ((torch.from_numpy(f),) for f in features))
    qat = {"quant": dataclasses.asdict(quant), "sparsity": None, "source": source}
    with tempfile.TemporaryDirectory(prefix="nativeq-zoo-qat-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        save_run(run, model, {"qat": qat})
        export_run(ExportRunConfig(run=str(run), out=str(out_path), force=True))
