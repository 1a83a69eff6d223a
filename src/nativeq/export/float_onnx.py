"""`nativeq export-float`: the float Conformer encoder as ONNX, checked against PyTorch in ORT.

Graph contract: input `feats` float32 [B, T, 80] (log-mel from `nativeq.models.features.fbank`,
the front end stays outside the graph), output `logits` float32 [B, T', V] with
T' = ((T - 1) // 2 - 1) // 2; B and T are symbolic. Greedy CTC decoding is argmax over V.
After writing, the file is run in ONNX Runtime at two sequence lengths and compared with
PyTorch; a difference above `tol` is an error (the file is then not written).
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import torch

from nativeq._fs import write_bytes_atomic
from nativeq.errors import NativeqError

INPUT_NAME = "feats"
OUTPUT_NAME = "logits"


@dataclasses.dataclass(frozen=True)
class FloatExportConfig:
    opset: int = 17
    check_lengths: tuple[int, ...] = (200, 317)  # frames fed to the parity check
    tol: float = 1e-4


class _Encoder(torch.nn.Module):
    """The model without the lengths argument: one utterance batch without padding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats):
        return self.model(feats)[0]


def export_float_model(model, cfg: FloatExportConfig = FloatExportConfig()) -> bytes:
    """Serialized ONNX of `model` (ConformerCTC) with symbolic batch and time axes."""
    model = model.eval()
    example = torch.randn(1, max(cfg.check_lengths), model.config.n_mels)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            _Encoder(model).eval(), (example,), buf, dynamo=False, opset_version=cfg.opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "B", 1: "T"}, OUTPUT_NAME: {0: "B", 1: "T_out"}},
        )
    return buf.getvalue()


def check_parity(model, onnx_bytes: bytes, cfg: FloatExportConfig = FloatExportConfig()) -> float:
    """Max |ORT - PyTorch| of the logits over cfg.check_lengths (seeded random features)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    model = model.eval()
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for t in cfg.check_lengths:
        feats = torch.randn(2, t, model.config.n_mels, generator=gen) * 3 + 8
        with torch.no_grad():
            ref = model(feats)[0].numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: feats.numpy()})[0]
        if got.shape != ref.shape:
            raise NativeqError(f"exported ONNX gives {got.shape} at T={t}, PyTorch {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def export_float(run_or_name: str | os.PathLike, out: str | os.PathLike, cfg: FloatExportConfig = FloatExportConfig()) -> dict:
    """Export a run directory or shipped model to `out`; returns {"path", "max_abs_diff", "opset"}."""
    from nativeq.models.pretrained import load_model

    model, _ = load_model(run_or_name)
    data = export_float_model(model, cfg)
    diff = check_parity(model, data, cfg)
    if diff > cfg.tol:
        raise NativeqError(f"exported ONNX differs from PyTorch by {diff:.2e} (> {cfg.tol:g}); not written")
    write_bytes_atomic(out, data)
    return {"path": str(out), "max_abs_diff": diff, "opset": cfg.opset, "lengths": list(cfg.check_lengths)}
