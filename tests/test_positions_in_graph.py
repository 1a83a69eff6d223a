"""Positional tables a model computes from its input's length (`torch.arange(x.shape[1], dtype=torch.float32)`):
the table's length stays the input's symbolic length, and the model matches ONNX Runtime at any length."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.onnx_import import import_onnx
from nativeq.runtime import load

VOCAB, DIM = 20, 8


def _token_encoder(range_dtype) -> onnx.ModelProto:
    """ids int64 [1, L] -> embedding [1, L, 8] + sin(Range(0, L, 1) x frequencies) (a text encoder's positions)."""
    rng = np.random.default_rng(0)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(range_dtype))
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"]),
        helper.make_node("Cast", ["length"], ["length_cast"], to=onnx_type),
        helper.make_node("Range", ["start", "length_cast", "delta"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["positions_float", "axis1"], ["column"]),
        helper.make_node("Mul", ["column", "frequencies"], ["angles"]),
        helper.make_node("Sin", ["angles"], ["table_of_positions"]),
        helper.make_node("Add", ["embedded", "table_of_positions"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, range_dtype), "start"),
        numpy_helper.from_array(np.array(1, range_dtype), "delta"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.exp(-np.arange(DIM) / DIM).astype(np.float32), "frequencies"),
    ]
    graph = helper.make_graph(nodes, "token_encoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", DIM])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("range_dtype", [np.int64, np.float32])
def test_the_table_length_is_the_input_length(range_dtype):
    text = import_onnx(_token_encoder(range_dtype))["main"].script()
    assert "range_len" not in text and "R.arange(0, L, 1" in text, text


@pytest.mark.parametrize("range_dtype", [np.int64, np.float32])
def test_token_encoder_matches_onnxruntime(range_dtype, tmp_path):
    model = _token_encoder(range_dtype)
    path = tmp_path / "encoder.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    compiled = load(tmp_path / "art")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for length in (1, 5, 37):
        feeds = {"ids": rng.integers(0, VOCAB, (1, length)).astype(np.int64)}
        np.testing.assert_allclose(compiled.run(feeds)["y"], session.run(None, feeds)[0], rtol=1e-6, atol=1e-6)
