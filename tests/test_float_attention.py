"""FloatAttentionInRowBlocks: float softmax(Q·Kᵀ)·V is one kernel over blocks of query rows, bit-identical to ORT."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.pipeline import tir_pipeline
from nativeq.compile.schedules.attention import (
    ATTENTION_KERNEL,
    FloatAttentionInRowBlocks,
    attention_kernel,
    tile_plan,
)
from nativeq.compile.schedules.intrinsics import FMA_BY_LANES, register_intrinsics
from nativeq.runtime import load
from nativeq.verify import VerifyConfig, verify_artifact

register_intrinsics()
PASS = FloatAttentionInRowBlocks(FMA_BY_LANES[16])


def _chain(q_shape=(4, 10, 36), kt_shape=(4, 36, 10), v_shape=(4, 10, 36), scale="multiply", axis=-1,
           scores_read_twice=False, p_read_twice=False, scale_param=False, dtype="float32"):
    """A Relax main: matmul(q, kt) [* or / a constant] -> softmax -> matmul(., v)."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType(q_shape, dtype))
    kt = relax.Var("kt", relax.TensorType(kt_shape, dtype))
    v = relax.Var("v", relax.TensorType(v_shape, dtype))
    c = relax.Var("c", relax.TensorType((), dtype))
    with bb.function("main", [q, kt, v, *([c] if scale_param else [])]):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, kt))
            constant = c if scale_param else relax.const(0.125, dtype)
            if scale == "multiply":
                s = bb.emit(relax.op.multiply(s, constant))
            elif scale == "divide":
                s = bb.emit(relax.op.divide(s, constant))
            s = bb.emit_output(s) if scores_read_twice else s
            p = bb.emit(relax.op.nn.softmax(s, axis=axis))
            p = bb.emit_output(p) if p_read_twice else p
            o = bb.emit_output(relax.op.matmul(p, v))
            extra = [x for x, read in ((s, scores_read_twice), (p, p_read_twice)) if read]
        bb.emit_func_output(relax.Tuple([o, *extra]) if extra else o)
    return bb.get()


def _ops(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e.op.name)
                                    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return found


@pytest.mark.parametrize("scale", ["multiply", "divide", None])
@pytest.mark.parametrize("batch", [(4,), (2, 4), (2, 3, 4)], ids=["heads", "batch x heads", "3 batch dims"])
def test_the_chain_becomes_one_kernel_call(scale, batch):
    shapes = ((*batch, 10, 36), (*batch, 36, 12), (*batch, 12, 20))
    after = PASS(_chain(*shapes, scale=scale))
    ops = _ops(after)
    assert "relax.nn.softmax" not in ops and "relax.matmul" not in ops and ops.count("relax.call_tir") == 1, ops
    kernels = [gv.name_hint for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == [ATTENTION_KERNEL]
    assert [int(d) for d in after["main"].body.body.ty.shape.values] == [*batch, 10, 20]


@pytest.mark.parametrize("case", [
    dict(kt_shape=(1, 36, 10)),  # K broadcast over the heads
    dict(axis=-2),
    dict(scores_read_twice=True),
    dict(p_read_twice=True),
    dict(scale_param=True),
    dict(dtype="float16"),
    dict(q_shape=(10, 36), kt_shape=(36, 10), v_shape=(10, 36)),  # no batch dim: a plain 2-D matmul chain
], ids=["broadcast K", "softmax over queries", "scores read twice", "P read twice", "scale not constant",
        "float16", "2-D"])
def test_left_alone(case):
    before = _chain(**case)
    tvm.ir.assert_structural_equal(PASS(before), before)


def _run(lib, q, kt, v):
    """The kernel on [heads, T, d] operands, as a batch of one."""
    out = tvm.runtime.tensor(np.zeros((1, q.shape[0], q.shape[1], v.shape[2]), np.float32))
    lib["main"](*(tvm.runtime.tensor(x[None]) for x in (q, kt, v)), out)
    return out.numpy()[0]


def _build(lanes: int, dk: int, dv: int):
    kernel = attention_kernel(dk, dv, tile_plan(lanes), scale=0.17, divide=False)
    mod = tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target("llvm"), tir_pipeline=tir_pipeline())


def test_tile_plans_fit_each_target_s_registers():
    # lanes -> registers: NEON 4 / 32, AVX2 8 / 16, AVX-512 16 / 32
    for lanes, registers in ((4, 32), (8, 16), (16, 32)):
        plan = tile_plan(lanes)
        score_tile = plan.rows * plan.score_columns // lanes
        assert score_tile + plan.score_columns // lanes + 1 <= registers, plan
        assert plan.rows * plan.panel + plan.panel + 1 <= registers, plan
        assert plan.score_columns % 16 == 0 or 16 % plan.score_columns == 0


@pytest.mark.parametrize("dk, dv", [(36, 36), (8, 20), (64, 64)])
def test_every_tile_plan_computes_the_same_bits(dk, dv):
    """The three targets' tilings (built here for the host) over ragged sizes: rows not a multiple of the block, key
    lengths below, at and between whole chunks of 16 and passes of 32, one query row; all equal bit for bit, and
    equal to softmax attention in float64 within float32 rounding."""
    libs = {lanes: _build(lanes, dk, dv) for lanes in (4, 8, 16)}
    rng = np.random.default_rng(dk + dv)
    for heads, tq, tk in ((1, 1, 1), (2, 7, 5), (3, 9, 16), (2, 17, 33), (1, 33, 48), (2, 5, 70)):
        q = rng.standard_normal((heads, tq, dk)).astype(np.float32)
        kt = rng.standard_normal((heads, dk, tk)).astype(np.float32)
        v = rng.standard_normal((heads, tk, dv)).astype(np.float32)
        outs = {lanes: _run(lib, q, kt, v) for lanes, lib in libs.items()}
        np.testing.assert_array_equal(outs[4], outs[16])
        np.testing.assert_array_equal(outs[8], outs[16])
        s = np.einsum("hik,hkj->hij", q.astype(np.float64), kt.astype(np.float64)) * np.float64(np.float32(0.17))
        p = np.exp(s - s.max(-1, keepdims=True))
        reference = np.einsum("hij,hjd->hid", p / p.sum(-1, keepdims=True), v.astype(np.float64))
        np.testing.assert_allclose(outs[16], reference, rtol=1e-5, atol=1e-5)


def _attention_model(dk: int, dv: int, heads: int, scale: str | None):
    """Float ONNX attention as exporters write it: q, k, v [1, heads, T, d]; MatMul(q, Transpose(k)), an optional
    Mul / Div by a constant, Softmax over the keys, MatMul with v."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, heads, "T", d])
              for name, d in (("q", dk), ("k", dk), ("v", dv))]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"])]
    initializers = []
    scores = "s"
    if scale is not None:
        initializers.append(helper.make_tensor("c", TensorProto.FLOAT, [], [float(np.sqrt(dk))]))
        nodes.append(helper.make_node({"multiply": "Mul", "divide": "Div"}[scale], ["s", "c"], ["scaled"]))
        scores = "scaled"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, heads, "T", dv])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dk, dv, scale", [(36, 36, "divide"), (64, 64, "multiply"), (16, 24, None)])
def test_attention_matches_onnxruntime_exactly(dk, dv, scale, tmp_path):
    model = _attention_model(dk, dv, heads=3, scale=scale)
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    [kernel] = [k for k in result.manifest["kernels"] if k["name"] == ATTENTION_KERNEL]
    assert kernel["kind"] == "contraction" and kernel["schedule"] == "float32 attention"
    # the report names every node the kernel computes (the scores' and the softmax's too, whose bindings it replaced)
    expected_nodes = ["MatMul", *({"divide": ["Div"], "multiply": ["Mul"]}.get(scale, [])), "Softmax", "MatMul"]
    assert sorted(n["op"] for n in kernel["onnx_nodes"]) == sorted(expected_nodes), kernel["onnx_nodes"]
    assert kernel["macs"] == 3 * 64 * 64 * (dk + dv)  # the report's default T = 64
    assert not any("softmax" in k["name"] for k in result.manifest["kernels"])
    compiled = load(tmp_path / "art")
    # the graph as written: ORT's optimizer folds a Div by a constant into its GEMM's alpha (a product by 1 / c)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(dk)
    for t in (1, 5, 16, 17, 40, 67):
        feeds = {name: (2 * rng.standard_normal((1, 3, t, d))).astype(np.float32)
                 for name, d in (("q", dk), ("k", dk), ("v", dv))}
        np.testing.assert_array_equal(compiled.run(feeds)["o"], session.run(None, feeds)[0])


@pytest.mark.arm
@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_attention_matches_onnxruntime_on_arm_under_qemu(target, tmp_path):
    model = _attention_model(36, 36, heads=2, scale="divide")
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / target, CompileConfig(target=target, use_tuning=False))
    assert ATTENTION_KERNEL in [k["name"] for k in result.manifest["kernels"]]
    report = verify_artifact(tmp_path / target, path, VerifyConfig(runs=1, dims={"T": 37}))
    assert report.passed, report
    assert all(o.max_abs == 0 for o in report.outputs), report
