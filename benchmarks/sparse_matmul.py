"""Benchmark: block-sparse and 4-bit int8 matmul kernels against the dense int8 kernel, per layer.

    .venv/bin/python -m benchmarks.sparse_matmul [--threads 2] [--target host] [--rows 75]
        [--shapes 144x144,144x576,576x144,144x288,608x144] [--sparsity 0.5,0.75,0.875] [--json]

Each layer is what the int8 rewrite emits for a requantized QDQ MatMul (uint8 x int8 on x86, int8 x
int8 on ARM -> int32 -> + bias -> * scale -> round -> clip -> int8) with the shipped Conformer's weight
shapes (K x N) and `--rows` activation rows (75 = T=300 feature frames after 4x subsampling). The
weights are pruned in the kernel-friendly pattern (16 outputs x 4 inputs blocks, the same number kept
per 16 outputs) at each sparsity, once in 8 and once in 4 bits. Every variant is compiled twice,
once with the block-sparse / 4-bit formats (`compile/schedules/weight_formats.py`) and once forced
dense 8-bit, and both are timed side by side in this run (TVM's time evaluator, samples alternating); the
outputs of the two must be identical. Prints the speedup dense / sparse and the weight bytes.

With an aarch64 `--target` (rpi4, rpi5) nothing is timed: each layer is written as a QDQ ONNX file, compiled
both ways for the target and counted in aarch64 instructions per call under qemu (the emulated CPU of the
target; `nativeq bench-emulated`, needs `nativeq setup-arm`). The whole call is counted, requantize included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", default="host")
    p.add_argument("--rows", type=int, default=75)
    p.add_argument("--shapes", default="144x144,144x576,576x144,144x288,608x144")
    p.add_argument("--sparsity", default="0.5,0.75,0.875")
    p.add_argument("--bits", default="8,4", help="weight bits to run (8, 4 or both)")
    p.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    p.add_argument("--json", action="store_true", help="one JSON record per line instead of the table")
    return p.parse_args()


ARGS = _parse()
# NOTE: the TVM thread pool reads this when it starts; it must be set before tvm is imported.
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from nativeq.compile.pipeline import compile_passes, tir_pipeline  # noqa: E402
from nativeq.compile.schedules.intrinsics import dot_intrin_for  # noqa: E402
from nativeq.compile.schedules.pack_weights import PackInt8Weights  # noqa: E402
from nativeq.targets import get_target  # noqa: E402

BAND, STEP = 16, 4  # the kernel-friendly block: 16 outputs x 4 inputs


def pruned_weight(k: int, n: int, sparsity: float, bits: int, rng) -> np.ndarray:
    """A random [K, N] weight with round(sparsity * K/4) of the 4-input blocks zero in every band of 16 outputs.
    Values in [-(2^(bits-1) - 1), 2^(bits-1) - 1], the symmetric range nativeq's QAT export and ORT's per-channel
    int8 weights use (on the Pi 4 a weight of -128 selects a slower dense kernel)."""
    high = 2 ** (bits - 1) - 1
    w = rng.integers(-high, high + 1, (k, n), dtype=np.int8)
    k_blocks = -(-k // STEP)
    pruned = int(round(sparsity * k_blocks))
    for band in range(0, n, BAND):
        for block in rng.permutation(k_blocks)[:pruned]:
            w[block * STEP:(block + 1) * STEP, band:band + BAND] = 0
    return w


def layer_module(w: np.ndarray, act_dtype: str, rng) -> tvm.IRModule:
    k, n = w.shape
    bias = rng.integers(-2000, 2000, n).astype(np.int32)
    scale = (rng.random(n) * 2e-4 + 1e-5).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((tvm.tirx.Var("M", "int64"), k), act_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(R.add(R.matmul(x, relax.const(w), out_dtype="int32"), relax.const(bias)))
            y = bb.emit(R.multiply(R.astype(acc, "float32"), relax.const(scale)))
            out = bb.emit_output(R.astype(R.clip(R.round(y), -128, 127), "int8"))
        bb.emit_func_output(out)
    return bb.get()


def build(mod, target, compressed: bool):
    """(executable, weight bytes the packing stored): the compile pipeline, compressed formats on or off."""
    passes = compile_passes(target, compressed_weights=compressed)
    index = next(i for i, p in enumerate(passes) if isinstance(p, PackInt8Weights))
    packer = passes[index]
    captured = {}

    @tvm.transform.module_pass(opt_level=0, name="capture_constants")
    def capture(mod_, _ctx):
        captured["bytes"] = sum(c.value.numpy().nbytes for c in _constants(mod_))
        return mod_

    passes = [*passes[:index + 1], capture, *passes[index + 1:]]
    ex = relax.build(mod, tvm.target.Target(target.tvm_dict(ARGS.threads)),
                     relax_pipeline=tvm.transform.Sequential(passes), tir_pipeline=tir_pipeline())
    return ex, captured["bytes"], packer.formats


def _constants(mod):
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, tvm.ir.GenericConst) else None)
    return found


def measure_interleaved(vms: list, x, seconds: float) -> list[float]:
    """Median microseconds per call of each VM's `main` on `x`, timed by TVM's evaluator (C++, 20 calls per
    sample, no Python in the loop), the VMs' samples alternating so that all see the same machine."""
    evaluators = [vm.time_evaluator("main", tvm.cpu(), number=20, repeat=1) for vm in vms]
    samples = [[] for _ in vms]
    end = time.perf_counter() + seconds * len(vms)
    while time.perf_counter() < end or len(samples[0]) < 5:
        for evaluate, record in zip(evaluators, samples):
            record.append(evaluate(x).mean)
    return [float(np.median(record) * 1e6) for record in samples]


def main():
    target = get_target(ARGS.target)
    intrin = dot_intrin_for(target)
    if intrin is None:
        sys.exit(f"target {target.name} has no int8 dot instruction family")
    if target.arch != "x86_64":
        return main_emulated(target)
    if not ARGS.json:
        print(f"target {target.name} ({target.int8}), {ARGS.threads} threads, {ARGS.rows} rows; median us per call")
        print(f"{'K x N':>9} {'bits':>4} {'sparsity':>8} | {'dense us':>9} {'sparse us':>9} {'speedup':>7} | "
              f"{'dense B':>8} {'packed B':>8} {'ratio':>5} | format")
    rng = np.random.default_rng(0)
    for shape in ARGS.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for bits in (int(b) for b in ARGS.bits.split(",")):
            for sparsity in (float(s) for s in ARGS.sparsity.split(",")):
                w = pruned_weight(k, n, sparsity, bits, rng)
                mod = layer_module(w, intrin.act_dtype, rng)
                x = rng.integers(0, 128, (ARGS.rows, k)).astype(intrin.act_dtype)
                x_tvm = tvm.runtime.tensor(x)
                runs = []
                for compressed in (False, True):
                    ex, nbytes, formats = build(mod, target, compressed)
                    vm = relax.VirtualMachine(ex, tvm.cpu())
                    runs.append((vm, nbytes, vm["main"](x_tvm).numpy(), formats))
                dense_us, sparse_us = measure_interleaved([run[0] for run in runs], x_tvm, ARGS.seconds)
                (_, dense_b, dense_out, _), (_, packed_b, sparse_out, formats) = runs
                if not np.array_equal(dense_out, sparse_out):
                    sys.exit(f"{shape} bits={bits} sparsity={sparsity}: the compressed kernel's output differs")
                record = {"k": k, "n": n, "rows": ARGS.rows, "bits": bits, "sparsity": sparsity,
                          "dense_us": round(dense_us, 2), "sparse_us": round(sparse_us, 2),
                          "speedup": round(dense_us / sparse_us, 3), "dense_bytes": dense_b,
                          "packed_bytes": packed_b, "format": formats[0] if formats else "-",
                          "target": target.name, "threads": ARGS.threads}
                if ARGS.json:
                    print(json.dumps(record))
                else:
                    print(f"{shape:>9} {bits:>4} {sparsity:>8.3f} | {dense_us:9.1f} {sparse_us:9.1f} "
                          f"{dense_us / sparse_us:6.2f}x | {dense_b:8d} {packed_b:8d} {packed_b / dense_b:5.2f} | "
                          f"{record['format']}")
                sys.stdout.flush()


def layer_onnx(w: np.ndarray, rng) -> "onnx.ModelProto":
    """x[1, T, K] float -> QuantizeLinear/DequantizeLinear (int8) -> MatMul(DequantizeLinear(w), per column)
    -> QuantizeLinear/DequantizeLinear -> y: the layer as a QDQ ONNX file, for the aarch64 artifacts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.zeros(n, np.int8), "w_z"),
             numpy_helper.from_array(rng.uniform(0.01, 0.03, n).astype(np.float32), "w_s"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_s"), numpy_helper.from_array(np.array(0, np.int8), "x_z"),
             numpy_helper.from_array(np.array(0.2, np.float32), "y_s"), numpy_helper.from_array(np.array(0, np.int8), "y_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wf"], axis=1),
             helper.make_node("MatMul", ["xf", "wf"], ["mm"]),
             helper.make_node("QuantizeLinear", ["mm", "y_s", "y_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def main_emulated(target):
    """aarch64: dense and compressed builds of each layer counted in instructions per call under qemu."""
    import tempfile
    from pathlib import Path

    import onnx

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime.insn_bench import InsnBenchConfig, bench_emulated

    work = Path(tempfile.mkdtemp(prefix="nativeq-sparse-arm-"))
    if not ARGS.json:
        print(f"target {target.name} ({target.int8}) under qemu -cpu {target.qemu_cpu}, {ARGS.rows} rows; "
              "aarch64 instructions per call")
        print(f"{'K x N':>9} {'bits':>4} {'sparsity':>8} | {'dense':>10} {'sparse':>10} {'ratio':>6} | format")
    rng = np.random.default_rng(0)
    for shape in ARGS.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for bits in (int(b) for b in ARGS.bits.split(",")):
            for sparsity in (float(s) for s in ARGS.sparsity.split(",")):
                stem = work / f"{k}x{n}_{bits}_{sparsity:g}"
                onnx.save(layer_onnx(pruned_weight(k, n, sparsity, bits, rng), rng), f"{stem}.onnx")
                builds = []
                for dense in (True, False):
                    out = Path(f"{stem}_{'dense' if dense else 'compressed'}")
                    compile_model(f"{stem}.onnx", out, CompileConfig(target=target.name, dense_weights=dense),
                                  progress=False)
                    builds.append(out)
                result = bench_emulated(builds, InsnBenchConfig(dims={"T": ARGS.rows}, repeat=3))
                dense_insns, sparse_insns = (row.insns_per_inference for row in result.rows)
                record = {"k": k, "n": n, "rows": ARGS.rows, "bits": bits, "sparsity": sparsity, "target": target.name,
                          "dense_insns": dense_insns, "sparse_insns": sparse_insns,
                          "ratio": round(dense_insns / sparse_insns, 3)}
                if ARGS.json:
                    print(json.dumps(record))
                else:
                    print(f"{shape:>9} {bits:>4} {sparsity:>8.3f} | {dense_insns:10d} {sparse_insns:10d} "
                          f"{dense_insns / sparse_insns:5.2f}x |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
