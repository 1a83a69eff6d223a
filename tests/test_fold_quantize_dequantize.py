"""FoldQuantizeDequantize: dequantize(quantize(x)) with one scale becomes clip(round(x / s)) * s in float."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes.fold_quantize_dequantize import FoldQuantizeDequantize
from nativeq.runtime import load
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402


def _fold(mod):
    return FoldQuantizeDequantize()(mod)


def test_a_round_trip_inside_the_graph_becomes_float_clip_of_round():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), b: R.Tensor((8,), "float32")):
            with R.dataflow():
                q = R.quantize(x, R.const(0.3, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="uint8")
                d = R.dequantize(q, R.const(0.3, "float32"), R.const(128, "uint8"), axis=-1)
                y = R.add(d, b)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), b: R.Tensor((8,), "float32")):
            with R.dataflow():
                s = R.divide(x, R.const(0.3, "float32"))
                r = R.round(s)
                hi = R.minimum(r, R.const(127.0, "float32"))
                lo = R.maximum(hi, R.const(-128.0, "float32"))
                d = R.multiply(lo, R.const(0.3, "float32"))
                y = R.add(d, b)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(_fold(Before), Expected)


def test_a_power_of_two_scale_multiplies_by_its_reciprocal():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            with R.dataflow():
                q = R.quantize(x, R.const(0.125, "float32"), R.const(-3, "int8"), axis=-1, out_dtype="int8")
                d = R.dequantize(q, R.const(0.125, "float32"), R.const(-3, "int8"), axis=-1)
                y = R.exp(d)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            with R.dataflow():
                s = R.multiply(x, R.const(8.0, "float32"))
                r = R.round(s)
                hi = R.minimum(r, R.const(130.0, "float32"))
                lo = R.maximum(hi, R.const(-125.0, "float32"))
                d = R.multiply(lo, R.const(0.125, "float32"))
                y = R.exp(d)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(_fold(Before), Expected)


def _pair(scale2=0.3, zero2=128, second_reader=False, returned=False):
    """x -> quantize(0.3, 128) -> dequantize(scale2, zero2) -> exp, q also returned or the dequantize returned."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            quantize = relax.op.quantize(x, relax.const(0.3, "float32"), relax.const(128, "uint8"), -1, "uint8")
            q = bb.emit_output(quantize) if second_reader else bb.emit(quantize)
            dequantize = relax.op.dequantize(q, relax.const(scale2, "float32"), relax.const(zero2, "uint8"), -1)
            if returned:
                out = bb.emit_output(dequantize)
            else:
                y = bb.emit_output(relax.op.exp(bb.emit(dequantize)))
                out = relax.Tuple([y, q]) if second_reader else y
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("case", [dict(scale2=0.3001), dict(zero2=127), dict(second_reader=True),
                                  dict(returned=True)], ids=["other scale", "other zero point", "q read twice",
                                                             "returned value"])
def test_left_alone(case):
    before = _pair(**case)
    tvm.ir.assert_structural_equal(_fold(before), before)


def test_the_same_pair_inside_the_graph_is_folded():  # the cases above leave it only for their reason
    assert "relax.dequantize" not in _fold(_pair())["main"].script()


def _chain_model(act: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> +b -> Q -> DQ -> *w -> Q -> DQ -> y: two round trips inside, one returned."""
    np_dtype = np.uint8 if act == "uint8" else np.int8
    zero = 131 if act == "uint8" else -7
    inits = [numpy_helper.from_array(np.array(0.0371, np.float32), "s"),
             numpy_helper.from_array(np.array(0.125, np.float32), "s2"),
             numpy_helper.from_array(np.array(zero, np_dtype), "z"),
             numpy_helper.from_array(np.linspace(-1.7, 2.3, 24).astype(np.float32), "b"),
             numpy_helper.from_array(np.linspace(-3.1, 1.9, 24).astype(np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
             helper.make_node("Add", ["d0", "b"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s2", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s2", "z"], ["d1"]),
             helper.make_node("Mul", ["d1", "w"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_round_trips_in_float_match_onnxruntime_exactly(act, tmp_path):
    model = _chain_model(act)
    from nativeq.compile.api import import_model

    mod = import_model(model, "chain.onnx")
    folded = FoldQuantizeDequantize()(mod)

    def dequantizes(m):
        found = []
        relax.analysis.post_order_visit(m["main"].body, lambda e: found.append(e) if isinstance(e, relax.Call)
                                        and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.dequantize" else None)
        return len(found)

    assert dequantizes(mod) == 3 and dequantizes(folded) == 1  # the returned one stays
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    compiled = load(tmp_path / "art")
    rng = np.random.default_rng(0)
    s = np.float32(0.0371)
    # every rounding tie of the first quantize, both saturations, huge values and -0.0-producing ones
    ties = ((np.arange(-140, 140) + np.float32(0.5)) * s).astype(np.float32)
    special = np.array([0.0, -0.0, -0.01, 0.01, 1e30, -1e30, 3e38, -3e38], np.float32)
    for t in (1, 13, 40):
        x = rng.uniform(-12, 12, (1, t, 24)).astype(np.float32)
        flat = x.reshape(-1)
        picks = np.concatenate([ties, special])
        flat[: min(flat.size, picks.size)] = picks[: flat.size]
        ours, theirs = compiled.run({"x": x})["y"], session.run(None, {"x": x})[0]
        np.testing.assert_array_equal(ours, theirs)
        assert np.array_equal(np.signbit(ours), np.signbit(theirs))  # the returned value keeps +0.0
