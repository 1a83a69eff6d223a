"""Weights in the encodings quantizers other than `quantize_static` write, folded to what the kernels read.

- fold_constant_quantize (ONNX legalization): a float weight behind QuantizeLinear -> DequantizeLinear (NNCF,
  PyTorch's PT2E export, fake-quant graphs) becomes the integer initializer ONNX Runtime's QuantizeLinear computes,
  so the int8 rewrite takes the site;
- FoldConstantDequantize (Relax, last of the int8 passes): a weight whose site stays float (16-bit activations:
  `quantize_static(activation_type=QUInt16)`) is a float32 constant before the conv layout passes, so the conv
  runs on the float im2col / depthwise kernels instead of TVM's scalar loop nest;
- standard_domain_qdq (ONNX legalization): ONNX Runtime's contrib-domain QuantizeLinear / DequantizeLinear (what its
  quantizer writes for 4-bit weights below opset 21, or with `UseQDQContribOps`) become the standard ops, so shape
  inference sees through them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models as zoo
from kernel_rules import schedule_rules
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.onnx_legalize import legalize
from nativeq.compile.passes.fold_constant_dequantize import FoldConstantDequantize
from nativeq.runtime import load
from nativeq.verify import VerifyConfig, verify_artifact


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# ---------------------------------------------------------------------------------------------- QuantizeLinear
# (zero-point dtype or None for the default uint8, output_dtype attribute, per-axis axis or None, opset)
QUANTIZE_CASES = {
    "uint8 per-tensor, zero point 131": (np.uint8, 0, None, 21),
    "int8 per-channel axis 0": (np.int8, 0, 0, 21),
    "int8 per-channel axis 1 (MatMul weight)": (np.int8, 0, 1, 21),
    "int8 per-channel, opset 13": (np.int8, 0, 1, 13),
    "int16 per-channel": (np.int16, 0, 0, 21),
    "uint16 per-tensor": (np.uint16, 0, None, 21),
    "no zero point (uint8)": (None, 0, None, 21),
    "int4 via output_dtype": (None, TensorProto.INT4, 1, 21),
}


def _quantize_weight_model(zp_dtype, output_dtype: int, axis, opset: int) -> onnx.ModelProto:
    """W[6, 5] (float initializer) -> QuantizeLinear -> DequantizeLinear -> y: ties x/scale = k + 0.5 (odd and even k),
    negative ties, values past both ends of the range, and plain values."""
    rng = np.random.default_rng(3)
    scale = (np.array([0.02, 0.05, 0.1, 0.25, 0.5, 1.0][: 6 if axis == 0 else 5], np.float32) if axis is not None
             else np.array(0.05, np.float32))
    shape = [1, 1]
    if axis is not None:
        shape[axis] = -1
    ticks = rng.integers(-300, 300, (6, 5)).astype(np.float32) + np.where(rng.random((6, 5)) < 0.5, 0.5, 0.25)
    ticks[0, :] = [0.5, 1.5, 2.5, -0.5, -1.5]  # exact ties: half to even
    ticks[1, :] = [1e5, -1e5, 127.5, -128.5, 70000.0]  # saturation
    w = (ticks * scale.reshape(shape)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s")]
    q_inputs = ["w", "s"]
    if zp_dtype is not None:
        zp_value = {np.uint8: 131, np.int8: -3, np.int16: 1000, np.uint16: 30000}[zp_dtype]
        zp = np.full(scale.shape, zp_value, zp_dtype)
        inits.append(numpy_helper.from_array(zp, "zp"))
        q_inputs.append("zp")
    axis_attr = {"axis": axis} if axis is not None else {}
    q_attrs = {**axis_attr, **({"output_dtype": output_dtype} if output_dtype else {})}
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["wq"], name="w_Q", **q_attrs),
             helper.make_node("DequantizeLinear", ["wq", *q_inputs[1:]], ["wd"], name="w_DQ", **axis_attr),
             helper.make_node("Add", ["x", "wd"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "q_weight", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_a_quantized_float_initializer_folds_to_what_onnxruntime_computes(case):
    model = _quantize_weight_model(*QUANTIZE_CASES[case])
    legal = legalize(model)
    assert "QuantizeLinear" not in {n.op_type for n in legal.graph.node}
    x = {"x": np.zeros((6, 5), np.float32)}
    np.testing.assert_array_equal(_ort(legal, x), _ort(model, x))


def test_a_quantize_of_a_run_time_tensor_is_left_alone():
    legal = legalize(zoo.qdq_matmul(k=16, n=8))
    assert sum(n.op_type == "QuantizeLinear" for n in legal.graph.node) == 2  # the input's and the output's


# ---------------------------------------------------------------------------------------------- float weights
def float_weights_behind_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every integer weight initializer -> DequantizeLinear rewritten as float initializer -> QuantizeLinear ->
    DequantizeLinear with the same scale and zero point (the encoding NNCF and PT2E exports write)."""
    out = copy.deepcopy(model)
    inits = {i.name: i for i in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        values = numpy_helper.to_array(inits[node.input[0]]) if node.input[0] in inits else None
        if node.op_type == "DequantizeLinear" and values is not None and values.dtype == np.int8 and values.ndim >= 2:
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * values.ndim
            shape[axis] = -1
            w = ((values.astype(np.float32) - zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
            out.graph.initializer.append(numpy_helper.from_array(w, node.input[0] + "_float"))
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0] + "_float", *node.input[1:]],
                                          [node.input[0] + "_q"], name=node.name + "_Q", axis=axis))
            node.input[0] = node.input[0] + "_q"
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


FLOAT_WEIGHT_MODELS = {
    "matmul u8": lambda: zoo.qdq_matmul(k=40, n=24, act_dtype="uint8"),
    "conv1d k3 s8": lambda: zoo.qdq_conv1d(c_in=16, c_out=24, kernel=3),
    "depthwise conv1d k5": lambda: zoo.qdq_conv1d(c_in=16, c_out=16, kernel=5, groups=16),
}


@pytest.mark.parametrize("name", FLOAT_WEIGHT_MODELS)
def test_a_float_weight_behind_qdq_is_an_int8_site_bit_identical_to_the_integer_weight(name, tmp_path):
    """The same model with int8 weight initializers and with float weights behind Q/DQ: both compile to int8
    kernels (no float contraction), their outputs are bit-identical, and equal ONNX Runtime's."""
    integer = FLOAT_WEIGHT_MODELS[name]()
    floats = float_weights_behind_qdq(integer)
    rules = schedule_rules(floats, tmp_path)
    assert not any(rule.startswith("float-") for rule in rules.values()), rules
    assert {"int8-matmul", "depthwise"} & set(rules.values()), rules
    outputs = []
    for label, model in (("integer", integer), ("float", floats)):
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, path)
        compile_model(path, tmp_path / label, CompileConfig(target="host", use_tuning=False))
        outputs.append(load(tmp_path / label))
    shape = [d.dim_value or 37 for d in integer.graph.input[0].type.tensor_type.shape.dim]
    x = {"x": np.random.default_rng(5).normal(0, 2.0, shape).astype(np.float32)}
    got_integer, got_float = (m.run(x)["y"] for m in outputs)
    np.testing.assert_array_equal(got_float, got_integer)
    np.testing.assert_array_equal(got_float, _ort(floats, x))


# ---------------------------------------------------------------------------------------------- 16-bit activations
def _dequantize_conv_module(weight: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 0):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, weight.shape[1], 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.dequantize(relax.const(weight), relax.const(scale), relax.const(zp), axis=axis))
            y = bb.emit(relax.op.nn.conv1d(x, w, padding=[1, 1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _conv_module(weight: np.ndarray, input_channels: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, input_channels, 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv1d(x, relax.const(weight), padding=[1, 1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_a_dequantize_of_constants_becomes_the_float_weight_read_directly():
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (8, 4, 3)).astype(np.int8)
    scale = rng.uniform(0.001, 0.1, 8).astype(np.float32)
    zp = rng.integers(-5, 5, 8).astype(np.int8)
    fold = FoldConstantDequantize()
    after = fold(_dequantize_conv_module(weight, scale, zp))
    expected = ((weight.astype(np.int32) - zp.astype(np.int32)[:, None, None]).astype(np.float32)
                * scale[:, None, None])
    tvm.ir.assert_structural_equal(after, _conv_module(expected, 4), map_free_vars=True)
    assert fold.folded == 1


def test_a_dequantize_of_a_run_time_tensor_is_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.dequantize(x, relax.const(0.5, "float32"), relax.const(1, "int8")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    before = bb.get()
    fold = FoldConstantDequantize()
    tvm.ir.assert_structural_equal(fold(before), before)
    assert fold.folded == 0


def _a16w8_conv_model(groups: int, kernel: int, act: str = "uint16", t="T") -> onnx.ModelProto:
    """x -> Q/DQ (16-bit) -> Conv(DQ(int8 W per channel)) + bias -> Q/DQ (16-bit) -> y: the A16W8 form of
    `quantize_static(activation_type=QUInt16)`."""
    rng = np.random.default_rng(groups + kernel)
    channels = 16
    qtype, npdt, zp = (TensorProto.UINT16, np.uint16, 32768) if act == "uint16" else (TensorProto.INT16, np.int16, 0)
    nodes, inits = [], []

    def q_dq(name, src, scale):
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                      numpy_helper.from_array(np.array(zp, npdt), f"{name}_zp")])
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_zp"], [f"{name}_q"], name=f"{name}_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"],
                                      name=f"{name}_DQ"))
        return f"{name}_dq"

    xa = q_dq("x", "x", 1e-4)
    w = zoo._weight_dq(nodes, inits, "conv", rng.normal(0, 0.2, (channels, channels // groups, kernel)).astype(np.float32),
                       axis=0)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "conv_b"))
    nodes.append(helper.make_node("Conv", [xa, w, "conv_b"], ["conv"], name="conv_Conv", kernel_shape=[kernel],
                                  pads=[kernel // 2, kernel // 2], group=groups))
    yq = q_dq("y", "conv", 2e-4)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    return zoo._model(nodes, inits, [1, channels, t], [1, channels, t], "a16w8_conv")


@pytest.mark.parametrize("groups,kernel", [(1, 1), (1, 3), (16, 5)], ids=["pointwise", "k3", "depthwise"])
def test_a16w8_convs_run_on_the_float_conv_kernels_and_match_onnxruntime(groups, kernel, tmp_path):
    """16-bit activations stay float (the int8 kernels read 8 bits); the conv's weight is a float constant, so the
    conv takes the float routes (im2col + packed float matmul, the float depthwise kernel), none the generic path,
    and the result agrees with ONNX Runtime within a quantization step of the 16-bit output (a float conv sums in
    its own order: a 16-bit step is 1/256 of an 8-bit one)."""
    model = _a16w8_conv_model(groups, kernel)
    rules = schedule_rules(model, tmp_path)
    wanted = "float-depthwise" if groups > 1 else "float-matmul"
    assert wanted in rules.values(), rules
    assert not [name for name, rule in rules.items() if rule == "generic" and "conv" in name], rules
    path = tmp_path / "a16w8.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 45}, runs=2))
    assert report.passed and report.outputs[0].max_steps < 1.01, report.table()


# ---------------------------------------------------------------------------------------------- contrib-domain Q/DQ
def _attention_float_model(path: Path) -> None:
    """`nn.MultiheadAttention` between two Linears, exported by TorchScript: the exporter computes the head reshapes'
    sizes from the input's shape (Shape -> Gather -> Mul / Div -> Slice, Reshape) after the projections."""
    import torch
    from torch import nn

    from benchmarks.zoo.models import OnnxIO, export_float_onnx

    class Attention(nn.Module):
        def __init__(self, d: int = 32, heads: int = 4):
            super().__init__()
            self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    path.write_bytes(export_float_onnx(Attention().eval(), torch.randn(1, 20, 32),
                                       OnnxIO("x", "y", {"x": {1: "T"}, "y": {1: "T"}})))


def _quantize_attention(directory: Path, **options) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Features(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.normal(0, 1, (1, t, 32)).astype(np.float32)} for t in (24, 40, 64)])

        def get_next(self):
            return next(self.batches, None)

    directory.mkdir(exist_ok=True)
    source, quantized = directory / "float.onnx", directory / "quantized.onnx"
    _attention_float_model(source)
    quantize_static(str(source), str(quantized), Features(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, **options)
    return quantized


# options of `quantize_static` (besides QDQ, per-channel, uint8 activations) -> what the written model holds
ORT_OPTIONS = {
    "int4 weights": ({"weight_type": "QInt4"}, "contrib-domain Q/DQ"),
    "UseQDQContribOps": ({"weight_type": "QInt8", "extra_options": {"UseQDQContribOps": True}}, "contrib-domain Q/DQ"),
    "AddQDQPairToWeight": ({"weight_type": "QInt8", "extra_options": {"AddQDQPairToWeight": True}},
                           "float weights behind Q/DQ"),
}


def _ort_options(options: dict) -> dict:
    from onnxruntime.quantization import QuantType

    return {**options, "weight_type": getattr(QuantType, options["weight_type"])}


@pytest.mark.parametrize("options", ORT_OPTIONS)
def test_onnxruntime_quantizer_options_compile_to_int8_kernels_and_verify(options, tmp_path):
    """`quantize_static(weight_type=QInt4)` at opset 17 writes every Q/DQ in the com.microsoft domain (and so does
    `UseQDQContribOps`): the attention's head reshapes, computed from shapes after those ops, did not import
    (TVM's Reshape converter refused a run-time shape tensor). `AddQDQPairToWeight` keeps float weights behind a
    Q/DQ pair: every matmul ran in float. Now every matmul is an int8 site, 4-bit weights are stored packed, and
    the result verifies against ORT."""
    from nativeq.compile.api import explain_int8, import_model, load_onnx
    from nativeq.targets import get_target

    kwargs, encoding = ORT_OPTIONS[options]
    path = _quantize_attention(tmp_path / "model", **_ort_options(kwargs))
    model = onnx.load(path)
    initializers = {i.name for i in model.graph.initializer}
    if encoding == "contrib-domain Q/DQ":
        assert {n.domain for n in model.graph.node if n.op_type == "DequantizeLinear"} == {"com.microsoft"}
    else:
        assert any(n.op_type == "QuantizeLinear" and n.input[0] in initializers for n in model.graph.node)
    sites = explain_int8(import_model(load_onnx(path), path), get_target("host"))
    assert sites and all(site["status"] == "int8" for site in sites), sites
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    if options == "int4 weights":
        int8_path = _quantize_attention(tmp_path / "int8_model", **_ort_options({"weight_type": "QInt8"}))
        int8 = compile_model(int8_path, tmp_path / "int8", CompileConfig(target="host", use_tuning=False))

        def contraction_weight_bytes(compiled):
            return sum(k["weight_bytes"] for k in compiled.kernels if k["kind"] == "contraction")

        # the 4-bit values take half the bytes; per-channel scales and int32 biases stay as they are
        assert contraction_weight_bytes(result) < 0.75 * contraction_weight_bytes(int8), (result.kernels, int8.kernels)
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 57}, runs=2, accept_ties=True))
    assert report.passed, report.table()
