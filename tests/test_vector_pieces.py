"""Innermost loops vectorized in pieces: an `if_then_else` along the vector axis (a concat's choice of input, a pad's
border) is a constant in each piece (`schedules/generic.py`: `select_boundaries`, `_vectorize_in_pieces`).

TVM's vectorizer scalarizes a whole loop whose `if_then_else` condition differs between lanes: a channels-last
concat fused into a requantize chain ran one lane at a time (a U-Net skip connection: 7 ns per element).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import qdq_models

import nativeq
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import T, tvm
from nativeq.compile.schedules.generic import schedule_generic, select_boundaries
from nativeq.verify import VerifyConfig, verify_artifact

V = T.int64()


@pytest.mark.parametrize("condition, extent, points", [
    (T.int64(32) <= V, 64, [32]),                        # concat of two inputs: the second from 32 on
    (V < T.int64(16), 64, [16]),
    (T.And(T.int64(2) <= V, V < T.int64(18)), 20, [2, 18]),  # a pad's borders
    (V + T.int64(3) >= T.int64(8), 64, [5]),             # shifted
    (T.int64(7) - V > T.int64(0), 64, [7]),              # negated
    (V <= T.int64(9), 64, [10]),                         # closed
    (T.Not(V < T.int64(4)), 64, [4]),
    (V * T.int64(2) < T.int64(8), 64, []),               # not one lane per index: left alone
    (V < T.int64(64), 64, []),                           # no point inside the loop
    (T.int64(0) < V, 64, [1]),
])
def test_select_boundaries(condition, extent, points):
    body = T.if_then_else(condition, T.float32(1), T.float32(0))
    assert select_boundaries(body, V, extent) == points


def test_nested_concat_selects_give_every_boundary():
    """A concat of three inputs: nested selects, one point each."""
    body = T.if_then_else(V < T.int64(16), T.float32(1), T.if_then_else(V < T.int64(48), T.float32(2), T.float32(3)))
    assert select_boundaries(body, V, 64) == [16, 48]


def _concat_requantize(first: int, second: int):
    """Channels-last concat of a uint8 and an int32 tensor, each requantized, stored as uint8: the elementwise kernel a
    skip connection after a conv becomes."""
    width = first + second

    @T.prim_func(s_tir=True)
    def func(a: T.Buffer((T.int64(24), T.int64(first)), "uint8"), b: T.Buffer((T.int64(24), T.int64(second)), "int32"),
             out: T.Buffer((T.int64(24), T.int64(width)), "uint8")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i, c in T.grid(T.int64(24), T.int64(width)):
            with T.sblock("out"):
                vi, vc = T.axis.remap("SS", [i, c])
                out[vi, vc] = T.Cast("uint8", T.max(T.min(T.round(T.if_then_else(
                    vc < T.int64(first), T.Cast("float32", a[vi, vc]) * T.float32(0.5),
                    T.Cast("float32", b[vi, vc - T.int64(first)]) / T.float32(3.0))), T.float32(255)), T.float32(0)))

    return func


def _lowered(func):
    """`func` through TVM's s_tir lowering (vectorized loops become vector expressions), as tirx.build runs it."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    target = tvm.target.Target({"kind": "llvm"})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(tvm.IRModule({"main": func}))
    return default_s_tir_pipeline()[0](mod)["main"]


@pytest.mark.parametrize("first, second, vector_bits", [(32, 32, 512), (16, 48, 512), (32, 96, 512), (8, 24, 128)])
def test_a_concat_along_the_vector_axis_is_vectorized_in_pieces(first, second, vector_bits):
    """Scheduled, the kernel's store is vector code with no select left (before: one scalar loop with the select), and
    it computes what numpy computes."""
    func = _concat_requantize(first, second)
    sch = schedule_generic(func, vector_bits)
    stores = [line.strip() for line in _lowered(sch.mod["main"]).script().splitlines() if line.strip().startswith("out_1[")]
    assert len(stores) == 2, stores  # one vector store per input
    for store in stores:
        assert "if_then_else" not in store and "x" in store.split('T.Cast("uint8')[1][:4], store  # uint8xN: a vector
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, first)).astype(np.uint8)
    b = rng.integers(-400, 1200, (24, second)).astype(np.int32)
    lib = tvm.compile(sch.mod, target="llvm")
    out = tvm.runtime.tensor(np.zeros((24, first + second), np.uint8))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    expected = np.concatenate([np.round(a.astype(np.float32) * np.float32(0.5)),
                               np.round(b.astype(np.float32) / np.float32(3.0))], axis=1)
    np.testing.assert_array_equal(out.numpy(), np.clip(expected, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("spatial", [(12, 16), (20,), ("T",)], ids=["2-D", "1-D", "1-D symbolic"])
def test_a_unet_skip_connection_matches_onnxruntime(spatial, tmp_path):
    """A U-Net level (transposed conv, PRelu, channel concat with the encoder's output) gives ORT's output but at
    rounding ties (exact int32 sums against ORT's float ones), which `verify` localizes."""
    model = qdq_models.skip_concat(spatial=spatial)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    sizes = {"T": 22} if "T" in spatial else {}
    x = np.random.default_rng(1).uniform(-3, 3, [1, 4, *[sizes.get(d, d) for d in spatial]]).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    steps = np.abs(nativeq.load(tmp_path / "art").run({"x": x})["y"] - expected) / 0.1
    assert steps.max() <= 1.0001 and (steps > 0.5).mean() < 0.01, steps.max()
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=sizes, accept_ties=True))
    assert report.passed, report.table()
