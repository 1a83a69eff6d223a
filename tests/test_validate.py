"""`nativeq.compile.validate`: quantization parameters checked against the ONNX spec before import.

Each refusal is one NativeqError line naming the node and the tensor; valid models of every
quantization format the importer takes pass untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import qdq_models
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile.validate import validate_model
from nativeq.errors import NativeqError


def _model(nodes, inputs, outputs, inits=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _f32(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _refused(model, *fragments):
    with pytest.raises(NativeqError) as info:
        validate_model(model)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _set(model, name, value):
    for k, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return
    raise KeyError(name)


def _quantize_dequantize(scale=0.1, zero_point=np.int8(0), axis=None, shape=(2, 4), opset=21, **attrs):
    """x[shape] -> QuantizeLinear(scale, zero_point) -> DequantizeLinear -> y."""
    axis_attr = {} if axis is None else {"axis": axis}
    inits = [_f32("s", scale), numpy_helper.from_array(np.asarray(zero_point), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quant", **axis_attr, **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dequant", **axis_attr)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits, opset)


VALID_MODELS = {
    "qdq_matmul": lambda: qdq_models.qdq_matmul(k=16, n=8),
    "qdq_conv1d": lambda: qdq_models.qdq_conv1d(c_in=8, c_out=8),
    "qdq_conv2d": lambda: qdq_models.qdq_conv2d(),
    "qdq_gemm": lambda: qdq_models.qdq_gemm(),
    "qlinear_matmul": lambda: qdq_models.qlinear_matmul(k=16, n=8),
    "qlinear_conv": lambda: qdq_models.qlinear_conv(),
    "matmul_integer": lambda: qdq_models.matmul_integer(k=64),
    "conv_integer": lambda: qdq_models.conv_integer(),
    "dynamic_quantize_matmul": lambda: qdq_models.dynamic_quantize_matmul(),
    "int4_matmul": lambda: qdq_models.int4_matmul(),
    "int4_blocked": lambda: qdq_models.int4_matmul(block_size=16),
    "int4_activation": lambda: qdq_models.int4_activation_qdq(),
    "separable_block": lambda: qdq_models.qdq_separable_block(),
    "activation_chain": lambda: qdq_models.qdq_activation_chain(),
    "shape_arithmetic": lambda: qdq_models.dynamic_shape_arithmetic(),
    "qoperator_activations": lambda: qdq_models.ort_qoperator_activations(),
}


@pytest.mark.parametrize("name", VALID_MODELS)
def test_valid_models_pass(name):
    validate_model(VALID_MODELS[name]())


@pytest.mark.parametrize("value, fragment", [
    (0.0, "is 0; a scale must be finite and > 0"),
    (-0.5, "is -0.5; a scale must be finite and > 0"),
    (np.nan, "is nan"),
    (np.inf, "is inf; a scale must be finite and > 0 (calibrated on a tensor holding an infinity, such as an "
             "attention mask: leave that tensor out of quantization)"),
    (-np.inf, "is -inf"),
    (1e38, "overflow FLOAT (largest usable scale 1.33444e+36)"),
    (1e-40, "below the smallest normal FLOAT"),
])
def test_bad_scale_values_are_refused_naming_node_and_tensor(value, fragment):
    _refused(_quantize_dequantize(scale=value), "QuantizeLinear node 'quant': scale 's'", fragment)


def test_extreme_but_usable_scales_pass():
    validate_model(_quantize_dequantize(scale=1e30))
    validate_model(_quantize_dequantize(scale=1e-30))


def test_per_channel_scale_names_the_bad_element():
    model = qdq_models.qdq_matmul(k=16, n=8)
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc_wscale")).copy()
    scales[5] = np.nan
    _set(model, "fc_wscale", scales)
    _refused(model, "DequantizeLinear node 'fc_wDQ': scale 'fc_wscale'[5] is nan")


def test_unnamed_node_is_named_by_op_type_and_index():
    model = _quantize_dequantize(scale=0.0)
    model.graph.node[0].name = ""
    _refused(model, "QuantizeLinear node #0 (unnamed): scale 's' is 0")


def test_scale_from_a_constant_node_is_checked():
    model = _quantize_dequantize()
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["s"], name="scale_const",
                                                value=numpy_helper.from_array(np.array(np.nan, np.float32))))
    _refused(model, "QuantizeLinear node 'quant': scale 's' is nan")


def test_scales_that_are_graph_inputs_are_not_checked():
    model = _quantize_dequantize(scale=0.0)
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    validate_model(model)


def test_zero_point_type_must_match_the_quantized_tensor():
    model = _quantize_dequantize()
    model.graph.node[1].input[2] = "zp_u8"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"))
    _refused(model, "DequantizeLinear node 'dequant': zero point 'zp_u8' is UINT8 but 'q' is INT8")


def test_output_dtype_must_agree_with_the_zero_point():
    _refused(_quantize_dequantize(output_dtype=TensorProto.UINT8),
             "QuantizeLinear node 'quant': output_dtype is UINT8 but zero point 'zp' is INT8")


def test_zero_point_stored_outside_its_type_is_refused():
    model = _quantize_dequantize()
    stored = onnx.TensorProto(name="zp", data_type=TensorProto.INT8, dims=[])
    stored.int32_data.append(300)
    model.graph.initializer[1].CopyFrom(stored)
    _refused(model, "zero point 'zp' holds 300, outside the INT8 range [-128, 127]")


def test_int32_dequantize_zero_point_must_be_zero():
    model = _model([helper.make_node("DequantizeLinear", ["b", "s", "zp"], ["y"], name="bias_dq")], [],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                   [numpy_helper.from_array(np.array([5, 6, 7], np.int32), "b"), _f32("s", 0.01),
                    numpy_helper.from_array(np.array(2, np.int32), "zp")])
    _refused(model, "DequantizeLinear node 'bias_dq': zero point 'zp' of the int32 input 'b' must be 0")


def test_per_axis_length_must_equal_the_axis_dimension():
    _refused(_quantize_dequantize(scale=[0.1, 0.2, 0.3], zero_point=np.zeros(3, np.int8), axis=1),
             "QuantizeLinear node 'quant': scale 's' has 3 elements but axis 1 of 'x' has 4")


def test_per_axis_scale_and_zero_point_shapes_must_agree():
    _refused(_quantize_dequantize(scale=[0.1] * 4, zero_point=np.int8(0), axis=1),
             "scale 's' has shape [4] but zero point 'zp' has shape []")


def test_axis_out_of_range_is_refused():
    _refused(_quantize_dequantize(scale=[0.1] * 4, zero_point=np.zeros(4, np.int8), axis=2),
             "QuantizeLinear node 'quant': axis 2 is out of range for input 'x' of rank 2")


def test_per_axis_before_opset_13_is_refused():
    model = _quantize_dequantize(scale=[0.1, 0.2], zero_point=np.zeros(2, np.int8), opset=10)
    _refused(model, "is per-axis (2 elements), which needs opset >= 13 (the model imports opset 10)")


def test_blocked_scale_shape_must_tile_the_input():
    model = qdq_models.int4_matmul(k=64, n=48, block_size=16)  # scale [4, 48] for a [64, 48] weight
    validate_model(model)
    for node in model.graph.node:
        if node.name == "fc_wDQ":
            for a in node.attribute:
                if a.name == "block_size":
                    a.i = 32
    _refused(model, "DequantizeLinear node 'fc_wDQ': blocked scale 'fc_wscale' has shape [4, 48]",
             "block_size 32 on axis 0 needs 2 on axis 0")


def test_negative_block_size_is_refused():
    _refused(_quantize_dequantize(block_size=-1), "block_size is -1")


def _qlinear_matmul(a_scale=0.05, b_scale=0.01, y_scale=0.25):
    model = qdq_models.qlinear_matmul(k=16, n=8, per_channel=False)
    _set(model, "x_scale", np.float32(a_scale))
    _set(model, "fc_wscale", np.asarray(b_scale, np.float32))
    _set(model, "y_scale", np.float32(y_scale))
    return model


def test_qlinear_matmul_accumulator_multiplier_must_be_a_normal_float32():
    # each scale is a fine normal float; their product underflows to a denormal
    _refused(_qlinear_matmul(a_scale=1e-20, b_scale=1e-20),
             "QLinearMatMul node 'fc_QLinearMatMul': accumulator multiplier 'x_scale' * 'fc_wscale'",
             "is not a normal float32")


def test_qlinear_matmul_requantize_multiplier_must_be_a_normal_float32():
    _refused(_qlinear_matmul(a_scale=1e-10, b_scale=1e-10, y_scale=1e30),
             "requantize multiplier 'x_scale' * 'fc_wscale' / 'y_scale'", "is not a normal float32")


def test_accumulator_multiplier_must_keep_int32_accumulators_finite():
    _refused(_qlinear_matmul(a_scale=1e20, b_scale=1e20),
             "accumulator multiplier 'x_scale' * 'fc_wscale' = 1e+40 is not a normal float32")
    _refused(_qlinear_matmul(a_scale=1e15, b_scale=1e15),
             "= 1e+30 overflows float32 on a 32-bit accumulator")


def test_qlinear_matmul_per_row_activation_scale_is_refused():
    model = _qlinear_matmul()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.node[1].input[1] = "a_rows"
    model.graph.node[1].input[2] = "a_rows_zp"
    model.graph.initializer.extend([_f32("a_rows", np.full(4, 0.05)),
                                    numpy_helper.from_array(np.full(4, 128, np.uint8), "a_rows_zp")])
    _refused(model, "QLinearMatMul node 'fc_QLinearMatMul': a_scale 'a_rows' has shape [4]",
             "takes a scalar (per-tensor) a_scale")
    assert model.graph.node[1].op_type == "QLinearMatMul"


def test_qlinear_matmul_per_column_length_must_match():
    model = qdq_models.qlinear_matmul(k=16, n=8)
    _set(model, "fc_wscale", np.full(7, 0.01, np.float32))
    _refused(model, "b_scale 'fc_wscale' has 7 elements but the number of columns of 'fc_wq' is 8")


def test_qdq_matmul_multiplier_is_checked_through_the_bias_add():
    model = qdq_models.qdq_matmul(k=16, n=8, per_channel=False)
    _set(model, "x_scale", np.float32(1e-10))
    _set(model, "fc_wscale", np.float32(1e-10))
    validate_model(model)  # 1e-20 is a normal float32; 1e-20 / 0.1 too
    _set(model, "y_scale", np.float32(1e25))
    _refused(model, "MatMul node 'fc_MatMul': requantize multiplier 'x_scale' * 'fc_wscale' / 'y_scale'")


def test_qlinear_conv_bias_and_channel_lengths():
    model = qdq_models.qlinear_conv(c_in=4, c_out=6, kernel=(3,), spatial=(12,))
    validate_model(model)
    _set(model, "conv_bias", np.zeros(5, np.int32))
    _refused(model, "QLinearConv node 'conv_QLinearConv': bias 'conv_bias' has shape [5]")
    model = qdq_models.qlinear_conv(c_in=4, c_out=6, kernel=(3,), spatial=(12,))
    _set(model, "conv_wscale", np.full(5, 0.01, np.float32))
    _refused(model, "w_scale 'conv_wscale' has 5 elements but the number of output channels of 'conv_wq' is 6")


def test_matmul_integer_zero_points():
    model = qdq_models.matmul_integer(k=16, n=8, t=4)
    validate_model(model)
    _set(model, "fc_wzp", np.zeros(7, np.int8))
    _refused(model, "MatMulInteger node 'fc_MatMulInteger': b_zero_point 'fc_wzp' has 7 elements")
    model = qdq_models.matmul_integer(k=16, n=8, t=4)
    model.graph.node[1].input[2] = "a_rows_zp"
    model.graph.initializer.append(numpy_helper.from_array(np.full(4, 128, np.uint8), "a_rows_zp"))
    _refused(model, "a_zero_point 'a_rows_zp' has shape [4]; MatMulInteger takes a scalar (per-tensor) a_zero_point")


def test_conv_integer_activation_zero_point_must_be_scalar():
    model = qdq_models.conv_integer(c_in=8, c_out=4)
    model.graph.node[1].input[2] = "x_channels_zp"
    model.graph.initializer.append(numpy_helper.from_array(np.full(8, 128, np.uint8), "x_channels_zp"))
    _refused(model, "ConvInteger node 'conv_ConvInteger': x_zero_point 'x_channels_zp' has shape [8]")


def _gather_model(index, op="Gather"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([helper.make_node(op, ["x", "idx"], ["y"], name="pick", axis=1)], [x], [y],
                  [numpy_helper.from_array(np.asarray(index, np.int64), "idx")])


def test_gather_constant_index_out_of_range_is_refused():
    _refused(_gather_model([-1000]), "Gather node 'pick': indices 'idx' hold -1000, outside [-5, 4] for axis 1 of 'x'")
    _refused(_gather_model(5), "hold 5, outside [-5, 4]")
    validate_model(_gather_model([-5, 4, 0]))


def test_gather_elements_constant_index_out_of_range_is_refused():
    _refused(_gather_model(np.full((3, 2), 7), op="GatherElements"), "GatherElements node 'pick': indices 'idx' hold 7")
    validate_model(_gather_model(np.full((3, 2), -5), op="GatherElements"))


def test_empty_graphs_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    _refused(_model([], [x], [x]), "graph 'g' has no nodes")
    _refused(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], []), "graph 'g' declares no outputs")


def test_opset_newer_than_onnx_knows_is_refused():
    model = _quantize_dequantize()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    _refused(model, f"model imports ONNX opset {onnx.defs.onnx_opset_version() + 1}, newer than any this onnx")


def test_names_that_are_not_utf8_are_refused():
    """A flipped byte in a dim name passes onnx.checker; protobuf hands it back as bytes."""
    model = qdq_models.qdq_matmul(k=16, n=8, t="ZZZZ")
    data = model.SerializeToString().replace(b"ZZZZ", b"\xae\xae\xae\xae")
    corrupted = onnx.ModelProto()
    corrupted.ParseFromString(data)
    _refused(corrupted, "graph input 'x' names dimension 1 b'\\xae\\xae\\xae\\xae', which is not UTF-8 text")


def test_compile_refuses_in_one_cli_line(nativeq_cli, tmp_path):
    onnx.save(_quantize_dequantize(scale=np.nan), tmp_path / "nan_scale.onnx")
    res = nativeq_cli("compile", "nan_scale.onnx", "--target", "host", "-o", "out")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr == "error: QuantizeLinear node 'quant': scale 's' is nan; a scale must be finite and > 0\n"
    assert not (tmp_path / "out").exists()


def test_importer_failure_prints_one_line_and_nothing_on_stdout(nativeq_cli, tmp_path):
    """TVM's importer prints the failing operator on stdout and a C++ warning on stderr; compile keeps neither,
    and names the user's node (a QLinearConv, which the importer sees rewritten to a float Conv)."""
    model = qdq_models.qlinear_conv(c_in=4, c_out=6, kernel=(3,), spatial=(12,))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5  # 5 channels into a 4-channel conv
    onnx.save(model, tmp_path / "channels.onnx")
    res = nativeq_cli("compile", "channels.onnx", "--target", "host", "-o", "out")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert res.stderr.startswith("error: QLinearConv node 'conv_QLinearConv': TVM's ONNX importer cannot convert it: ") \
        and res.stderr.count("\n") == 1, res.stderr
