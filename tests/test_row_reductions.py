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
