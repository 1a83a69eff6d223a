"""The int8 rewrite against ONNX Runtime: real QDQ models, TVM's default build, ORT with optimizations off.

Every model goes ONNX -> (onnx_legalize) -> from_onnx -> the int8 passes -> tvm.compile, in both
kernel activation forms (uint8 as on x86, int8 as on ARM), and must agree with ORT within one
quantization step, with nearly all outputs exact. Also: no matmul/conv fed by a dequantize is left,
the legalized kernels accumulate in int32, and TVM's quantize rounds half to even like ORT.
"""

import re

import numpy as np
import onnxruntime as ort
import pytest
import qdq_models as qm
import tvm
from tvm import relax

from nativeq.compile._tvm import from_onnx
from nativeq.compile.onnx_legalize import legalize
from nativeq.compile.passes.int8 import explain_sites, lowering_passes
from nativeq.compile.passes.lower_qdq_to_integer import LowerQDQToInteger
from nativeq.compile.passes.qdq_sites import CONTRACTION_OPS, op_name
from nativeq.targets.registry import get_target

HOST = tvm.target.Target({"kind": "llvm"})

# (id, model builder, input shape, output quantization step)
MODELS = [
    ("matmul-s8-channel", lambda: qm.qdq_matmul(t=16, act_dtype="int8"), (1, 16, 64), 0.1),
    ("matmul-u8-channel", lambda: qm.qdq_matmul(t=16, act_dtype="uint8"), (1, 16, 64), 0.1),
    ("matmul-s8-tensor", lambda: qm.qdq_matmul(t=16, act_dtype="int8", per_channel=False), (1, 16, 64), 0.1),
    ("matmul-u8-tensor-nobias", lambda: qm.qdq_matmul(t=16, act_dtype="uint8", per_channel=False, bias=False),
     (1, 16, 64), 0.1),
    ("gemm-u8-transB", lambda: qm.qdq_gemm(act_dtype="uint8"), (8, 64), 0.1),
    ("gemm-s8-transB-tensor", lambda: qm.qdq_gemm(act_dtype="int8", per_channel=False), (8, 64), 0.1),
    ("conv1d-s8", lambda: qm.qdq_conv1d(t=40, act_dtype="int8"), (1, 32, 40), 0.1),
    ("conv1d-u8-stride2", lambda: qm.qdq_conv1d(t=40, act_dtype="uint8", stride=2), (1, 32, 40), 0.1),
    ("conv1d-s8-depthwise", lambda: qm.qdq_conv1d(t=40, c_out=32, groups=32, kernel=7, act_dtype="int8"),
     (1, 32, 40), 0.1),
    ("conv1d-u8-grouped", lambda: qm.qdq_conv1d(t=40, c_out=48, groups=4, act_dtype="uint8"), (1, 32, 40), 0.1),
    ("conv2d-s8-relu", lambda: qm.qdq_conv2d(act_dtype="int8"), (1, 8, 20, 20), 0.1),
    ("conv2d-u8-relu", lambda: qm.qdq_conv2d(act_dtype="uint8"), (1, 8, 20, 20), 0.1),
    ("qlinearmatmul-u8", lambda: qm.qlinear_matmul(t=16), (16, 64), 0.25),
    ("qlinearconv1d-u8", lambda: qm.qlinear_conv(spatial=(40,)), (1, 16, 40), 0.1),
    ("qlinearconv2d-s8-depthwise", lambda: qm.qlinear_conv(c_in=16, c_out=16, groups=16, kernel=(3, 3),
                                                          spatial=(12, 12), act_dtype="int8"), (1, 16, 12, 12), 0.1),
    ("int4-matmul-s4-channel", lambda: qm.int4_matmul(t=16), (1, 16, 64), 0.1),
    ("int4-matmul-u4-zero-points", lambda: qm.int4_matmul(t=16, signed=False), (1, 16, 64), 0.1),
    ("attention-s8", lambda: qdq_attention(act_dtype="int8"), (1, 24, 32), 0.05),
    ("attention-u8", lambda: qdq_attention(act_dtype="uint8"), (1, 24, 32), 0.05),
]


def ort_reference(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def contractions_fed_by_dequantize(mod) -> list[str]:
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            var2val = relax.analysis.get_var2val(func)
            for var, value in var2val.items():
                if op_name(value) in CONTRACTION_OPS:
                    inputs = [var2val.get(a) for a in value.args[:2]]
                    if any(op_name(i) == "relax.dequantize" for i in inputs):
                        found.append(str(var))
    return found


@pytest.mark.parametrize("activation_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("name, build, shape, step", MODELS, ids=[m[0] for m in MODELS])
def test_integer_rewrite_matches_onnxruntime(name, build, shape, step, activation_dtype):
    original = build()
    mod = from_onnx(legalize(original), keep_params_in_input=False)
    lowered = tvm.transform.Sequential(lowering_passes(activation_dtype))(mod)

    assert contractions_fed_by_dequantize(lowered) == []
    sites = explain_sites(lowered, get_target("x86-avx512-vnni" if activation_dtype == "uint8" else "rpi5"))
    assert sites and all(s["status"] == "int8" and f"{activation_dtype} x int8" in s["reason"] for s in sites)

    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    x = np.random.default_rng(3).normal(0, 2.0, shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = ort_reference(original, x)  # QLinear* models: ORT's own integer kernels
    steps = np.abs(got.astype(np.float64) - want) / step
    exact = float(np.mean(steps < 1e-3))
    assert steps.max() <= 1.0 + 1e-3, f"{name}: {steps.max():.2f} steps off"
    assert exact >= 0.995, f"{name}: only {100 * exact:.2f}% exact"


def qdq_attention(d: int = 32, t: int = 24, act_dtype: str = "int8", seed: int = 0):
    """One attention head as quantize_static leaves it: QDQ projections, then Q·Kᵀ and softmax(·)·V with
    both operands dequantized activations (softmax output quantized to [0, 1])."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = qm._q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    heads = {}
    for name in ("q", "k", "v"):
        w = qm._weight_dq(nodes, inits, name, rng.normal(0, 0.2, (d, d)).astype(np.float32), axis=1)
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}_mm"], name=f"{name}_MatMul"))
        heads[name] = qm._q_dq(nodes, inits, f"{name}_out", f"{name}_mm", 0.08, act_dtype)
    nodes.append(helper.make_node("Transpose", [heads["k"]], ["kt"], perm=[0, 2, 1], name="k_T"))
    nodes.append(helper.make_node("MatMul", [heads["q"], "kt"], ["scores"], name="qk_MatMul"))
    inits.append(numpy_helper.from_array(np.array(d ** -0.5, np.float32), "inv_sqrt_d"))
    nodes.append(helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale_Mul"))
    nodes.append(helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="softmax"))
    probs_zp = (np.uint8(0) if act_dtype == "uint8" else np.int8(-128))
    inits += [numpy_helper.from_array(np.array(1 / 255, np.float32), "p_scale"),
              numpy_helper.from_array(np.array(probs_zp), "p_zp")]
    nodes.append(helper.make_node("QuantizeLinear", ["probs", "p_scale", "p_zp"], ["p_q"], name="p_Q"))
    nodes.append(helper.make_node("DequantizeLinear", ["p_q", "p_scale", "p_zp"], ["p_dq"], name="p_DQ"))
    nodes.append(helper.make_node("MatMul", ["p_dq", heads["v"]], ["ctx"], name="pv_MatMul"))
    y = qm._q_dq(nodes, inits, "y", "ctx", 0.05, act_dtype)
    nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    return qm._model(nodes, inits, [1, t, d], [1, t, d], "qdq_attention")


INTEGER_MODELS = [
    ("matmulinteger-u8-k4096-channel-zp", lambda: qm.matmul_integer(t=8), (8, 4096)),
    ("matmulinteger-s8-tensor-zp", lambda: qm.matmul_integer(k=512, t=8, act_dtype="int8", per_channel_zp=False),
     (8, 512)),
    ("dynamicquantize-matmulinteger", lambda: qm.dynamic_quantize_matmul(t=8), (8, 256)),
    ("convinteger-u8", lambda: qm.conv_integer(spatial=(30,)), (1, 64, 30)),
]


@pytest.mark.parametrize("activation_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("name, build, shape", INTEGER_MODELS, ids=[m[0] for m in INTEGER_MODELS])
def test_integer_onnx_ops_lower_bit_exact(name, build, shape, activation_dtype):
    """MatMulInteger (incl. runtime zero points from DynamicQuantizeLinear, weight zero points that do not
    fit int8) and ConvInteger: the integer kernels reproduce ORT exactly."""
    original = build()
    mod = from_onnx(legalize(original), keep_params_in_input=False)
    lowered = tvm.transform.Sequential(lowering_passes(activation_dtype))(mod)
    sites = explain_sites(lowered, get_target("x86-avx2" if activation_dtype == "uint8" else "rpi4"))
    assert [s["status"] for s in sites] == ["int8"] and f"{activation_dtype} x int8" in sites[0]["reason"]
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    x = np.random.default_rng(5).normal(0, 2.0, shape).astype(np.float32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ort_reference(original, x))


def test_quantize_rounds_half_to_even_and_saturates_like_onnxruntime():
    """The requantize is TVM's legalized R.quantize: ties must go to even, out-of-range values saturate."""
    from onnx import TensorProto, helper, numpy_helper

    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 126.5, 127.5, 300.0, -128.5, -300.0], np.float32)
    for dtype, onnx_type, zp in (("int8", TensorProto.INT8, 0), ("uint8", TensorProto.UINT8, 128)):
        graph = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values.size])],
            [helper.make_tensor_value_info("y", onnx_type, [values.size])],
            [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(zp, dtype), "z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        vm = relax.VirtualMachine(tvm.compile(from_onnx(model), target=HOST), tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(values)).numpy()
        want = ort_reference(model, values)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[:6].astype(int) - zp, [0, 2, 2, 0, -2, -2])


def test_legalized_kernel_accumulates_in_int32():
    mod = from_onnx(qm.qdq_conv1d(t=40, act_dtype="int8"), keep_params_in_input=False)
    legalized = relax.transform.LegalizeOps()(LowerQDQToInteger("uint8")(mod))
    convs = [f for gv, f in legalized.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv1d" in str(gv)]
    assert len(convs) == 1
    script = convs[0].script()
    signature = script[script.index("def main"):script.index("):\n")]
    assert re.findall(r'T\.Buffer\(\(.*?\), "(\w+)"\)', signature) == ["uint8", "int8", "int32"]
    # The reduction update: int32 accumulator += widened u8 activation * widened s8 weight.
    update = re.search(r"(\w+)\[[^\]]*\] = \1\[[^\]]*\] \+ (.*)", script)
    assert update is not None and update.group(2).count('T.Cast("int32"') == 2
    assert "float" not in script


def test_requantize_epilogue_fuses_into_the_integer_kernel():
    """TVM's FuseOps puts correction, rescale, bias, relu and the next quantize in the conv's kernel:
    no int32 intermediate is written to memory."""
    mod = from_onnx(qm.qdq_conv2d(act_dtype="int8"), keep_params_in_input=False)
    mod = tvm.transform.Sequential(lowering_passes("uint8"))(mod)
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                      relax.transform.FuseTIR()])(mod)
    kernels = [str(gv) for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    (conv,) = [k for k in kernels if "conv2d" in k]
    for op in ("subtract", "cast", "multiply", "add", "relu", "quantize"):
        assert op in conv, (op, kernels)


@pytest.mark.parametrize("name, build, shapes, step", [
    ("matmul", lambda: qm.qdq_matmul(), [(1, 7, 64), (1, 33, 64)], 0.1),
    ("conv1d-stride2", lambda: qm.qdq_conv1d(stride=2), [(1, 32, 9), (1, 32, 40)], 0.1),
    ("attention", lambda: qdq_attention(t="T"), [(1, 5, 32), (1, 29, 32)], 0.05),  # P·V reduces over T
], ids=["matmul", "conv1d-stride2", "attention"])
def test_symbolic_time_axis(name, build, shapes, step):
    model = build()
    mod = from_onnx(legalize(model), keep_params_in_input=False)
    lowered = tvm.transform.Sequential(lowering_passes("uint8"))(mod)
    assert contractions_fed_by_dequantize(lowered) == []
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    for shape in shapes:
        x = np.random.default_rng(4).normal(0, 2.0, shape).astype(np.float32)
        steps = np.abs(vm["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64) - ort_reference(model, x)) / step
        assert steps.max() <= 1.0 + 1e-3 and np.mean(steps < 1e-3) >= 0.995, f"{name} at {shape}"
