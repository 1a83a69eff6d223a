"""Slices whose bounds are computed from the sizes, as DPRNN's chunking exports them (torchaudio's SQUIM: the length
padded up to a multiple of the chunk by `rest`, later `x[:, :, :-rest]`). A negative bound counts from the end of
the axis and bounds are clamped to it (ONNX); TVM took `-rest` as the end itself and sized the slice `-rest`, a
negative length, after which the compile hung in TIR's simplifier."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import Analyzer, tirx
from nativeq.compile.onnx_import import import_onnx
from nativeq.runtime import load

CHANNELS, PERIOD = 4, 3
INT64_MAX = 2**63 - 1


def _sliced_by_the_sizes_model() -> onnx.ModelProto:
    """x [1, C, T] -> y = 2 * x[:, :, :-rest], tail = x[:, :, -rest:], with rest = 1 + T % PERIOD (1..PERIOD)
    computed in the graph from Shape(x): both are clamped to the axis for T < rest (y empty, tail all of x)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "axis"], ["length"], axis=0),  # torch's scalar size arithmetic
        helper.make_node("Mod", ["length", "period"], ["remainder"]),
        helper.make_node("Add", ["remainder", "one"], ["rest"]),
        helper.make_node("Neg", ["rest"], ["negative_rest"]),
        helper.make_node("Unsqueeze", ["negative_rest", "zero"], ["minus_rest"]),
        helper.make_node("Slice", ["x", "zero", "minus_rest", "two"], ["sliced"]),
        helper.make_node("Mul", ["sliced", "factor"], ["y"]),
        helper.make_node("Slice", ["x", "minus_rest", "end", "two"], ["tail"]),
    ]
    initializers = [numpy_helper.from_array(np.array([2], np.int64), "two"),
                    numpy_helper.from_array(np.array(2, np.int64), "axis"),
                    numpy_helper.from_array(np.array(PERIOD, np.int64), "period"),
                    numpy_helper.from_array(np.array(1, np.int64), "one"),
                    numpy_helper.from_array(np.array([0], np.int64), "zero"),
                    numpy_helper.from_array(np.array([INT64_MAX], np.int64), "end"),
                    numpy_helper.from_array(np.array(2.0, np.float32), "factor")]
    graph = helper.make_graph(
        nodes, "sliced_by_the_sizes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, "Y"]),
         helper.make_tensor_value_info("tail", TensorProto.FLOAT, [1, CHANNELS, "R"])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_negative_end_from_the_sizes_counts_from_the_end_of_the_axis():
    main = import_onnx(_sliced_by_the_sizes_model())["main"]
    (t,) = tirx.analysis.undefined_vars(main.params[0].ty.shape.values[2], [])
    y_length, tail_length = (fields.shape.values[2] for fields in main.ret_ty.fields)
    for length in range(12):
        rest = 1 + length % PERIOD
        analyzer = Analyzer()
        analyzer.bind(t, tirx.IntImm("int64", length))
        assert int(analyzer.simplify(y_length)) == len(range(length)[:-rest]), (length, y_length)
        assert int(analyzer.simplify(tail_length)) == len(range(length)[-rest:]), (length, tail_length)


@pytest.mark.parametrize("length", [1, 2, 7, 13, 30])
def test_slices_by_the_sizes_match_onnxruntime(length, tmp_path):
    path = tmp_path / "sliced.onnx"
    onnx.save(_sliced_by_the_sizes_model(), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    x = np.random.default_rng(length).standard_normal((1, CHANNELS, length)).astype(np.float32)
    got = load(tmp_path / "art").run({"x": x})
    y, tail = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y", "tail"], {"x": x})
    assert got["y"].shape == y.shape and got["tail"].shape == tail.shape
    np.testing.assert_array_equal(got["y"], y)
    np.testing.assert_array_equal(got["tail"], tail)
