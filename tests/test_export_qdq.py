"""QDQ export: file structure (INT4/INT8 initializers, per-axis scales, opset, symbolic time, metadata),
the lint, and fidelity of ONNX Runtime on the file against the PyTorch integer model."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from nativeq.errors import NativeqError
from nativeq.export.fidelity import compare_layers, ort_session
from nativeq.export.lint import check_qdq, lint_qdq
from nativeq.export.qdq import ExportConfig, export_qdq, to_qdq_onnx
from nativeq.qat.convert import convert, int_layers
from nativeq.qat.quantize import QuantConfig, quantize_
from nativeq.qat.sparsity import SparsityConfig, sparsify_, update_masks
from qdq_models import qdq_matmul
from toy_encoder import ToyEncoder, toy_batches, train_toy

torch.set_num_threads(1)
DYN = {"x": {0: "B", 1: "T"}, "y": {0: "B", 1: "T_out"}}


def _qat_toy(bits=4, sparsity=None, steps=4, seed=0, matmuls=False):
    torch.manual_seed(seed)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=bits, bits_rules=(("sub", 8), ("head", 8)), quantize_matmuls=matmuls),
                      example_inputs=(toy_batches(1)[0],))
    if sparsity:
        sparsify_(model, SparsityConfig(sparsity, end_step=2), filter_fn=lambda m, n: n not in ("sub", "depthwise"))
    return train_toy(model, steps, seed=seed, opt=torch.optim.Adam(model.parameters(), lr=1e-3),
                     after_step=update_masks if sparsity else None)


@pytest.fixture(scope="module")
def exported():
    model = _qat_toy(bits=4, sparsity="2:4")
    proto = to_qdq_onnx(model, (toy_batches(1)[0],), ExportConfig(dynamic_axes=DYN))
    return model, proto


def test_structure_int4_int8_initializers_and_per_axis_scales(exported):
    model, proto = exported
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 21)}
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    assert inits["qkv.weight_q"].data_type == TensorProto.INT4
    assert inits["head.weight_q"].data_type == TensorProto.INT8
    assert inits["sub.weight_q"].data_type == TensorProto.INT8
    assert list(inits["qkv.weight_q"].dims) == [32, 96]  # Linear weights stored [in, out] for MatMul
    axis = {a.name: a.i for a in nodes["qkv.weight_DQ"].attribute}["axis"]
    assert axis == 1 and list(inits["qkv.weight_scale"].dims) == [96]
    assert {a.name: a.i for a in nodes["depthwise.weight_DQ"].attribute}["axis"] == 0
    # the stored integers are the converted model's, bit for bit
    int_model = convert(model)
    q = dict(int_layers(int_model))["qkv"].integer_weight().numpy()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["qkv.weight_q"]).astype(np.int8), q.T)
    onnx.checker.check_model(proto, full_check=True)


def test_symbolic_axes_and_metadata(exported):
    _, proto = exported
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "T", 16]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nativeq.weight_bits"] == "4,8" and meta["nativeq.act_bits"] == "8"
    layers = json.loads(meta["nativeq.layers"])
    assert layers["qkv"]["sparsity"] == "2:4" and layers["qkv"]["weight_bits"] == 4 and layers["qkv"]["zeros"] >= 0.5
    assert layers["sub"]["sparsity"] == "dense" and layers["head"]["weight_bits"] == 8


def test_lint_flags_exactly_the_float_products(exported):
    _, proto = exported
    problems = lint_qdq(proto)
    # every Linear/Conv is clean; of the toy's two attention products (activation x activation, not
    # quantized) only the softmax operand is float: q, k and v reach them as dequantized integers,
    # since the data movement after qkv runs on its int8 output (export.propagate)
    assert len(problems) == 1 and "MatMul" in problems[0] and "from Softmax node" in problems[0]
    with pytest.raises(NativeqError, match="from Softmax node '/Softmax', not DequantizeLinear$"):
        check_qdq(proto)


def test_lint_is_clean_when_activation_products_are_quantized():
    model = _qat_toy(bits=4, matmuls=True, steps=2)
    proto = to_qdq_onnx(model, (toy_batches(1)[0],), ExportConfig(dynamic_axes=DYN))
    assert lint_qdq(proto) == []
    check_qdq(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["nativeq.activation_products"]) == ["matmul0", "matmul1"]


def test_lint_on_hand_built_graphs():
    assert lint_qdq(qdq_matmul()) == []
    float_mm = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(np.zeros((3, 4), np.float32), "w")],
    )
    problems = lint_qdq(helper.make_model(float_mm))
    assert len(problems) == 2 and "graph input/initializer" in problems[0]


def test_export_is_written_atomically(tmp_path):
    model = _qat_toy(bits=8, steps=2)
    path = tmp_path / "toy.onnx"
    proto = export_qdq(model, (toy_batches(1)[0],), path, ExportConfig(dynamic_axes=DYN))
    assert onnx.load(str(path)) == proto
    assert [p.name for p in tmp_path.iterdir()] == ["toy.onnx"]


@pytest.mark.parametrize("bits,sparsity,matmuls", [(8, None, True), (4, "2:4", True), (2, None, False)])
def test_ort_fidelity_every_layer_output(bits, sparsity, matmuls):
    model = _qat_toy(bits=bits, sparsity=sparsity, steps=6, seed=bits, matmuls=matmuls)
    proto = to_qdq_onnx(model, (toy_batches(1)[0],), ExportConfig(dynamic_axes=DYN))
    int_model = convert(model)
    feeds = [{"x": x[:1].numpy()} for x in toy_batches(6, t=30, seed=11)] + [{"x": toy_batches(1, t=57)[0].numpy()}]
    result = compare_layers(int_model, proto, feeds)
    assert len(result) == (10 if matmuls else 8)
    total = sum(r.elements for r in result)
    exact = sum(r.exact * r.elements for r in result) / total
    assert exact >= 0.9999, result
    assert max(r.max_steps for r in result) <= 1, result
    # final output (the head's int8 output = logits) within one step
    head_scale = float(dict(int_layers(int_model))["head"].output_scale)
    sess = ort_session(proto)
    for feed in feeds:
        y_ort = sess.run(None, feed)[0]
        with torch.no_grad():
            y = int_model(torch.from_numpy(feed["x"])).numpy()
        assert np.abs(y_ort - y).max() <= head_scale * 1.0001


def test_export_of_a_model_without_quantized_layers_is_an_error():
    with pytest.raises(NativeqError, match="has no quantized layers"):
        to_qdq_onnx(ToyEncoder(), (toy_batches(1)[0],))


def test_power_of_two_scales_make_the_export_bit_exact():
    """With power-of-two scales ORT's float QDQ arithmetic reproduces the integer model exactly."""
    from nativeq.export.fidelity import compare_layers_isolated

    torch.manual_seed(3)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=4, quantize_matmuls=True, power_of_two_scales=True),
                      example_inputs=(toy_batches(1)[0],))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x in toy_batches(4, seed=3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    proto = to_qdq_onnx(model, (toy_batches(1)[0],), ExportConfig(dynamic_axes=DYN))
    scales = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("scale")]
    assert all(np.all(np.log2(s) == np.round(np.log2(s))) for s in scales)
    int_model = convert(model)
    feeds = [{"x": x[:1].numpy()} for x in toy_batches(6, t=35, seed=12)]
    for result in (compare_layers(int_model, proto, feeds), compare_layers_isolated(int_model, proto, feeds)):
        assert all(r.exact == 1.0 for r in result), result
