"""Benchmark encoder: conv subsampling + 4 transformer blocks (d=144), ORT quantize_static QDQ.

    .venv/bin/python benchmarks/encoder.py [--out benchmarks/out] [--d 144] [--blocks 4] [--threads 2] [--T 200,1000]

Writes `encoder_float.onnx` and `encoder_qdq.onnx` (per-channel int8 weights, uint8 activations,
calibrated on random features) to --out, then runs `nativeq bench` on the QDQ model at each T:
compiled int8 (untuned, default schedules) next to ORT on the QDQ and float models, same threads.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

FEATS = 80


def encoder_module(d: int, blocks: int, heads: int = 4, vocab: int = 256, seed: int = 0):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            split = lambda z: z.reshape(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
            att = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
            x = x + self.proj((att @ split(v)).transpose(1, 2).reshape(b, t, d))
            return x + self.ff_out(nn.functional.gelu(self.ff_in(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub1 = nn.Conv1d(FEATS, d, kernel_size=3, stride=2, padding=1)
            self.sub2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.head = nn.Linear(d, vocab)

        def forward(self, feats):  # [1, T, 80] -> [1, T/4, vocab]
            x = torch.relu(self.sub2(torch.relu(self.sub1(feats.transpose(1, 2))))).transpose(1, 2)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    torch.manual_seed(seed)
    return Encoder().eval()


def export(out: Path, d: int, blocks: int) -> tuple[Path, Path]:
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out.mkdir(parents=True, exist_ok=True)
    float_path, qdq_path = out / "encoder_float.onnx", out / "encoder_qdq.onnx"
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder_module(d, blocks), (torch.randn(1, 200, FEATS),), buf, input_names=["feats"],
                          output_names=["logits"], dynamic_axes={"feats": {1: "T"}, "logits": {1: "T_out"}},
                          opset_version=17, dynamo=False)
    onnx.save(onnx.load_from_string(buf.getvalue()), float_path)

    class RandomFeatures(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self._batches = iter([{"feats": rng.normal(0, 1, (1, t, FEATS)).astype(np.float32)} for t in (120, 200, 320)])

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(float_path), str(qdq_path), RandomFeatures(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return float_path, qdq_path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--d", type=int, default=144)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--T", default="200,1000")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    float_path, qdq_path = export(Path(args.out), args.d, args.blocks)
    exe = Path(sys.executable).with_name("nativeq")
    for t in args.T.split(","):
        cmd = [str(exe), "bench", str(qdq_path), "--float-onnx", str(float_path), "--dim", f"T={t}",
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
