"""Benchmark: a whole QDQ model compiled with compressed weights (4-bit packed, block-sparse) against
its dense 8-bit build, side by side in one run.

    .venv/bin/python -m benchmarks.sparse_model MODEL.onnx [--prune 0.5] [--target host] [--threads 2]
        [--dim T=300] [--seconds 5] [--json]

MODEL is a QDQ ONNX file (e.g. `nativeq export` of a run fine-tuned with `--sparsity 16x4b:0.5`). With
`--prune S` every MatMul weight initializer behind a DequantizeLinear is first pruned by magnitude in
the kernel-friendly pattern (16 outputs x 4 inputs blocks, the same number kept per 16 outputs) to
sparsity S: random-accuracy, but the same operators and density as a trained model, for speed and
size only. Both builds (`nativeq compile` with and without `--dense-weights`) must give identical
outputs; the script prints their latency (interleaved turns, median), `model.so` size and weight
bytes (manifest `sizes`), and the speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prune", type=float, default=None, help="prune MatMul weights to this block sparsity first")
    p.add_argument("--target", default="host")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", action="append", default=[], help="symbolic input size, e.g. T=300 (repeatable)")
    p.add_argument("--seconds", type=float, default=5.0, help="time budget per build")
    p.add_argument("--keep", default=None, help="directory to keep the pruned model and the two artifacts in")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


ARGS = _parse()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

def prune_matmul_weights(model: onnx.ModelProto, sparsity: float) -> int:
    """Prune every MatMul weight ([K, N] behind a DequantizeLinear) by the training's own rule
    (`qat.sparsity.compute_mask`, "16x4b" on the [out, in] view: magnitude-ranked 16x4 blocks, the same
    number kept in every band of 16 outputs); returns how many weights were pruned. INT4 stays INT4."""
    import torch

    from nativeq.qat.sparsity import SparsityConfig, compute_mask

    config = SparsityConfig("16x4b", sparsity=sparsity)
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    pruned = 0
    for node in model.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        init = inits[dq.input[0]]
        w = numpy_helper.to_array(init)
        if w.ndim != 2:
            continue
        mask = compute_mask(torch.from_numpy(w.T.astype(np.float32)), config, sparsity).numpy().T
        pruned += int(np.count_nonzero(w * (1 - mask)))
        values = (w * mask).astype(w.dtype)
        init.CopyFrom(onnx.helper.make_tensor(init.name, init.data_type, list(init.dims), values.flatten().tolist()))
    return pruned


def time_interleaved(models: dict, feeds: dict, seconds: float) -> dict[str, float]:
    """Median seconds per run of each loaded model, alternating turns so both see the same machine."""
    times = {name: [] for name in models}
    for model in models.values():
        model.run(feeds)
    end = time.perf_counter() + seconds * len(models)
    while time.perf_counter() < end or min(len(t) for t in times.values()) < 10:
        for name, model in models.items():
            t0 = time.perf_counter()
            model.run(feeds)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    import nativeq
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime.profile import random_inputs

    work = Path(ARGS.keep) if ARGS.keep else Path(tempfile.mkdtemp(prefix="nativeq-sparse-"))
    work.mkdir(parents=True, exist_ok=True)
    model_path = Path(ARGS.model)
    if ARGS.prune is not None:
        model = onnx.load(model_path)
        pruned = prune_matmul_weights(model, ARGS.prune)
        model_path = work / f"{model_path.stem}.blocks{ARGS.prune:g}.onnx"
        onnx.save(model, model_path)
        print(f"pruned {pruned} weights -> {model_path}", file=sys.stderr)
    dims = dict(item.split("=") for item in ARGS.dim)
    dims = {name: int(value) for name, value in dims.items()}
    builds, sizes = {}, {}
    for name, dense in (("dense int8", True), ("compressed", False)):
        out = work / ("dense" if dense else "compressed")
        result = compile_model(model_path, out, CompileConfig(target=ARGS.target, dense_weights=dense), force=True,
                               progress=False)
        builds[name] = nativeq.load(out, threads=ARGS.threads)
        sizes[name] = result.manifest.get("sizes", {})
    feeds = random_inputs(builds["dense int8"].inputs, dims, seed=0)
    outputs = {name: model.run(feeds) for name, model in builds.items()}
    for key in outputs["dense int8"]:
        if not np.array_equal(outputs["dense int8"][key], outputs["compressed"][key]):
            sys.exit(f"output {key}: the compressed build differs from the dense one")
    latency = time_interleaved(builds, feeds, ARGS.seconds)
    record = {
        "model": str(ARGS.model), "prune": ARGS.prune, "target": ARGS.target, "threads": ARGS.threads, "dims": dims,
        "dense_ms": round(latency["dense int8"] * 1e3, 3), "compressed_ms": round(latency["compressed"] * 1e3, 3),
        "speedup": round(latency["dense int8"] / latency["compressed"], 3),
        "dense_sizes": sizes["dense int8"], "compressed_sizes": sizes["compressed"],
    }
    if ARGS.json:
        print(json.dumps(record))
        return
    mb = 1e6
    print(f"{ARGS.model} ({'pruned to ' + format(ARGS.prune, 'g') + ' blocks, ' if ARGS.prune else ''}"
          f"{ARGS.target}, {ARGS.threads} threads, {dims or 'default dims'})")
    print(f"{'build':>12} | {'latency ms':>10} | {'model.so MB':>11} | {'weights MB':>10}")
    for name in builds:
        s = sizes[name]
        print(f"{name:>12} | {latency[name] * 1e3:10.3f} | {s.get('library_bytes', 0) / mb:11.3f} | "
              f"{s.get('weight_bytes', 0) / mb:10.3f}")
    print(f"speedup dense / compressed: {record['speedup']:.2f}x; weight bytes "
          f"{sizes['compressed'].get('weight_bytes', 0) / max(sizes['dense int8'].get('weight_bytes', 1), 1):.2f}x")


if __name__ == "__main__":
    main()
