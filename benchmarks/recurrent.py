"""Benchmark recurrent models: QDQ Linear -> LSTM / GRU -> Linear, nativeq next to ONNX Runtime.

    .venv/bin/python benchmarks/recurrent.py [--out benchmarks/out] [--hidden 64] [--threads 2] [--T 200,1000]

Builds two torch models, `Linear(40 -> H) -> ReLU -> LSTM(H, H) -> Linear(H -> 10)` and the same
with a GRU, exports them with a symbolic time axis and quantizes them with ORT's
`quantize_static` (QDQ, per-channel int8 weights, uint8 activations; the recurrent node stays
float, as ORT leaves it). Each model is compiled for the host once; then, per T, `nativeq bench`
times the artifact and ORT (QDQ with all / no graph optimizations) in one run, interleaved, same
threads. Prints median latencies and the ratio nativeq / ORT (< 1 means nativeq is faster).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

FEATS, CLASSES = 40, 10


def recurrent_module(cell: str, hidden: int, seed: int = 0):
    """Linear -> ReLU -> LSTM or GRU (batch-first) -> Linear, eval mode."""
    import torch
    from torch import nn

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(FEATS, hidden)
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](hidden, hidden, batch_first=True)
            self.out = nn.Linear(hidden, CLASSES)

        def forward(self, x):  # [1, T, 40] -> [1, T, 10]
            return self.out(self.rnn(torch.relu(self.inp(x)))[0])

    torch.manual_seed(seed)
    return Recurrent().eval()


def export(out: Path, cell: str, hidden: int) -> Path:
    """Write `{cell}_float.onnx` and `{cell}_qdq.onnx` to `out`; return the QDQ path."""
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out.mkdir(parents=True, exist_ok=True)
    float_path, qdq_path = out / f"{cell}_float.onnx", out / f"{cell}_qdq.onnx"
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(recurrent_module(cell, hidden), (torch.randn(1, 50, FEATS),), buf, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {1: "T"}, "y": {1: "T"}}, opset_version=17,
                          dynamo=False)
    onnx.save(onnx.load_from_string(buf.getvalue()), float_path)

    class RandomFeatures(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self._batches = iter([{"x": rng.normal(0, 1, (1, t, FEATS)).astype(np.float32)} for t in (50, 120, 200)])

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(float_path), str(qdq_path), RandomFeatures(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq_path


def compile_artifact(qdq_path: Path) -> Path:
    from nativeq.compile.api import CompileConfig, compile_model

    artifact = qdq_path.with_suffix("")
    compile_model(qdq_path, artifact, CompileConfig(target="host"), force=True)
    return artifact


def bench(qdq_path: Path, artifact: Path, steps: int, args) -> dict:
    """`nativeq bench --json` of the artifact at T=steps (nativeq and ORT interleaved in one run)."""
    exe = Path(sys.executable).with_name("nativeq")
    cmd = [str(exe), "bench", str(qdq_path), "--artifact", str(artifact), "--dim", f"T={steps}", "--threads",
           str(args.threads), "--repeat", str(args.repeat), "--burst", str(args.burst), "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--T", default="200,1000")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--burst", type=int, default=1, help="timed runs per turn (see `nativeq bench --help`)")
    args = p.parse_args()

    models = {}
    for cell in args.cells.split(","):
        qdq_path = export(Path(args.out), cell, args.hidden)
        models[cell] = (qdq_path, compile_artifact(qdq_path))

    print(f"threads {args.threads}, hidden {args.hidden}, medians of {args.repeat} interleaved turns")
    print(f"{'model':6} {'T':>5} {'nativeq ms':>11} {'ORT ms':>8} {'ORT noopt ms':>13} {'nativeq/ORT':>12} {'nativeq/noopt':>14}")
    for cell, (qdq_path, artifact) in models.items():
        for steps in (int(t) for t in args.T.split(",")):
            report = bench(qdq_path, artifact, steps, args)
            median = {e["name"]: e["median_ms"] for e in report["engines"]}
            ours = next(v for k, v in median.items() if k.startswith("nativeq"))
            ort_all, ort_none = median["ort qdq (opt all)"], median["ort qdq (opt disabled)"]
            print(f"{cell:6} {steps:5d} {ours:11.3f} {ort_all:8.3f} {ort_none:13.3f} {ours / ort_all:11.2f}x "
                  f"{ours / ort_none:13.2f}x", flush=True)


if __name__ == "__main__":
    main()
