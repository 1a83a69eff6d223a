"""EmptyConstantsAsAllocations: before/expected IR, and a model with empty constant tensors that loads and matches
ONNX Runtime (TVM's loader refuses a serialized [1, 0] tensor: such a library compiled but never loaded)."""

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax
from nativeq.compile.passes.empty_constants import EmptyConstantsAsAllocations
from nativeq.runtime import load


def _module(with_allocations: bool) -> tvm.IRModule:
    """main(x) -> (x, a [1, 0] uint8 tensor, a [2] float32 constant), after CallTIRRewrite (no dataflow)."""
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x], pure=False):
        if with_allocations:
            empty = builder.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([1, 0]), "uint8", 0), name_hint="empty")
        else:
            empty = relax.const(np.zeros((1, 0), np.uint8))
        kept = relax.const(np.array([1.0, 2.0], np.float32))
        builder.emit_func_output(relax.Tuple([x, empty, kept]))
    return builder.get()


def test_an_empty_constant_becomes_an_allocation_and_others_stay():
    allocate = EmptyConstantsAsAllocations()
    after = allocate(_module(with_allocations=False))
    tvm.ir.assert_structural_equal(after, _module(with_allocations=True))
    assert allocate.replaced == 1


def _empty_outputs_model() -> onnx.ModelProto:
    """y = relu(x); q = QuantizeLinear(a [1, 0] constant); d = DequantizeLinear(a [3, 0, 2] int8 constant)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("QuantizeLinear", ["empty_float", "scale", "zero_u8"], ["q"]),
        helper.make_node("DequantizeLinear", ["empty_int8", "scale", "zero_s8"], ["d"]),
    ]
    initializers = [
        numpy_helper.from_array(np.zeros((1, 0), np.float32), "empty_float"),
        numpy_helper.from_array(np.zeros((3, 0, 2), np.int8), "empty_int8"),
        numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "zero_u8"),
        numpy_helper.from_array(np.array(0, np.int8), "zero_s8"),
    ]
    graph = helper.make_graph(
        nodes, "empty_outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 0]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 0, 2])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_model_with_empty_constant_outputs_loads_and_matches_onnxruntime(tmp_path):
    path = tmp_path / "empty.onnx"
    onnx.save(_empty_outputs_model(), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host"))
    x = np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)
    ours = load(tmp_path / "art").run({"x": x})
    theirs = dict(zip(["y", "q", "d"], ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["y", "q", "d"], {"x": x})))
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        assert ours[name].shape == want.shape and ours[name].dtype == want.dtype, name
        np.testing.assert_array_equal(ours[name], want)
