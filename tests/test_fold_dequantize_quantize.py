"""FoldDequantizeQuantize: quantize(layout(dequantize(q))) with one scale becomes integer data movement."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes.fold_dequantize_quantize import FoldDequantizeQuantize
from nativeq.runtime import load
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402


def _fold(mod):
    return FoldDequantizeQuantize()(mod)


def test_same_scale_and_zero_point_become_the_move_on_uint8():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((2, 3, 4), "uint8")):
            with R.dataflow():
                x = R.dequantize(q, R.const(0.5, "float32"), R.const(128, "uint8"), axis=-1)
                y = R.permute_dims(R.reshape(x, R.shape([2, 12])), [1, 0])
                z = R.quantize(y, R.const(0.5, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="uint8")
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((2, 3, 4), "uint8")):
            with R.dataflow():
                z = R.permute_dims(R.reshape(q, R.shape([2, 12])), [1, 0])
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(_fold(Before), Expected)


def test_other_zero_point_and_dtype_shift_in_integers():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((4, 8), "uint8")):
            with R.dataflow():
                x = R.dequantize(q, R.const(0.25, "float32"), R.const(128, "uint8"), axis=-1)
                y = R.permute_dims(x, [1, 0])
                z = R.quantize(y, R.const(0.25, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((4, 8), "uint8")):
            with R.dataflow():
                z = R.astype(R.clip(R.add(R.astype(R.permute_dims(q, [1, 0]), "int32"), R.const(-128, "int32")), -128, 127), "int8")
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(_fold(Before), Expected)


@pytest.mark.parametrize("scale2", [0.5000001, 1.0])
def test_another_scale_is_left_alone(scale2):
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((2, 3), "uint8")):
            with R.dataflow():
                x = R.dequantize(q, R.const(0.5, "float32"), R.const(128, "uint8"), axis=-1)
                y = R.permute_dims(x, [1, 0])
                z = R.quantize(y, R.const(scale2, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="uint8")
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(_fold(Before), Before)


def test_a_max_pool_between_one_scale_runs_on_the_integers():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 8, 6, 16), "uint8")):
            with R.dataflow():
                x = R.dequantize(q, R.const(0.04, "float32"), R.const(3, "uint8"), axis=-1)
                y = R.nn.max_pool2d(x, [2, 2], [2, 2], layout="NHWC")
                z = R.quantize(y, R.const(0.04, "float32"), R.const(3, "uint8"), axis=-1, out_dtype="uint8")
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 8, 6, 16), "uint8")):
            with R.dataflow():
                z = R.nn.max_pool2d(q, [2, 2], [2, 2], layout="NHWC")
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(_fold(Before), Expected)


def test_a_max_under_a_negative_scale_is_left_in_float():
    """max(s * (q - z)) is s * (min(q) - z) when s < 0: no fold."""
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 16, 9), "int8")):
            with R.dataflow():
                x = R.dequantize(q, R.const(-0.04, "float32"), R.const(0, "int8"), axis=-1)
                y = R.nn.max_pool1d(x, [3], [1])
                z = R.quantize(y, R.const(-0.04, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                R.output(z)
            return z

    tvm.ir.assert_structural_equal(_fold(Before), Before)


def _moves_model(act_dtype: str, out_dtype: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> Reshape -> Q/DQ -> Transpose -> Slice -> Q(out_dtype) -> DQ -> y, one scale throughout."""
    in_np = np.uint8 if act_dtype == "uint8" else np.int8
    out_np = np.uint8 if out_dtype == "uint8" else np.int8
    inits = [numpy_helper.from_array(np.array(0.03, np.float32), "s"),
             numpy_helper.from_array(np.array(128 if act_dtype == "uint8" else 3, in_np), "z"),
             numpy_helper.from_array(np.array(120 if out_dtype == "uint8" else -5, out_np), "z2"),
             numpy_helper.from_array(np.array([1, -1, 4, 6], np.int64), "shape"),
             numpy_helper.from_array(np.array([1], np.int64), "starts"), numpy_helper.from_array(np.array([5], np.int64), "ends"),
             numpy_helper.from_array(np.array([3], np.int64), "axes")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
             helper.make_node("Reshape", ["d0", "shape"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("Transpose", ["d1"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Slice", ["t", "starts", "ends", "axes"], ["sl"]),
             helper.make_node("QuantizeLinear", ["sl", "s", "z2"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z2"], ["y"])]
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "T", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act_dtype, out_dtype", [("uint8", "uint8"), ("uint8", "int8"), ("int8", "uint8")])
def test_moves_on_integers_match_onnxruntime_exactly(act_dtype, out_dtype, tmp_path):
    model = _moves_model(act_dtype, out_dtype)
    from nativeq.compile.api import import_model

    folded = FoldDequantizeQuantize()
    mod = import_model(model, "moves.onnx")
    after = folded(mod)
    def quantizes(m):
        found = []
        relax.analysis.post_order_visit(m["main"].body, lambda e: found.append(e) if isinstance(e, relax.Call)
                                        and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.quantize" else None)
        return len(found)

    assert quantizes(mod) == 3 and quantizes(after) == 1  # only the input's own quantize stays
    path = tmp_path / "moves.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    compiled = load(tmp_path / "art")
    rng = np.random.default_rng(0)
    for t in (1, 7, 40):
        x = rng.uniform(-6, 6, (1, t, 24)).astype(np.float32)  # saturates on both ends too
        np.testing.assert_array_equal(compiled.run({"x": x})["y"], session.run(None, {"x": x})[0])
