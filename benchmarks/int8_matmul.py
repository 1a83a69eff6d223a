"""Micro-benchmark: one requantized int8 matmul layer, TVM untuned default vs nativeq schedule vs ORT.

    .venv/bin/python benchmarks/int8_matmul.py [--threads 2] [--target host] [--shapes 64x256x128,200x256x1024]

The layer is what the int8 rewrite emits for DequantizeLinear -> MatMul -> QuantizeLinear:
uint8 activations [M, K] x int8 weights [K, N] -> int32 -> + bias -> * scale -> round -> clip
-> int8. ORT runs the equivalent QDQ ONNX graph (which it fuses into QLinearMatMul) with the same
thread count. Prints median / p10 / p90 latency in microseconds and checks the outputs agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", default="host")
    p.add_argument("--shapes", default="64x256x128,200x144x576,200x256x1024,1000x256x256")
    p.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    return p.parse_args()


ARGS = _parse()
# NOTE: the TVM thread pool reads this when it starts; it must be set before tvm is imported.
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from nativeq.compile.pipeline import compile_pipeline, tir_pipeline  # noqa: E402
from nativeq.targets import get_target  # noqa: E402


def layer(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    bias = rng.integers(-2000, 2000, n).astype(np.int32)
    sx, sw = np.float32(0.02), np.float32(0.01)
    sy = np.float32(sx * sw * np.sqrt(k) * 80)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    return x, w, bias, sx, sw, sy


def relax_module(k, n, w, bias, sx, sw, sy):
    scale = np.full(n, sx * sw / sy, np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((tvm.tirx.Var("M", "int64"), k), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            # activation zero point 128: acc - 128 * colsum(W), folded into the bias
            corr = bias.astype(np.int64) - 128 * w.astype(np.int64).sum(0)
            acc = bb.emit(R.add(R.matmul(x, relax.const(w), out_dtype="int32"), relax.const(corr.astype(np.int32))))
            y = bb.emit(R.multiply(R.astype(acc, "float32"), relax.const(scale)))
            out = bb.emit_output(R.astype(R.clip(R.round(y), -128, 127), "int8"))
        bb.emit_func_output(out)
    return bb.get()


def onnx_model(k, n, w, bias, sx, sw, sy):
    init = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.array(sw, np.float32), "sw"),
        numpy_helper.from_array(np.array(0, np.int8), "zw"),
        numpy_helper.from_array(np.array(sx, np.float32), "sx"),
        numpy_helper.from_array(np.array(128, np.uint8), "zx"),
        numpy_helper.from_array(np.array(sy, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.int8), "zy"),
        numpy_helper.from_array(bias, "b_q"),
        numpy_helper.from_array(np.array(sx * sw, np.float32), "sb"),
        numpy_helper.from_array(np.array(0, np.int32), "zb"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["wf"]),
        helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["bf"]),
        helper.make_node("MatMul", ["xf", "wf"], ["mm"]),
        helper.make_node("Add", ["mm", "bf"], ["yf"]),
        helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_matmul",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, ["M", n])],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def measure(fn, seconds):
    fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return np.percentile(times, [50, 10, 90])


def build(mod, target, nativeq_schedules: bool):
    passes = list(compile_pipeline(target).passes)
    if not nativeq_schedules:
        passes = [p for p in passes if not p.info.name.startswith("nativeq.")]
    ex = relax.build(mod, tvm.target.Target(target.tvm_dict(ARGS.threads)), relax_pipeline=tvm.transform.Sequential(passes),
                     tir_pipeline=tir_pipeline() if nativeq_schedules else "default")
    return relax.VirtualMachine(ex, tvm.cpu())


def main():
    target = get_target(ARGS.target)
    print(f"target {target.name} (int8: {target.int8}), {ARGS.threads} threads; latency in us: median [p10, p90]")
    print(f"{'M x K x N':>16} | {'TVM default':>24} | {'nativeq schedule':>24} | {'ORT (QDQ)':>24} | nativeq/ORT")
    so = ort.SessionOptions()
    so.intra_op_num_threads = ARGS.threads
    so.inter_op_num_threads = 1
    for shape in ARGS.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        x, w, bias, sx, sw, sy = layer(m, k, n)
        mod = relax_module(k, n, w, bias, sx, sw, sy)
        sess = ort.InferenceSession(onnx_model(k, n, w, bias, sx, sw, sy).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        x_tvm = tvm.runtime.tensor(x)
        results, outputs = [], []
        for scheduled in (False, True):
            vm = build(mod, target, scheduled)
            outputs.append(vm["main"](x_tvm).numpy())
            results.append(measure(lambda: vm["main"](x_tvm), ARGS.seconds))
        outputs.append(sess.run(None, {"x": x})[0])
        results.append(measure(lambda: sess.run(None, {"x": x}), ARGS.seconds))
        worst = max(int(np.abs(o.astype(int) - outputs[-1].astype(int)).max()) for o in outputs[:2])
        cells = [f"{r[0]:9.1f} [{r[1]:6.0f},{r[2]:6.0f}]" for r in results]
        print(f"{shape:>16} | " + " | ".join(f"{c:>24}" for c in cells)
              + f" | {results[1][0] / results[2][0]:.2f}x  (max |diff| vs ORT: {worst})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
