"""Per-layer int8 throughput: each int8 matmul task of a model, default vs tuned knobs, next to the int8 peak.

    .venv/bin/python benchmarks/tuned_layers.py MODEL.onnx --tuning-log tuning_logs/x86-avx512-vnni \
        --dim T=200 [--threads 2] [--target host]

For every tunable int8 matmul kernel of MODEL (the tasks `nativeq tune` extracts, symbolic sizes
bound by --dim), builds the kernel with nativeq's default tile and with the tile the database
picked, times both side by side (interleaved, median of --rounds), and prints M x K x N, the
microseconds and the achieved int8 GOP/s (2 ops per multiply-add). The peak line is a large
uint8 x int8 -> int32 GEMM (requantized) (M = K = N = --peak-size) through the same tensorized schedule, the
best of the knob settings: what this machine's dot-product instruction sustains in practice.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tuning-log", required=True)
    p.add_argument("--dim", action="append", default=[], help="NAME=INT, as `nativeq tune --dim`")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", default="host")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--peak-size", type=int, default=1536)
    return p.parse_args()


ARGS = _parse()
# NOTE: the TVM thread pool reads this when it starts; it must be set before tvm is imported.
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "src"))
from nativeq.compile._tvm import relax, tirx, tvm  # noqa: E402
from nativeq.compile.schedules.intrinsics import dot_intrin_for  # noqa: E402
from nativeq.compile.schedules.matmul import (  # noqa: E402
    int8_matmul_n_blocks, register_tile, schedule_int8_matmul, tile_choices)
from nativeq.targets import get_target  # noqa: E402
from nativeq.tuning.apply import tuned_dims  # noqa: E402
from nativeq.tuning.database import load_database  # noqa: E402
from nativeq.tuning.template import default_dims, knobs_for, static_twins  # noqa: E402
from nativeq.tuning.tune import extract_tasks, lower_for_tuning, size_names  # noqa: E402


def _random_args(func, dev, rng):
    args = []
    for param in func.params:
        shape, dtype = [int(d) for d in param.ty.shape], str(param.ty.dtype)
        data = rng.integers(-100, 100, shape) if "int" in dtype else rng.random(shape)
        if dtype == "uint8":
            data = np.abs(data)
        args.append(tvm.runtime.tensor(data.astype(dtype), dev))
    return args


def _timers(funcs, tvm_target, dev, rng):
    timers = []
    for func in funcs:
        lib = tvm.driver.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm_target)
        timers.append((lib.time_evaluator("main", dev, number=10, repeat=1, min_repeat_ms=20), _random_args(func, dev, rng)))
    return timers


def _side_by_side(timers, rounds):
    samples = [[] for _ in timers]
    for _ in range(rounds):
        for i, (timer, args) in enumerate(timers):
            samples[i].append(timer(*args).mean)
    return [float(np.median(s)) for s in samples]


def _mkn(func):
    """(rows M, K, N) of the int8 matmul block."""
    from nativeq.compile._tvm import Schedule
    from nativeq.compile.schedules.pack_weights import REDUCTION_BLOCK

    sch = Schedule(func)
    *rows, j, k = sch.get_loops(sch.get_sblock(REDUCTION_BLOCK))
    m = int(np.prod([int(sch.get(r).extent) for r in rows]))
    return m, int(sch.get(k).extent), int(sch.get(j).extent)


def _peak_func(size, target):
    """A size x size x size uint8 x int8 -> int32 GEMM (requantized to int8, as a layer), lowered by
    nativeq's pipeline up to the kernels."""
    from tvm.script import relax as R

    from nativeq.compile.pipeline import compile_passes

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, size, size), "uint8"))
    w = np.random.default_rng(0).integers(-127, 128, (size, size)).astype(np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(R.matmul(x, relax.const(w), out_dtype="int32"))
            y = bb.emit(R.multiply(R.astype(acc, "float32"), relax.const(np.float32(1e-3))))
            out = bb.emit_output(R.astype(R.clip(R.round(y), -128, 127), "int8"))
        bb.emit_func_output(out)
    passes = compile_passes(target)
    names = [p.info.name for p in passes]
    with tvm.target.Target(target.tvm_dict()), tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes[: names.index("FuseTIR") + 1])(bb.get())
    return next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) and int8_matmul_n_blocks(f, dot_intrin_for(target)))


def main():
    target = get_target(ARGS.target)
    intrin = dot_intrin_for(target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    given = {name: int(value) for name, _, value in (d.partition("=") for d in ARGS.dim)}
    mod, tvm_target = lower_for_tuning(ARGS.model, target)
    dims = default_dims(size_names(mod), given)
    tasks, _ = extract_tasks(mod, target, dims)
    database = load_database(ARGS.tuning_log)
    options = [dims] + [d for d in tuned_dims(ARGS.tuning_log) if d != dims]
    print(f"{ARGS.model} at {dims}, {ARGS.threads} thread(s); database {ARGS.tuning_log}")
    print(f"{'task':58s} {'kernels':>7s} {'M x K x N':>16s} {'default us':>10s} {'tuned us':>9s} {'GOP/s def':>9s} "
          f"{'GOP/s tuned':>11s}  tuned tile")
    for task in [t for t in tasks if t.choices is not None]:
        func = task.mod["main"]
        default = register_tile(int8_matmul_n_blocks(func, intrin), intrin)
        tuned = knobs_for(static_twins(func, options), database, default=default)
        funcs = [schedule_int8_matmul(func, intrin, k).mod["main"] for k in (default, tuned or default)]
        t_default, t_tuned = _side_by_side(_timers(funcs, tvm_target, dev, rng), ARGS.rounds)
        m, k, n = _mkn(func)
        ops = 2.0 * m * k * n
        print(f"{task.name[:58]:58s} {task.weight:7d} {f'{m}x{k}x{n}':>16s} {t_default * 1e6:10.1f} {t_tuned * 1e6:9.1f} "
              f"{ops / t_default / 1e9:9.0f} {ops / t_tuned / 1e9:11.0f}  {tuned.as_text() if tuned else '(no record)'}")
    peak = _peak_func(ARGS.peak_size, target)
    choices = tile_choices(int8_matmul_n_blocks(peak, intrin), intrin)
    funcs = [schedule_int8_matmul(peak, intrin, k).mod["main"] for k in choices]
    times = _side_by_side(_timers(funcs, tvm_target, dev, rng), 3)
    best = int(np.argmin(times))
    size = ARGS.peak_size
    print(f"peak: {size}x{size}x{size} uint8 x int8 -> int32 GEMM (+ requantize), best of {len(choices)} tiles "
          f"({choices[best].as_text()}): {times[best] * 1e6:.0f} us = {2.0 * size ** 3 / times[best] / 1e9:.0f} GOP/s")


if __name__ == "__main__":
    main()
