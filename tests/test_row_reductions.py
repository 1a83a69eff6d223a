"""Reductions along the rows they read (`schedules/generic.py`: `row_reduction_vectorize`): a sum over time of a
channels-first [C, T] tensor (ECAPA-TDNN's attentive statistics pooling) runs rows in parallel, each row summed in
`REDUCTION_LANES` partial results from contiguous vector loads. Before, the outputs (channels) were the vector
lanes, each lane loaded from another row (a gather per term), on one thread when the leading axes were 1."""

from __future__ import annotations

import numpy as np
import pytest

from nativeq.compile._tvm import T, tvm
from nativeq.compile.schedules.generic import REDUCTION_LANES, schedule_generic


def _weighted_sum(channels: int, frames: int):
    """sum over t of round(x[c, t] * w[c, t] / s[t]) * s[t]: a quantize-dequantize inside a sum over time."""

    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((T.int64(1), T.int64(channels), T.int64(frames)), "float32"),
             w: T.Buffer((T.int64(1), T.int64(channels), T.int64(frames)), "float32"),
             s: T.Buffer((T.int64(frames),), "float32"), out: T.Buffer((T.int64(1), T.int64(channels)), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for n, c, t in T.grid(T.int64(1), T.int64(channels), T.int64(frames)):
            with T.sblock("sum"):
                vn, vc, vt = T.axis.remap("SSR", [n, c, t])
                with T.init():
                    out[vn, vc] = T.float32(0)
                out[vn, vc] = out[vn, vc] + T.round(x[vn, vc, vt] * w[vn, vc, vt] / s[vt]) * s[vt]

    return func


def _vector_loop_reads(func) -> list[str]:
    """The scheduled function's vectorized loops, each with the input loads under it (as text)."""
    text = func.script()
    return [line for line in text.splitlines() if "x[" in line and "T.reads" not in line]


@pytest.mark.parametrize("channels, frames, lanes", [(384, 200, 8), (96, 64, REDUCTION_LANES), (40, 1000, 8)])
def test_a_sum_over_the_rows_it_reads_loads_whole_vectors_of_a_row(channels, frames, lanes):
    sch = schedule_generic(_weighted_sum(channels, frames), vector_bits=512)
    scheduled = sch.mod["main"]
    text = scheduled.script()
    # rows in parallel; the row's partial sums local, `lanes` of them, indexed by the innermost vector loop
    assert f"T.parallel(T.int64({channels}))" in text
    assert f'T.sblock_alloc_buffer((T.int64(1), T.int64({channels}), T.int64({lanes})), scope="local")' in text
    assert f"T.vectorized(T.int64({lanes}))" in text
    # the loads: the frame index is (rows of lanes) * lanes + lane: contiguous along the row
    assert any(f"* T.int64({lanes}) +" in line for line in _vector_loop_reads(scheduled))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, channels, frames)).astype(np.float32)
    w = rng.uniform(0, 1, (1, channels, frames)).astype(np.float32)
    s = rng.uniform(0.01, 0.05, frames).astype(np.float32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, channels), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(s), out)
    terms = np.round(x * w / s) * s
    # the same terms, summed in `lanes` partial sums then across them
    expected = terms.reshape(1, channels, frames // lanes, lanes).sum(axis=2, dtype=np.float32).sum(axis=-1, dtype=np.float32)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), terms.astype(np.float64).sum(axis=-1), rtol=1e-4, atol=1e-4)


def test_a_matmul_keeps_its_columns_as_the_vector_lanes():
    """B[k, j] is read across the reduction: not a row reduction (columns stay the vector lanes)."""

    @T.prim_func(s_tir=True)
    def matmul(a: T.Buffer((T.int64(32), T.int64(64)), "float32"), b: T.Buffer((T.int64(64), T.int64(48)), "float32"),
               c: T.Buffer((T.int64(32), T.int64(48)), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i, j, k in T.grid(T.int64(32), T.int64(48), T.int64(64)):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    c[vi, vj] = T.float32(0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    text = schedule_generic(matmul, vector_bits=512).mod["main"].script()
    assert "_rf" not in text and "T.vectorized(T.int64(16))" in text


def _mean_over_time_channels_last(channels: int, frames: int):
    """mean over t of x[t, c] (a channels-last [T, C] tensor): the outputs are the innermost axis of the reads."""

    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((T.int64(1), T.int64(frames), T.int64(channels)), "float32"),
             out: T.Buffer((T.int64(1), T.int64(channels)), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        acc = T.sblock_alloc_buffer((T.int64(1), T.int64(channels)))
        for n, c, t in T.grid(T.int64(1), T.int64(channels), T.int64(frames)):
            with T.sblock("sum"):
                vn, vc, vt = T.axis.remap("SSR", [n, c, t])
                with T.init():
                    acc[vn, vc] = T.float32(0)
                acc[vn, vc] = acc[vn, vc] + x[vn, vt, vc]
        for n, c in T.grid(T.int64(1), T.int64(channels)):
            with T.sblock("mean"):
                vn, vc = T.axis.remap("SS", [n, c])
                out[vn, vc] = acc[vn, vc] / T.float32(frames)

    return func


def _std_over_time_channels_first(channels: int, frames: int):
    """sqrt(max(mean over t of x[c, t], eps)): a reduction with elementwise work on the reduced values only."""

    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((T.int64(1), T.int64(channels), T.int64(frames)), "float32"),
             out: T.Buffer((T.int64(1), T.int64(channels), T.int64(1)), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        acc = T.sblock_alloc_buffer((T.int64(1), T.int64(channels), T.int64(1)))
        for n, c, o, t in T.grid(T.int64(1), T.int64(channels), T.int64(1), T.int64(frames)):
            with T.sblock("sum"):
                vn, vc, vo, vt = T.axis.remap("SSSR", [n, c, o, t])
                with T.init():
                    acc[vn, vc, vo] = T.float32(0)
                acc[vn, vc, vo] = acc[vn, vc, vo] + x[vn, vc, vt]
        for n, c, o in T.grid(T.int64(1), T.int64(channels), T.int64(1)):
            with T.sblock("std"):
                vn, vc, vo = T.axis.remap("SSS", [n, c, o])
                out[vn, vc, vo] = T.sqrt(T.max(acc[vn, vc, vo] / T.float32(frames), T.float32(1e-4)))

    return func


def _normalize_rows(channels: int, frames: int):
    """x[c, t] - mean over t of x[c, t]: the reduced values read back across the row (a norm, not a pooling)."""

    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((T.int64(channels), T.int64(frames)), "float32"),
             out: T.Buffer((T.int64(channels), T.int64(frames)), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        acc = T.sblock_alloc_buffer((T.int64(channels),))
        for c, t in T.grid(T.int64(channels), T.int64(frames)):
            with T.sblock("sum"):
                vc, vt = T.axis.remap("SR", [c, t])
                with T.init():
                    acc[vc] = T.float32(0)
                acc[vc] = acc[vc] + x[vc, vt]
        for c, t in T.grid(T.int64(channels), T.int64(frames)):
            with T.sblock("centre"):
                vc, vt = T.axis.remap("SS", [c, t])
                out[vc, vt] = x[vc, vt] - acc[vc] / T.float32(frames)

    return func


def test_pooling_reductions_go_to_the_generic_rule_and_norms_do_not():
    from nativeq.compile.schedules.generic import has_unbroadcast_reduction

    assert has_unbroadcast_reduction(_mean_over_time_channels_last(128, 200))
    assert has_unbroadcast_reduction(_std_over_time_channels_first(384, 200))
    assert has_unbroadcast_reduction(_weighted_sum(384, 200))
    assert not has_unbroadcast_reduction(_normalize_rows(384, 200))


@pytest.mark.parametrize("vector_bits", [128, 512])
def test_a_mean_over_time_of_channels_last_values_sums_vectors_of_channels_in_order(vector_bits):
    """Channels-last [T, C]: vectors of channels (16 lanes whatever the target: independent adds on NEON too), the
    frames summed innermost in time order; each channel adds its frames in order, as the scalar loop did, so the
    result equals a sequential float32 sum bit for bit."""
    channels, frames = 128, 200
    sch = schedule_generic(_mean_over_time_channels_last(channels, frames), vector_bits=vector_bits)
    text = sch.mod["main"].script()
    lines = [line.strip() for line in text.splitlines()]
    frames_loop = lines.index(f"for t in range(T.int64({frames})):")
    # vectors of channels in parallel, the frames loop over one vector of them, innermost
    assert any(line.startswith("for c_0 in T.parallel(") for line in lines[:frames_loop])
    assert lines[frames_loop + 1] == f"for c_1 in T.vectorized(T.int64({REDUCTION_LANES})):"

    x = np.random.default_rng(1).standard_normal((1, frames, channels)).astype(np.float32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, channels), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    expected = np.zeros((1, channels), np.float32)
    for t in range(frames):
        expected += x[:, t, :]
    np.testing.assert_array_equal(out.numpy(), expected / np.float32(frames))


def test_a_statistic_over_time_of_channels_first_values_sums_row_vectors():
    """Channels-first [C, T] with a unit axis after C (a mean kept as [1, C, 1]), then sqrt(max(., eps)): rows in
    parallel, each summed in vector partial sums (the scalar loop before), the epilogue on the reduced values."""
    channels, frames = 384, 200
    sch = schedule_generic(_std_over_time_channels_first(channels, frames), vector_bits=128)
    text = sch.mod["main"].script()
    assert f"T.parallel(T.int64({channels}))" in text and "T.vectorized(T.int64(8))" in text and "_rf" in text

    x = np.abs(np.random.default_rng(2).standard_normal((1, channels, frames))).astype(np.float32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((1, channels, 1), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    expected = x.reshape(1, channels, frames // 8, 8).sum(axis=2, dtype=np.float32).sum(axis=-1, dtype=np.float32)
    np.testing.assert_allclose(out.numpy()[..., 0], np.sqrt(np.maximum(expected / frames, 1e-4)), rtol=2e-6)


def _requantize(rows: int, channels: int, out_dtype: str):
    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((T.int64(rows), T.int64(channels)), "float32"), s: T.Buffer((T.int64(channels),), "float32"),
             out: T.Buffer((T.int64(rows), T.int64(channels)), out_dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r, c in T.grid(T.int64(rows), T.int64(channels)):
            with T.sblock("q"):
                vr, vc = T.axis.remap("SS", [r, c])
                out[vr, vc] = T.Cast(out_dtype, T.max(T.min(T.round(x[vr, vc] / s[vc]), T.float32(127)), T.float32(-128)))

    return func


@pytest.mark.parametrize("vector_bits, out_dtype, lanes", [(128, "float32", 16), (128, "int8", 64),
                                                           (256, "float32", 8), (512, "int8", 64)])
def test_elementwise_loops_step_over_four_neon_registers(vector_bits, out_dtype, lanes):
    """On a 128-bit target (NEON) an elementwise loop steps over 512 bits of its output (16 floats, 64 bytes): the
    loop's counter, compare and branch once per 4 registers; x86 keeps one register per step. Same values."""
    sch = schedule_generic(_requantize(40, 128, out_dtype), vector_bits=vector_bits)
    assert f"T.vectorized(T.int64({lanes}))" in sch.mod["main"].script()
    rng = np.random.default_rng(3)
    x, s = rng.normal(0, 40, (40, 128)).astype(np.float32), rng.uniform(0.5, 2, 128).astype(np.float32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((40, 128), out_dtype))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(s), out)
    np.testing.assert_array_equal(out.numpy(), np.clip(np.round(x / s), -128, 127).astype(out_dtype))
