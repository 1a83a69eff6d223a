"""ONNX legalization and import: every zoo model, legalized, computes what ORT computes on the
original, imports into TVM, and (built with TVM's default llvm pipeline) agrees with ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qdq_models as zoo
from nativeq.compile.onnx_legalize import FLOAT32_EXACT_INT, check_importable, legalize
from nativeq.errors import NativeqError


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def tvm_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Import with nativeq's importer and build with TVM's default pipeline for llvm (no nativeq passes)."""
    import tvm
    from tvm import relax

    from nativeq.compile.onnx_import import import_onnx

    executable = tvm.compile(import_onnx(model), target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple, tvm.ir.Array)) else [out.numpy()]


def _x(shape, seed=0, spread=2.0):
    return {"x": np.random.default_rng(seed).normal(0, spread, shape).astype(np.float32)}


# (builder, input shape, output quantization step or None for an exact integer/float output,
#  ops the stock TVM importer lacks in the original)
ZOO = {
    "qlinear_matmul_u8": (lambda: zoo.qlinear_matmul(), (37, 64), 0.25, {"QLinearMatMul"}),
    "qlinear_matmul_s8_per_tensor": (lambda: zoo.qlinear_matmul(act_dtype="int8", per_channel=False), (37, 64), 0.25,
                                     {"QLinearMatMul"}),
    "qlinear_conv1d_u8": (lambda: zoo.qlinear_conv(), (1, 16, 50), 0.1, {"QLinearConv"}),
    "qlinear_conv1d_s8_no_bias": (lambda: zoo.qlinear_conv(act_dtype="int8", bias=False), (1, 16, 50), 0.1, {"QLinearConv"}),
    "qlinear_conv2d_s8_stride2": (lambda: zoo.qlinear_conv(kernel=(3, 3), spatial=(14, 14), stride=2, act_dtype="int8"),
                                  (1, 16, 14, 14), 0.1, {"QLinearConv"}),
    "qlinear_conv1d_depthwise": (lambda: zoo.qlinear_conv(c_in=24, c_out=24, groups=24, kernel=(5,)), (1, 24, 50), 0.1,
                                 {"QLinearConv"}),
    "qlinear_conv2d_per_tensor": (lambda: zoo.qlinear_conv(kernel=(3, 3), spatial=(10, 10), per_channel=False),
                                  (1, 16, 10, 10), 0.1, {"QLinearConv"}),
    "matmul_integer_k4096": (lambda: zoo.matmul_integer(), (9, 4096), None, set()),
    "matmul_integer_s8_per_tensor_zp": (lambda: zoo.matmul_integer(k=512, act_dtype="int8", per_channel_zp=False),
                                        (9, 512), None, set()),
    "conv_integer_1d": (lambda: zoo.conv_integer(), (1, 64, 40), None, {"ConvInteger"}),
    "conv_integer_2d_split": (lambda: zoo.conv_integer(c_in=256, kernel=(3, 3), spatial=(6, 6)), (1, 256, 6, 6), None,
                              {"ConvInteger"}),
    "dynamic_quantize_matmul": (lambda: zoo.dynamic_quantize_matmul(), (9, 256), None, set()),
    "int4_matmul_per_channel": (lambda: zoo.int4_matmul(), (1, 21, 64), 0.1, {"INT4 initializer"}),
    "uint4_matmul_per_tensor": (lambda: zoo.int4_matmul(per_channel=False, signed=False), (1, 21, 64), 0.1,
                                {"UINT4 initializer"}),
    "uint4_matmul_blocked": (lambda: zoo.int4_matmul(block_size=16, signed=False), (1, 21, 64), 0.1,
                             {"DequantizeLinear with block_size"}),
    "int4_activation": (lambda: zoo.int4_activation_qdq(), (1, 21, 32), 0.1, {"INT4 initializer"}),
    "qdq_gemm_transb": (lambda: zoo.qdq_gemm(), (8, 64), 0.1, set()),
    "qdq_gemm_per_tensor_s8": (lambda: zoo.qdq_gemm(act_dtype="int8", per_channel=False), (8, 64), 0.1, set()),
    "ort_qoperator_activations_u8": (lambda: zoo.ort_qoperator_activations("uint8"), (1, 8, 16, 16), "output",
                                     {"QLinearConv", "com.microsoft.QLinearSigmoid", "com.microsoft.QLinearAveragePool"}),
    "ort_qoperator_activations_s8": (lambda: zoo.ort_qoperator_activations("int8"), (1, 8, 16, 16), "output",
                                     {"com.microsoft.QLinearLeakyRelu", "com.microsoft.QLinearGlobalAveragePool"}),
}


def _compare(name, reference, got, step, model=None):
    if step == "output":
        step = _output_scale(model)
    assert reference.dtype == got.dtype and reference.shape == got.shape, name
    if step is None:
        np.testing.assert_array_equal(got, reference, err_msg=name)
        return
    steps = np.abs(got.astype(np.float64) - reference.astype(np.float64)) / step
    assert steps.max() <= 1 + 1e-6, f"{name}: {steps.max()} steps"
    assert (steps < 1e-6).mean() >= 0.99, f"{name}: only {(steps < 1e-6).mean():.2%} exact"


@pytest.mark.parametrize("name", ZOO)
def test_legalized_model_matches_original_in_ort(name):
    build, shape, step, lacking = ZOO[name]
    model = build()
    legal = legalize(model)
    onnx.checker.check_model(legal, full_check=True)
    check_importable(legal)
    feeds = _x(shape, seed=len(name))
    _compare(name, ort_run(model, feeds)[0], ort_run(legal, feeds)[0], step, model)
    if lacking:
        with pytest.raises(NativeqError) as err:
            check_importable(model)
        assert all(op in str(err.value) for op in lacking), str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ZOO)
def test_tvm_agrees_with_ort(name):
    build, shape, step, _ = ZOO[name]
    model = build()
    feeds = _x(shape, seed=1 + len(name))
    _compare(name, ort_run(model, feeds)[0], tvm_run(model, feeds)[0], step, model)


def test_qlinear_ops_become_qdq_and_conv_integer_exact_float():
    ops = [n.op_type for n in legalize(zoo.qlinear_conv()).graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv",
                   "QuantizeLinear", "DequantizeLinear"]
    ops = [n.op_type for n in legalize(zoo.qlinear_matmul()).graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "QuantizeLinear", "DequantizeLinear"]
    # The default conv_integer fits one float32-exact Conv; 256 channels x 3x3 of full-range weights need slices.
    assert [n.op_type for n in legalize(zoo.conv_integer()).graph.node].count("Conv") == 1
    assert [n.op_type for n in legalize(zoo.conv_integer(c_in=256, kernel=(3, 3), spatial=(6, 6))).graph.node].count("Conv") > 1


def _adversarial_uint8_input(weights_sign: np.ndarray, shape, scale: float = 0.01) -> np.ndarray:
    """A float input that QuantizeLinear(scale, zp=128) maps to 255 where the weight is positive, 0 where negative."""
    return np.where(weights_sign > 0, 1.27, -1.28).astype(np.float32).reshape(shape) * (scale / 0.01)


def test_integer_ops_exact_beyond_float32_range():
    """Accumulations above 2**24, where float32 would round, stay exact in ORT(legalized) and TVM."""
    model = zoo.conv_integer(c_in=256, kernel=(3, 3), spatial=(3, 3))
    w = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv_wq")).astype(np.int32) - 1
    # Output channel 0 at the centre pixel sees the whole 3x3 input: align it with the weights' signs.
    feeds = {"x": _adversarial_uint8_input(w[0], (1, 256, 3, 3))}
    reference = ort_run(model, feeds)[0]
    assert np.abs(reference).max() > FLOAT32_EXACT_INT
    np.testing.assert_array_equal(ort_run(legalize(model), feeds)[0], reference)
    np.testing.assert_array_equal(tvm_run(model, feeds)[0], reference)

    model = zoo.matmul_integer(k=4096, n=8)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w = inits["fc_wq"].astype(np.int32) - inits["fc_wzp"].astype(np.int32)
    feeds = {"x": np.stack([_adversarial_uint8_input(w[:, j], (4096,)) for j in range(8)])}
    reference = ort_run(model, feeds)[0]
    assert np.abs(reference).max() > FLOAT32_EXACT_INT
    np.testing.assert_array_equal(tvm_run(model, feeds)[0], reference)


def test_int4_widening_keeps_values_and_saturation():
    model = zoo.int4_activation_qdq()
    feeds = {"x": np.linspace(-3, 3, 21 * 32, dtype=np.float32).reshape(1, 21, 32)}
    reference = ort_run(model, feeds)[0]
    assert reference.min() == pytest.approx(-0.8) and reference.max() == pytest.approx(0.7)  # the int4 range
    np.testing.assert_array_equal(ort_run(legalize(model), feeds)[0], reference)
    legal = legalize(model)
    assert not any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in legal.graph.initializer)


@pytest.mark.parametrize("build", [zoo.qlinear_conv, zoo.qlinear_matmul], ids=["qlinear_conv", "qlinear_matmul"])
def test_opset10_model_is_upgraded_for_per_channel_dequantize(build):
    """Opset 10 has no DequantizeLinear axis: a per-channel QLinear op needs the model converted to opset 13."""
    model = build()
    model.opset_import[0].version = 10
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    legal = legalize(model)
    assert [o.version for o in legal.opset_import if o.domain == ""] == [13]
    onnx.checker.check_model(legal, full_check=True)
    shape = [d.dim_value or 30 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = _x(shape)
    np.testing.assert_array_equal(ort_run(legal, feeds)[0], ort_run(model, feeds)[0])


def test_unsupported_op_is_named_with_its_node():
    with pytest.raises(NativeqError) as err:
        check_importable(legalize(zoo.unsupported_op_model()))
    assert str(err.value) == "op 'ReverseSequence' (node 'rev') is not supported by the TVM ONNX importer"


def test_all_unsupported_ops_listed_in_one_line():
    model = zoo.qlinear_conv()
    extra = onnx.helper.make_node("ReverseSequence", ["y", "lens"], ["y2"], name="rev", batch_axis=0, time_axis=1)
    model.graph.node.append(extra)
    with pytest.raises(NativeqError) as err:
        check_importable(model)
    message = str(err.value)
    assert "op 'QLinearConv' (node 'conv_QLinearConv')" in message and "op 'ReverseSequence' (node 'rev')" in message
    assert message.endswith("are not supported by the TVM ONNX importer") and "\n" not in message


def test_static_shape_arithmetic_is_folded_but_weights_are_not():
    """`x.shape[-1] // 3`-style slice bounds become constants; Q/DQ weights stay as they are."""
    def slices_with_computed_bounds(m):
        constant = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
        return [n.name for n in m.graph.node if n.op_type == "Slice" and not set(n.input[1:]) <= constant]

    model = zoo.float_encoder()
    legal = legalize(model)
    assert slices_with_computed_bounds(model)  # torch's chunk() computes the bounds from Shape
    assert slices_with_computed_bounds(legal) == []
    assert "Constant" not in [n.op_type for n in legal.graph.node]
    q = zoo.qdq_matmul()
    assert [n.op_type for n in legalize(q).graph.node] == [n.op_type for n in q.graph.node]


@pytest.fixture(scope="module", params=["uint8", "int8"])
def encoder(request):
    return request.param, zoo.ort_quantized_encoder(request.param)


# ~30-35 s per TVM build of the encoder: slow suite (test_model_zoo compiles both through compile_model).
@pytest.fixture(scope="module", params=[pytest.param("uint8", marks=pytest.mark.slow), pytest.param("int8", marks=pytest.mark.slow)])
def encoder_for_tvm(request):
    return request.param, zoo.ort_quantized_encoder(request.param)


def test_ort_quantized_encoder_legalizes_exactly(encoder):
    act_dtype, model = encoder
    zps = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert {z.dtype for z in zps if z.ndim == 0} >= {np.dtype(act_dtype)}
    legal = legalize(model)
    check_importable(legal)
    assert legalize(legal).SerializeToString() == legal.SerializeToString()  # a fixed point
    for t in (40, 77):
        feeds = {"feats": np.random.default_rng(t).normal(0, 1, (1, t, zoo.ENCODER_FEATS)).astype(np.float32)}
        np.testing.assert_array_equal(ort_run(legal, feeds)[0], ort_run(model, feeds)[0])


def test_ort_quantized_encoder_runs_in_tvm_at_two_lengths(encoder_for_tvm):
    """Dynamic T: compiled once, run at two lengths, within one quantization step of ORT's logits."""
    import tvm
    from tvm import relax

    from nativeq.compile.onnx_import import import_onnx

    _, model = encoder_for_tvm
    vm = relax.VirtualMachine(tvm.compile(import_onnx(model), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    for t in (40, 77):
        feats = np.random.default_rng(t).normal(0, 1, (1, t, zoo.ENCODER_FEATS)).astype(np.float32)
        reference = ort_run(model, {"feats": feats})[0]
        got = vm["main"](tvm.runtime.tensor(feats)).numpy()
        assert got.shape == reference.shape == ((t + 1) // 2, 32)
        step = _output_scale(model)
        steps = np.abs(got.astype(np.float64) - reference) / step
        assert steps.max() <= 1 + 1e-4 and (steps < 1e-4).mean() >= 0.99


def _output_scale(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear producing the (single) graph output."""
    producer = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert producer.op_type == "DequantizeLinear"
    scale = next(i for i in model.graph.initializer if i.name == producer.input[1])
    return float(onnx.numpy_helper.to_array(scale))


@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_ort_qoperator_encoder_legalizes_within_one_step(act_dtype):
    """ORT's QOperator format (QLinearMatMul/QLinearConv + com.microsoft QLinearAdd/Mul/Softmax/Concat, QGemm)."""
    model = zoo.ort_quantized_encoder(act_dtype, quant_format="qoperator")
    ms_ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert ms_ops >= {"QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearConcat", "QGemm"}
    with pytest.raises(NativeqError) as err:
        check_importable(model)
    assert "op 'com.microsoft.QLinearAdd'" in str(err.value) and "op 'QLinearMatMul'" in str(err.value)
    legal = legalize(model)
    check_importable(legal)
    assert not any(n.domain == "com.microsoft" for n in legal.graph.node)
    step = _output_scale(model)
    for t in (40, 77):
        feeds = {"feats": np.random.default_rng(t).normal(0, 1, (1, t, zoo.ENCODER_FEATS)).astype(np.float32)}
        steps = np.abs(ort_run(legal, feeds)[0].astype(np.float64) - ort_run(model, feeds)[0]) / step
        assert steps.max() <= 1 + 1e-4 and (steps < 1e-4).mean() >= 0.99


@pytest.mark.slow
def test_ort_qoperator_encoder_runs_in_tvm():
    import tvm
    from tvm import relax

    from nativeq.compile.onnx_import import import_onnx

    model = zoo.ort_quantized_encoder("uint8", quant_format="qoperator")
    vm = relax.VirtualMachine(tvm.compile(import_onnx(model), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    step = _output_scale(model)
    for t in (40, 77):
        feats = np.random.default_rng(t).normal(0, 1, (1, t, zoo.ENCODER_FEATS)).astype(np.float32)
        steps = np.abs(vm["main"](tvm.runtime.tensor(feats)).numpy().astype(np.float64) - ort_run(model, {"feats": feats})[0])
        assert (steps / step).max() <= 1 + 1e-4


def test_dynamic_shape_idioms_import_with_static_shapes_and_run_at_two_lengths():
    """pos[arange(T)], a time-shift concat added back, and shape-computed chunk bounds: TVM's stock importer
    loses these shapes and cannot build; nativeq's import keeps every tensor's shape known."""
    import tvm
    from tvm import relax

    from nativeq.compile.onnx_import import import_onnx

    model = zoo.dynamic_shape_arithmetic()
    mod = import_onnx(model)
    assert "ndim=" not in mod.script()  # no tensor of unknown shape
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    for t in (5, 33):
        feeds = _x((1, t, 8), seed=t)
        reference = ort_run(model, feeds)[0]
        got = vm["main"](tvm.runtime.tensor(feeds["x"])).numpy()
        assert got.shape == reference.shape == (1, t, 4)
        np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)


def test_rewrites_that_cannot_be_exact_are_refused_with_the_node_named():
    from onnx import TensorProto, helper

    # ConvInteger whose weight is a graph input summing too many products: the float rewrite could round.
    conv = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="conv_dyn", kernel_shape=[3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 300, 10]),
         helper.make_tensor_value_info("w", TensorProto.UINT8, [2, 300, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2, 8])])
    with pytest.raises(NativeqError, match="ConvInteger node 'conv_dyn': the run-time weight 'w' sums 900 products"):
        legalize(helper.make_model(conv, opset_imports=[helper.make_opsetid("", 21)]))
    # Blocked DequantizeLinear of a run-time tensor whose shape is not static.
    blocked = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="dq_blocked", axis=1, block_size=2)], "g",
        [helper.make_tensor_value_info("x", TensorProto.INT8, ["N", 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    with pytest.raises(NativeqError, match=r"DequantizeLinear node 'dq_blocked': blocked \(int8, block_size=2\) needs the static shape"):
        legalize(helper.make_model(blocked, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("weight_dtype", ["int8", pytest.param("uint8", marks=pytest.mark.slow)])
def test_ort_dynamic_quantized_encoder_is_bit_exact_in_tvm(weight_dtype):
    """quantize_dynamic's DynamicQuantizeLinear + MatMulInteger/ConvInteger graph: TVM reproduces ORT bit for bit."""
    import tvm
    from tvm import relax

    from nativeq.compile.onnx_import import import_onnx

    model = zoo.ort_dynamic_quantized_encoder(weight_dtype)
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"} <= ops
    legal = legalize(model)
    vm = relax.VirtualMachine(tvm.compile(import_onnx(model), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    for t in (40, 77):
        feats = np.random.default_rng(t).normal(0, 1, (1, t, zoo.ENCODER_FEATS)).astype(np.float32)
        reference = ort_run(model, {"feats": feats})[0]
        np.testing.assert_array_equal(ort_run(legal, {"feats": feats})[0], reference)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(feats)).numpy(), reference)


def test_unify_operand_shapes_renames_the_smaller_operand():
    """Two spellings of one length: the activation keeps its shape, the broadcast table is reshaped."""
    from nativeq.compile._tvm import relax, tvm
    from nativeq.compile.onnx_import import _unify_operand_shapes

    b, t, length = (tvm.tirx.Var(n, "int64") for n in ("B", "T", "range_len"))
    x = relax.Var("x", relax.TensorType((b, 4, (t - 3) // 4, 36), "float32"))
    table = relax.Var("table", relax.TensorType((1, 1, length, 36), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, table]):
        with bb.dataflow():
            unified = _unify_operand_shapes(bb, [x, table])
            out = bb.emit_output(relax.op.multiply(*unified))
        bb.emit_func_output(out)
    assert unified[0].same_as(x)
    assert str(unified[1].ty.shape.values[2]) == str((t - 3) // 4)


@pytest.mark.parametrize("slope", ["scalar", "channel"])
def test_prelu_becomes_where_and_runs_at_a_symbolic_length(slope, tmp_path):
    """PRelu -> Less, Mul, Where. A one-element slope used to fail to compile on a symbolic last axis (the importer
    made it a per-channel slope there); the legalized model equals the original in ORT, and the compiled one equals
    ORT bit for bit (the same float multiply) at two lengths."""
    from nativeq.compile import CompileConfig, compile_model
    import nativeq

    model = zoo.prelu(slope)
    legal = legalize(model)
    assert "PRelu" not in {n.op_type for n in legal.graph.node}
    for t in (7, 33):
        feeds = _x((1, 16, t), seed=t)
        np.testing.assert_array_equal(ort_run(legal, feeds)[0], ort_run(model, feeds)[0])
    path = tmp_path / "prelu.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    loaded = nativeq.load(tmp_path / "art")
    for t in (7, 33):
        feeds = _x((1, 16, t), seed=t)
        np.testing.assert_array_equal(loaded.run(feeds)["y"], ort_run(model, feeds)[0])


def test_quantized_prelu_between_convs_stays_channels_last(tmp_path):
    """A per-channel PRelu between two QDQ 1x1 convs fuses into the first conv's epilogue: no transpose of the
    activation back to channels first and again (the comparison of the Where form carries the layout), and the
    result equals ONNX Runtime's."""
    from kernel_rules import schedule_rules

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.verify import VerifyConfig, verify_artifact

    model = zoo.prelu("channel", quantized=True)
    rules = schedule_rules(model, tmp_path)
    assert sum("transpose" in name for name in rules) == 2, rules  # the input's and the output's
    path = tmp_path / "prelu_q.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 29}, runs=2))
    assert report.passed and report.outputs[0].max_abs == 0.0, report.table()


def test_a_length_computed_as_a_scalar_and_reshaped_imports(tmp_path):
    """torch's dynamo exporter computes output lengths from Shape as scalars and reshapes them to [1] for Slice:
    TVM's importer refused the Reshape of that scalar (a Whisper-style encoder exported with dynamo=True). It
    compiles now, and slices what ORT slices at odd and even lengths."""
    from nativeq.compile import CompileConfig, compile_model
    import nativeq

    model = zoo.scalar_length_slice()
    path = tmp_path / "half.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    loaded = nativeq.load(tmp_path / "art")
    for t in (7, 20):
        feeds = _x((1, t, 8), seed=t)
        expected = ort_run(model, feeds)[0]
        got = loaded.run(feeds)["y"]
        assert got.shape == expected.shape == (1, (t + 1) // 2, 8)
        np.testing.assert_array_equal(got, expected)


def _stft_model(rank: int, onesided: int, window: bool) -> onnx.ModelProto:
    """STFT of a waveform [1, S] (as torch.stft exports it) or [1, S, 1], frame step 160, frame length 400."""
    from onnx import TensorProto, helper, numpy_helper

    length = 400
    signal_shape = [1, "S"] if rank == 2 else [1, "S", 1]
    inputs = ["wav", "step", "window" if window else "", "length"]
    initializers = [numpy_helper.from_array(np.array(160, np.int64), "step"),
                    numpy_helper.from_array(np.array(length, np.int64), "length")]
    if window:
        initializers.append(numpy_helper.from_array(np.hanning(length + 1)[:-1].astype(np.float32), "window"))
    bins = length // 2 + 1 if onesided else length
    graph = helper.make_graph(
        [helper.make_node("STFT", inputs, ["spec"], onesided=onesided)], "stft",
        [helper.make_tensor_value_info("wav", TensorProto.FLOAT, signal_shape)],
        [helper.make_tensor_value_info("spec", TensorProto.FLOAT, [1, "F", bins, 2])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("rank, onesided, window", [(2, 1, True), (3, 1, True), (2, 0, True), (2, 1, False)])
def test_stft_becomes_a_dft_conv_and_matches_onnxruntime(rank, onesided, window, tmp_path):
    import onnxruntime as ort

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.runtime import load

    model = _stft_model(rank, onesided, window)
    assert [n.op_type for n in legalize(model).graph.node][1:3] == ["Conv", "Reshape"]
    onnx.save(model, tmp_path / "stft.onnx")
    compile_model(tmp_path / "stft.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    compiled = load(tmp_path / "art")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(rank + 2 * onesided)
    for samples in (400, 1234, 16000):
        wav = (0.1 * rng.standard_normal((1, samples) if rank == 2 else (1, samples, 1))).astype(np.float32)
        got, want = compiled.run({"wav": wav})["spec"], session.run(None, {"wav": wav})[0]
        assert got.shape == want.shape == (1, (samples - 400) // 160 + 1, 201 if onesided else 400, 2)
        # the exact DFT in float64 to float32 rounding of 400-term sums; ORT's float32 FFT of a 400-point (not a
        # power of two) frame is itself off by up to ~1e-4 of the largest magnitude
        frames = np.lib.stride_tricks.sliding_window_view(wav.reshape(-1).astype(np.float64), 400)[::160]
        taper = np.hanning(401)[:-1] if window else np.ones(400)
        exact = np.fft.fft(frames * taper, axis=-1)[:, : got.shape[2]]
        exact = np.stack([exact.real, exact.imag], axis=-1)[None]
        scale = float(np.abs(exact).max())
        np.testing.assert_allclose(got, exact, rtol=0, atol=4e-6 * scale)
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-4 * scale)
