"""Builders of small QDQ ONNX models for tests. Each returns an `onnx.ModelProto` that passes
`onnx.checker.check_model(full_check=True)`.

Convention: float input `x`, float output `y`. Activations are quantized with
QuantizeLinear -> DequantizeLinear (int8 or uint8), weights are stored as int8
initializers (per-channel scales along the output channel) behind DequantizeLinear, and
the output goes through a final QuantizeLinear -> DequantizeLinear so verify counts steps.
Shapes may carry a symbolic time axis named "T".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def _act_qtype(act_dtype: str):
    return (TensorProto.UINT8, np.uint8, 128) if act_dtype == "uint8" else (TensorProto.INT8, np.int8, 0)


def _q_dq(nodes, inits, name: str, src: str, scale: float, act_dtype: str) -> str:
    """Append QuantizeLinear->DequantizeLinear on tensor `src`; return the dequantized name."""
    qtype, npdt, zp = _act_qtype(act_dtype)
    inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"))
    inits.append(numpy_helper.from_array(np.array(zp, npdt), f"{name}_zp"))
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_scale", f"{name}_zp"], [f"{name}_q"], name=f"{name}_Q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"], name=f"{name}_DQ"))
    return f"{name}_dq"


def _weight_dq(nodes, inits, name: str, w: np.ndarray, axis: int, per_channel: bool = True) -> str:
    """Quantize float weight `w` symmetrically to int8 (per-channel along `axis`) behind a DequantizeLinear."""
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.abs(w).max(axis=red)
        scale = np.maximum(absmax, 1e-8) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        wq = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        zp = np.zeros_like(scale, dtype=np.int8)
    else:
        scale = np.array(max(float(np.abs(w).max()), 1e-8) / 127.0, np.float32)
        wq = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        zp = np.array(0, np.int8)
    inits.append(numpy_helper.from_array(wq, f"{name}_wq"))
    inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_wscale"))
    inits.append(numpy_helper.from_array(zp, f"{name}_wzp"))
    attrs = {"axis": axis} if per_channel else {}
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_wscale", f"{name}_wzp"], [f"{name}_w"], name=f"{name}_wDQ", **attrs)
    )
    return f"{name}_w"


def _model(nodes, inits, in_shape, out_shape, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nativeq-tests")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_matmul(k: int = 64, n: int = 48, t="T", act_dtype: str = "int8", per_channel: bool = True, bias: bool = True,
               seed: int = 0) -> onnx.ModelProto:
    """x[1, t, k] -> Q/DQ -> MatMul(DQ(W[k, n])) (+ bias) -> Q/DQ -> y[1, t, n]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    w = _weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (k, n)).astype(np.float32), axis=1, per_channel=per_channel)
    nodes.append(helper.make_node("MatMul", [xa, w], ["mm"], name="fc_MatMul"))
    out = "mm"
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, n).astype(np.float32), "fc_b"))
        nodes.append(helper.make_node("Add", ["mm", "fc_b"], ["mm_b"], name="fc_Add"))
        out = "mm_b"
    yq = _q_dq(nodes, inits, "y", out, 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    return _model(nodes, inits, [1, t, k], [1, t, n], "qdq_matmul")


def qdq_conv1d(c_in: int = 32, c_out: int = 48, kernel: int = 3, t="T", act_dtype: str = "int8", groups: int = 1,
               stride: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, t] -> Q/DQ -> Conv1d(DQ(W)) + bias -> Q/DQ -> y (groups=c_in gives a depthwise conv)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    w = _weight_dq(nodes, inits, "conv", rng.normal(0, 0.2, (c_out, c_in // groups, kernel)).astype(np.float32), axis=0)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "conv_b"))
    pad = kernel // 2
    nodes.append(
        helper.make_node("Conv", [xa, w, "conv_b"], ["conv"], name="conv_Conv", kernel_shape=[kernel], pads=[pad, pad],
                         strides=[stride], group=groups)
    )
    yq = _q_dq(nodes, inits, "y", "conv", 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    t_out = t if (isinstance(t, str) or stride == 1) else (t + 2 * pad - kernel) // stride + 1
    if isinstance(t, str) and stride != 1:
        t_out = "T_out"
    return _model(nodes, inits, [1, c_in, t], [1, c_out, t_out], "qdq_conv1d")


def qdq_conv2d(c_in: int = 8, c_out: int = 16, kernel: int = 3, h=20, w: int = 20, act_dtype: str = "int8",
               stride: int = 2, relu: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, h, w] -> Q/DQ -> Conv2d(DQ(W)) + bias (-> Relu) -> Q/DQ -> y (h may be symbolic, e.g. "T")."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    wt = _weight_dq(nodes, inits, "conv", rng.normal(0, 0.2, (c_out, c_in, kernel, kernel)).astype(np.float32), axis=0)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "conv_b"))
    nodes.append(
        helper.make_node("Conv", [xa, wt, "conv_b"], ["conv"], name="conv_Conv", kernel_shape=[kernel, kernel],
                         pads=[1, 1, 1, 1], strides=[stride, stride])
    )
    out = "conv"
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["relu"], name="conv_Relu"))
        out = "relu"
    yq = _q_dq(nodes, inits, "y", out, 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    ho = f"{h}_out" if isinstance(h, str) else (h + 2 - kernel) // stride + 1
    wo = (w + 2 - kernel) // stride + 1
    return _model(nodes, inits, [1, c_in, h, w], [1, c_out, ho, wo], "qdq_conv2d")


def qdq_separable_block(ndim: int = 1, channels: int = 32, kernel: int = 5, stride: int = 1, dilation: int = 1,
                        spatial=("T",), act_dtype: str = "uint8", residual: bool = True, same: bool = True,
                        pooled: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A depthwise-separable block (MobileNet / QuartzNet / DS-CNN), channels first:
    x[1, C, *S] -> Q/DQ -> depthwise Conv (k, stride, dilation, 'same' padding) + bias -> Relu -> Q/DQ
    -> pointwise 1x1 Conv + bias -> Q/DQ (-> + x -> Q/DQ when residual and stride 1) -> y.
    same=False: no padding ('valid'), so the output is shorter and there is no residual.
    pooled: a keyword-spotting head after it, GlobalAveragePool -> Q/DQ -> Flatten: y[1, C]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    taps = [kernel] * ndim
    wd = _weight_dq(nodes, inits, "dw", rng.normal(0, 0.3, (channels, 1, *taps)).astype(np.float32), axis=0)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "dw_b"))
    pad = dilation * (kernel - 1) // 2 if same else 0
    nodes.append(helper.make_node("Conv", [xa, wd, "dw_b"], ["dw"], name="dw_Conv", kernel_shape=taps, pads=[pad] * 2 * ndim,
                                  strides=[stride] * ndim, dilations=[dilation] * ndim, group=channels))
    nodes.append(helper.make_node("Relu", ["dw"], ["dw_relu"], name="dw_Relu"))
    da = _q_dq(nodes, inits, "dwq", "dw_relu", 0.08, act_dtype)
    wp = _weight_dq(nodes, inits, "pw", rng.normal(0, 0.2, (channels, channels, *([1] * ndim))).astype(np.float32), axis=0)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "pw_b"))
    nodes.append(helper.make_node("Conv", [da, wp, "pw_b"], ["pw"], name="pw_Conv", kernel_shape=[1] * ndim))
    out = _q_dq(nodes, inits, "pwq", "pw", 0.1, act_dtype)
    if residual and stride == 1 and same:
        nodes.append(helper.make_node("Add", [out, xa], ["res"], name="res_Add"))
        out = _q_dq(nodes, inits, "resq", "res", 0.12, act_dtype)
    if pooled:
        nodes.append(helper.make_node("GlobalAveragePool", [out], ["pool"], name="pool"))
        pool = _q_dq(nodes, inits, "poolq", "pool", 0.02, act_dtype)
        nodes.append(helper.make_node("Flatten", [pool], ["y"], name="flatten"))
        return _model(nodes, inits, [1, channels, *spatial], [1, channels], "qdq_separable_block")
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    shrinks = stride != 1 or not same
    out_spatial = [d if (isinstance(d, str) or not shrinks) else (d + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
                   for d in spatial]
    out_spatial = [f"{d}_out" if isinstance(d, str) and shrinks else d for d in out_spatial]
    return _model(nodes, inits, [1, channels, *spatial], [1, channels, *out_spatial], "qdq_separable_block")


# ---------------------------------------------------------------------------------------------
# The model zoo: standard ONNX integer ops, 4-bit and blocked weights, Gemm, and an ORT-quantized
# transformer encoder. Builders below take quantized tensors from a QuantizeLinear of the float
# input `x` and end in a DequantizeLinear (float `y`), unless the op's output is int32 (`y` int32).


def _finish(nodes, inits, inputs, outputs, name: str, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="nativeq-tests")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def two_io(k: int = 64, n: int = 48) -> onnx.ModelProto:
    """Two inputs, two outputs: x[1, T, k], z[1, T, n] -> y = QDQ(MatMul(QDQ(x), DQ(W)) + QDQ(z))[1, T, n] and
    r = QDQ(Relu(QDQ(x)))[1, T, k]."""
    rng = np.random.default_rng(7)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, "int8")
    w = _weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (k, n)).astype(np.float32), axis=1)
    nodes.append(helper.make_node("MatMul", [xa, w], ["mm"], name="mm"))
    za = _q_dq(nodes, inits, "z", "z", 0.1, "int8")
    nodes.append(helper.make_node("Add", ["mm", za], ["sum"], name="add"))
    ya = _q_dq(nodes, inits, "y", "sum", 0.1, "int8")
    nodes.append(helper.make_node("Identity", [ya], ["y"], name="y_out"))
    nodes.append(helper.make_node("Relu", [xa], ["relu"], name="relu"))
    ra = _q_dq(nodes, inits, "r", "relu", 0.05, "int8")
    nodes.append(helper.make_node("Identity", [ra], ["r"], name="r_out"))

    def value(name: str, size: int):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "T", size])

    return _finish(nodes, inits, [value("x", k), value("z", n)], [value("y", n), value("r", k)], "two_io")


def _quantize_input(nodes, inits, scale: float, act_dtype: str) -> tuple[str, str, str]:
    """x -> QuantizeLinear; returns (quantized name, scale name, zero-point name)."""
    _, npdt, zp = _act_qtype(act_dtype)
    inits.append(numpy_helper.from_array(np.array(scale, np.float32), "x_scale"))
    inits.append(numpy_helper.from_array(np.array(zp, npdt), "x_zp"))
    nodes.append(helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"))
    return "x_q", "x_scale", "x_zp"


def _int8_weight(rng, shape, axis: int, per_channel: bool, inits, name: str, zero_point: bool = False):
    """Random int8 weight with per-channel (along `axis`) or per-tensor scale; adds initializers, returns names."""
    wq = rng.integers(-127, 128, shape).astype(np.int8)
    n = shape[axis]
    scale = rng.uniform(0.002, 0.02, n).astype(np.float32) if per_channel else np.array(0.01, np.float32)
    zp = (rng.integers(-3, 4, n) if per_channel else np.array(rng.integers(-3, 4))).astype(np.int8) if zero_point else \
        np.zeros(scale.shape, np.int8)
    inits += [numpy_helper.from_array(wq, f"{name}_wq"), numpy_helper.from_array(scale, f"{name}_wscale"),
              numpy_helper.from_array(zp, f"{name}_wzp")]
    return f"{name}_wq", f"{name}_wscale", f"{name}_wzp"


def qlinear_matmul(k: int = 64, n: int = 48, t="T", act_dtype: str = "uint8", per_channel: bool = True,
                   seed: int = 0) -> onnx.ModelProto:
    """x[t, k] -> QuantizeLinear -> QLinearMatMul(W[k, n] int8) -> DequantizeLinear -> y[t, n]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xq, xs, xzp = _quantize_input(nodes, inits, 0.05, act_dtype)
    wq, ws, wzp = _int8_weight(rng, (k, n), 1, per_channel, inits, "fc")
    _, npdt, zp = _act_qtype(act_dtype)
    inits += [numpy_helper.from_array(np.array(0.25, np.float32), "y_scale"), numpy_helper.from_array(np.array(zp, npdt), "y_zp")]
    nodes.append(helper.make_node("QLinearMatMul", [xq, xs, xzp, wq, ws, wzp, "y_scale", "y_zp"], ["y_q"], name="fc_QLinearMatMul"))
    nodes.append(helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_DQ"))
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, n])], "qlinear_matmul")


def qlinear_conv(c_in: int = 16, c_out: int = 24, kernel=(3,), spatial=("T",), act_dtype: str = "uint8", groups: int = 1,
                 stride: int = 1, bias: bool = True, per_channel: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, *spatial] -> QuantizeLinear -> QLinearConv(int8 W, int32 bias) -> DequantizeLinear -> y.

    One kernel entry gives a 1-D conv, two a 2-D conv; groups=c_in=c_out gives a depthwise conv.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xq, xs, xzp = _quantize_input(nodes, inits, 0.05, act_dtype)
    wq, ws, wzp = _int8_weight(rng, (c_out, c_in // groups, *kernel), 0, per_channel, inits, "conv")
    _, npdt, zp = _act_qtype(act_dtype)
    inits += [numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"), numpy_helper.from_array(np.array(zp, npdt), "y_zp")]
    inputs = [xq, xs, xzp, wq, ws, wzp, "y_scale", "y_zp"]
    if bias:
        inits.append(numpy_helper.from_array(rng.integers(-2000, 2000, c_out).astype(np.int32), "conv_bias"))
        inputs.append("conv_bias")
    pads = [k // 2 for k in kernel] * 2
    nodes.append(helper.make_node("QLinearConv", inputs, ["y_q"], name="conv_QLinearConv", kernel_shape=list(kernel),
                                  pads=pads, strides=[stride] * len(kernel), group=groups))
    nodes.append(helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_DQ"))
    out_spatial = [s if (isinstance(s, str) and stride == 1) else (f"{s}_out" if isinstance(s, str) else
                   (s + 2 * (k // 2) - k) // stride + 1) for s, k in zip(spatial, kernel)]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, *spatial])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, *out_spatial])], "qlinear_conv")


def matmul_integer(k: int = 4096, n: int = 32, t="T", act_dtype: str = "uint8", per_channel_zp: bool = True,
                   seed: int = 0) -> onnx.ModelProto:
    """x[t, k] -> QuantizeLinear -> MatMulInteger(W[k, n] int8, zero points) -> y[t, n] int32.

    The default K=4096 makes |sum| reach ~1e8 > 2**24, so float32 accumulation would not be exact.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xq, _, xzp = _quantize_input(nodes, inits, 0.01, act_dtype)
    wq, _, wzp = _int8_weight(rng, (k, n), 1, per_channel_zp, inits, "fc", zero_point=True)
    nodes.append(helper.make_node("MatMulInteger", [xq, wq, xzp, wzp], ["y"], name="fc_MatMulInteger"))
    inits[:] = [i for i in inits if i.name != "fc_wscale"]  # integer op: no weight scale
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, k])],
                   [helper.make_tensor_value_info("y", TensorProto.INT32, [t, n])], "matmul_integer")


def conv_integer(c_in: int = 64, c_out: int = 32, kernel=(3,), spatial=("T",), act_dtype: str = "uint8",
                 groups: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, *spatial] -> QuantizeLinear -> ConvInteger(int8 W, zero points) -> y int32.

    Full-range weights: C_in * prod(kernel) * 255 * 127 exceeds 2**24 for the defaults, so an exact
    rewrite has to split the accumulation.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xq, _, xzp = _quantize_input(nodes, inits, 0.01, act_dtype)
    wq = rng.choice(np.array([-127, 127], np.int8), (c_out, c_in // groups, *kernel))
    inits += [numpy_helper.from_array(wq, "conv_wq"), numpy_helper.from_array(np.array(1, np.int8), "conv_wzp")]
    pads = [k // 2 for k in kernel] * 2
    nodes.append(helper.make_node("ConvInteger", [xq, "conv_wq", xzp, "conv_wzp"], ["y"], name="conv_ConvInteger",
                                  kernel_shape=list(kernel), pads=pads, group=groups))
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, *spatial])],
                   [helper.make_tensor_value_info("y", TensorProto.INT32, [1, c_out, *spatial])], "conv_integer")


def dynamic_quantize_matmul(k: int = 256, n: int = 64, t="T", seed: int = 0) -> onnx.ModelProto:
    """The ORT dynamic-quantization pattern: DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(scales) -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    wq, ws, _ = _int8_weight(rng, (k, n), 1, True, inits, "fc")
    inits[:] = [i for i in inits if i.name != "fc_wzp"]
    nodes += [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zp"], name="x_DynamicQuantizeLinear"),
        helper.make_node("MatMulInteger", ["x_q", wq, "x_zp"], ["acc"], name="fc_MatMulInteger"),
        helper.make_node("Cast", ["acc"], ["acc_f"], name="fc_Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_scale", ws], ["out_scale"], name="fc_scale_Mul"),
        helper.make_node("Mul", ["acc_f", "out_scale"], ["y"], name="fc_Mul"),
    ]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, n])], "dynamic_quantize_matmul")


def int4_matmul(k: int = 64, n: int = 48, t="T", act_dtype: str = "int8", per_channel: bool = True, signed: bool = True,
                block_size: int = 0, seed: int = 0) -> onnx.ModelProto:
    """QDQ MatMul whose weight is an INT4 (or UINT4) initializer behind DequantizeLinear (opset 21).

    per_channel: scales along N; block_size > 0: blocked quantization along K (axis 0) instead.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    lo, hi, dtype = (-8, 7, TensorProto.INT4) if signed else (0, 15, TensorProto.UINT4)
    wq = rng.integers(lo, hi + 1, (k, n))
    if block_size:
        scale = rng.uniform(0.01, 0.05, (-(-k // block_size), n)).astype(np.float32)
        zp = rng.integers(lo, hi + 1, scale.shape) if not signed else np.zeros(scale.shape, np.int64)
        attrs = {"axis": 0, "block_size": block_size}
    elif per_channel:
        scale = rng.uniform(0.01, 0.05, n).astype(np.float32)
        zp = rng.integers(lo, hi + 1, n) if not signed else np.zeros(n, np.int64)
        attrs = {"axis": 1}
    else:
        scale = np.array(0.03, np.float32)
        zp = np.array(8 if not signed else 0)
        attrs = {}
    inits.append(helper.make_tensor("fc_wq", dtype, list(wq.shape), wq.flatten().tolist()))
    inits.append(numpy_helper.from_array(scale, "fc_wscale"))
    inits.append(helper.make_tensor("fc_wzp", dtype, list(zp.shape), np.asarray(zp).flatten().tolist()))
    nodes.append(helper.make_node("DequantizeLinear", ["fc_wq", "fc_wscale", "fc_wzp"], ["fc_w"], name="fc_wDQ", **attrs))
    nodes.append(helper.make_node("MatMul", [xa, "fc_w"], ["mm"], name="fc_MatMul"))
    yq = _q_dq(nodes, inits, "y", "mm", 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, n])], "int4_matmul")


def qdq_gemm(k: int = 64, n: int = 48, m: int = 8, act_dtype: str = "uint8", per_channel: bool = True,
             seed: int = 0) -> onnx.ModelProto:
    """x[m, k] -> Q/DQ -> Gemm(DQ(W[n, k]), bias, transB=1) -> Q/DQ -> y[m, n] (the torch Linear export form)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    w = _weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (n, k)).astype(np.float32), axis=0, per_channel=per_channel)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, n).astype(np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", [xa, w, "fc_b"], ["mm"], name="fc_Gemm", transB=1))
    yq = _q_dq(nodes, inits, "y", "mm", 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [yq], ["y"], name="out"))
    return _model(nodes, inits, [m, k], [m, n], "qdq_gemm")


def unsupported_op_model() -> onnx.ModelProto:
    """A valid model with an op TVM's ONNX importer has no converter for (ReverseSequence)."""
    nodes = [helper.make_node("ReverseSequence", ["x", "lens"], ["y"], name="rev", batch_axis=1, time_axis=0)]
    inits = [numpy_helper.from_array(np.array([4, 3], np.int64), "lens")]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 8])], "unsupported")


# ---------------------------------------------------------------------------------------------
# An ORT-quantized transformer encoder, as a user would bring it: PyTorch float model ->
# torch.onnx.export (TorchScript exporter, opset 17, dynamic T) -> onnxruntime quantize_static.

ENCODER_FEATS = 80
ENCODER_DIM = 64


def _encoder_module(seed: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            att = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
            x = x + self.proj((att @ split(v)).transpose(1, 2).reshape(b, t, d))
            h = self.ff_in(self.norm2(x))
            gated = nn.functional.gelu(h[..., : 2 * d]) * torch.relu(h[..., 2 * d:])  # Slice, Erf-GELU, Relu, Mul
            return x + self.ff_out(gated)

    class Encoder(nn.Module):
        def __init__(self, feats: int, d: int, blocks: int = 2, heads: int = 4, vocab: int = 32):
            super().__init__()
            self.subsample = nn.Conv1d(feats, d, kernel_size=3, stride=2, padding=1)
            self.pos = nn.Embedding(512, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
            self.head = nn.Linear(d, vocab)

        def forward(self, feats):  # [1, T, feats]
            x = torch.relu(self.subsample(feats.transpose(1, 2))).transpose(1, 2)  # [1, T', d]
            x = x + self.pos(torch.arange(x.shape[1]))  # Gather
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1) * 0.5 + x * 0.5  # time shift: Slice, Concat
            for block in self.blocks:
                x = block(x)
            return self.head(x[0])  # 2-D Linear: Gemm; quantized logits [T', vocab]

    torch.manual_seed(seed)
    return Encoder(ENCODER_FEATS, ENCODER_DIM).eval()


def float_encoder(seed: int = 0) -> onnx.ModelProto:
    """The float transformer encoder exported to ONNX: feats[1, T, 80] -> logits[T_out, 32]."""
    import io
    import warnings

    import torch

    module = _encoder_module(seed)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is what works offline
        torch.onnx.export(module, (torch.randn(1, 40, ENCODER_FEATS),), buf, input_names=["feats"],
                          output_names=["logits"], dynamic_axes={"feats": {1: "T"}, "logits": {0: "T_out"}},
                          opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    return model


_ENCODER_CACHE: dict = {}


def ort_quantized_encoder(act_dtype: str = "uint8", seed: int = 0, quant_format: str = "qdq") -> onnx.ModelProto:
    """`float_encoder` quantized by `onnxruntime.quantization.quantize_static` (per-channel int8 weights, uint8
    or int8 activations, calibrated on random features of a few lengths). Built once per process.

    quant_format "qdq": QuantizeLinear/DequantizeLinear around float ops; "qoperator": QLinearMatMul,
    QLinearConv and com.microsoft QLinearAdd/QLinearMul/QLinearSoftmax/QLinearConcat/QGemm.
    """
    key = (act_dtype, seed, quant_format)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = _quantize_encoder(act_dtype, seed, quant_format)
    return onnx.load_from_string(_ENCODER_CACHE[key])


def _quantize_encoder(act_dtype: str, seed: int, quant_format: str) -> bytes:
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class RandomFeatures(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self._batches = iter([{"feats": rng.normal(0, 1, (1, t, ENCODER_FEATS)).astype(np.float32)}
                                  for t in (24, 40, 64, 40, 32, 48)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="nativeq-encoder-") as tmp:
        src, dst = Path(tmp, "float.onnx"), Path(tmp, "qdq.onnx")
        onnx.save(float_encoder(seed), src)
        fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format]
        quantize_static(str(src), str(dst), RandomFeatures(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8 if act_dtype == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def int4_activation_qdq(c: int = 32, t="T", signed: bool = True) -> onnx.ModelProto:
    """x -> QuantizeLinear to INT4/UINT4 (4-bit zero point) -> DequantizeLinear -> y: saturates to the 4-bit range."""
    dtype, zp = (TensorProto.INT4, 0) if signed else (TensorProto.UINT4, 8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"), helper.make_tensor("x_zp", dtype, [], [zp])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["y"], name="x_DQ")]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, c])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, c])], "int4_activation_qdq")


def ort_qoperator_activations(act_dtype: str = "uint8", seed: int = 0) -> onnx.ModelProto:
    """A small float Conv2d net with Sigmoid, LeakyRelu, AveragePool and GlobalAveragePool, quantized by
    `quantize_static(quant_format=QOperator)` into com.microsoft QLinearSigmoid/QLinearLeakyRelu/
    QLinearAveragePool/QLinearGlobalAveragePool around a QLinearConv. x[1, 8, 16, 16] -> y[1, 16, 1, 1]."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("LeakyRelu", ["s"], ["l"], name="leaky", alpha=0.1),
        helper.make_node("AveragePool", ["l"], ["p"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["y"], name="gap"),
    ]
    float_model = _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 1, 1])], "activations", opset=17)

    class RandomInputs(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"x": rng.normal(0, 1, (1, 8, 16, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="nativeq-qop-") as tmp:
        src, dst = Path(tmp, "float.onnx"), Path(tmp, "qop.onnx")
        onnx.save(float_model, src)
        quantize_static(str(src), str(dst), RandomInputs(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8 if act_dtype == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    onnx.checker.check_model(model, full_check=True)
    return model


def dynamic_shape_arithmetic(c: int = 8, max_t: int = 64, seed: int = 0) -> onnx.ModelProto:
    """The shape idioms of exported dynamic-T models: pos_table[arange(T)], a time shift
    concat(x[:, :1], x[:, :-1]) added back to x, and a chunk whose bounds come from x.shape[-1] // 2.
    x[1, T, c] -> y[1, T, c // 2]."""
    rng = np.random.default_rng(seed)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(0, 1, (max_t, c)).astype(np.float32), "pos_table"),
             i64("zero", 0), i64("one", 1), i64("two", 2), i64("axis1", [1]), i64("axis2", [2]), i64("s0", [0]),
             i64("s1", [1]), i64("sm1", [-1]), i64("ax_last", 2), i64("unsq_axes", [0])]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["t"], name="t", axis=0),
        helper.make_node("Range", ["zero", "t", "one"], ["positions"], name="range"),
        helper.make_node("Gather", ["pos_table", "positions"], ["pos"], name="pos_gather", axis=0),
        helper.make_node("Add", ["x", "pos"], ["xp"], name="add_pos"),
        helper.make_node("Slice", ["xp", "s0", "s1", "axis1"], ["head"], name="slice_head"),
        helper.make_node("Slice", ["xp", "s0", "sm1", "axis1"], ["body"], name="slice_body"),
        helper.make_node("Concat", ["head", "body"], ["shifted"], name="concat", axis=1),
        helper.make_node("Add", ["shifted", "xp"], ["mixed"], name="add_shift"),
        helper.make_node("Shape", ["mixed"], ["mixed_shape"], name="mixed_shape"),
        helper.make_node("Gather", ["mixed_shape", "ax_last"], ["width"], name="width", axis=0),
        helper.make_node("Div", ["width", "two"], ["half"], name="half"),
        helper.make_node("Unsqueeze", ["half", "unsq_axes"], ["half_1d"], name="half_1d"),
        helper.make_node("Slice", ["mixed", "s0", "half_1d", "axis2"], ["y"], name="chunk"),
    ]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", c])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", c // 2])], "dynamic_shape_arithmetic")


def ort_dynamic_quantized_encoder(weight_dtype: str = "int8", seed: int = 0) -> onnx.ModelProto:
    """`float_encoder` quantized by `onnxruntime.quantization.quantize_dynamic` (per-channel weights):
    DynamicQuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul by the scales."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="nativeq-dynq-") as tmp:
        src, dst = Path(tmp, "float.onnx"), Path(tmp, "dynamic.onnx")
        onnx.save(float_encoder(seed), src)
        quantize_dynamic(str(src), str(dst), per_channel=True, op_types_to_quantize=["MatMul", "Conv", "Gemm"],
                         weight_type=QuantType.QInt8 if weight_dtype == "int8" else QuantType.QUInt8)
        model = onnx.load(dst)
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_activation_chain(act: str = "gelu", k: int = 32, n: int = 48, t="T", act_dtype: str = "uint8",
                         seed: int = 0, second_matmul: bool = False) -> onnx.ModelProto:
    """x[1, t, k] -> Q/DQ -> MatMul(DQ(W)) -> Q/DQ -> `act` written as QDQ ops, as ORT `quantize_static` does
    -> Q/DQ -> y[1, t, n]. act: "gelu" (x * (1 + erf(x / sqrt 2)) * 0.5), "silu" (x * sigmoid(x)), "tanh",
    "relu" (one cheap op: not worth a table), "silu_channel_scale" (silu, then a per-channel Mul).
    second_matmul: the activation feeds another QDQ MatMul (n -> k, y[1, t, k]), as in a transformer's FFN, so
    its table holds 8-bit values.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(kind, inputs, name, scale):
        nodes.append(helper.make_node(kind, inputs, [name], name=f"{name}_{kind}"))
        return _q_dq(nodes, inits, name, name, scale, act_dtype)

    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    w = _weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (k, n)).astype(np.float32), axis=1)
    nodes.append(helper.make_node("MatMul", [xa, w], ["mm"], name="fc_MatMul"))
    h = _q_dq(nodes, inits, "h", "mm", 0.04, act_dtype)
    if act == "gelu":
        scaled = op("Div", [h, const("sqrt2", np.sqrt(2.0))], "gelu_div", 0.03)
        erf = op("Erf", [scaled], "gelu_erf", 1 / 127)
        # ORT quantize_static writes the constant 1 as QuantizeLinear -> DequantizeLinear of a float initializer
        one = _q_dq(nodes, inits, "one", const("one", 1.0), 1 / 255, "uint8")
        one_plus = op("Add", [erf, one], "gelu_add", 2 / 255)
        times_x = op("Mul", [h, one_plus], "gelu_mul", 0.08)
        out = op("Mul", [times_x, const("half", 0.5)], "gelu_half", 0.04)
    elif act in ("silu", "silu_channel_scale"):
        sig = op("Sigmoid", [h], "silu_sig", 1 / 255)
        out = op("Mul", [h, sig], "silu_mul", 0.04)
        if act == "silu_channel_scale":
            out = op("Mul", [out, const("channel_scale", rng.uniform(0.5, 1.5, n))], "channel_mul", 0.05)
    elif act == "tanh":
        out = op("Tanh", [h], "tanh", 1 / 127)
    elif act == "relu":
        out = op("Relu", [h], "relu", 0.04)
    else:
        raise ValueError(act)
    if second_matmul:
        w2 = _weight_dq(nodes, inits, "fc2", rng.normal(0, 0.2, (n, k)).astype(np.float32), axis=1)
        nodes.append(helper.make_node("MatMul", [out, w2], ["mm2"], name="fc2_MatMul"))
        out = _q_dq(nodes, inits, "y2", "mm2", 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    return _model(nodes, inits, [1, t, k], [1, t, k if second_matmul else n], f"qdq_{act}")


def qdq_softmax(n="N", t="T", log: bool = False, act_dtype: str = "uint8", scale: float = 0.0371,
                scores: str = "input", axis: int = -1, seed: int = 0) -> onnx.ModelProto:
    """Scores -> Q/DQ -> Softmax (LogSoftmax) over the last axis -> y, as attention and a CTC head read them.

    scores "input": x[1, t, n] itself; "matmul": x[1, t, 16] -> Q/DQ -> x·W with a constant QDQ weight
    [16, n]; "attention": x[1, t, 16] -> Q/DQ -> x·xᵀ (rows of t). A softmax's result goes through a final
    Q/DQ (scale 1/255, zero point 0: the way quantize_static quantizes it); a log-softmax's is returned float.
    axis: the softmax's axis.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    if scores == "input":
        src, in_shape, row = "x", [1, t, n], n
    else:
        xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
        if scores == "matmul":
            w = _weight_dq(nodes, inits, "k", rng.normal(0, 0.3, (16, n)).astype(np.float32), axis=1)
            row = n
        else:
            nodes.append(helper.make_node("Transpose", [xa], ["xt"], perm=[0, 2, 1], name="k_T"))
            w, row = "xt", t
        nodes.append(helper.make_node("MatMul", [xa, w], ["scores"], name="scores_MatMul"))
        src, in_shape = "scores", [1, t, 16]
    scores_dq = _q_dq(nodes, inits, "s", src, scale, act_dtype)
    if log:
        nodes.append(helper.make_node("LogSoftmax", [scores_dq], ["y"], axis=axis, name="LogSoftmax"))
    else:
        nodes.append(helper.make_node("Softmax", [scores_dq], ["p"], axis=axis, name="Softmax"))
        inits.append(numpy_helper.from_array(np.array(1 / 255, np.float32), "p_scale"))
        inits.append(numpy_helper.from_array(np.array(0, np.uint8), "p_zp"))
        nodes.append(helper.make_node("QuantizeLinear", ["p", "p_scale", "p_zp"], ["p_q"], name="p_Q"))
        nodes.append(helper.make_node("DequantizeLinear", ["p_q", "p_scale", "p_zp"], ["y"], name="p_DQ"))
    return _model(nodes, inits, in_shape, [1, t, row], "qdq_softmax")


def conv_transpose(c_in: int = 16, c_out: int = 8, kernel=(5,), stride=(2,), pads=(2, 2), output_padding=(0,),
                   spatial=("T",), quantized: bool = True, act_dtype: str = "uint8", bias: bool = True, groups: int = 1,
                   seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, *spatial] (-> Q/DQ) -> ConvTranspose(W[c_in, c_out / groups, *kernel], DQ'd per output channel when
    `quantized`) + bias (-> Q/DQ) -> y[1, c_out, *out]; a symbolic spatial size gives a symbolic output size."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    w = rng.normal(0, 0.2, (c_in, c_out // groups, *kernel)).astype(np.float32)
    if quantized:
        xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
        wt = _weight_dq(nodes, inits, "deconv", w, axis=1, per_channel=groups == 1)
    else:
        xa, wt = "x", "deconv_w"
        inits.append(numpy_helper.from_array(w, wt))
    inputs = [xa, wt]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "deconv_b"))
        inputs.append("deconv_b")
    nodes.append(helper.make_node("ConvTranspose", inputs, ["deconv"], name="deconv_ConvTranspose",
                                  kernel_shape=list(kernel), strides=list(stride), pads=list(pads),
                                  output_padding=list(output_padding), group=groups))
    out = _q_dq(nodes, inits, "y", "deconv", 0.1, act_dtype) if quantized else "deconv"
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    n = len(kernel)
    out_shape = [f"{d}_out" if isinstance(d, str) else
                 (d - 1) * stride[i] + kernel[i] - pads[i] - pads[n + i] + output_padding[i] for i, d in enumerate(spatial)]
    return _model(nodes, inits, [1, c_in, *spatial], [1, c_out, *out_shape], "conv_transpose")


def _qdq_pointwise(nodes, inits, name: str, src: str, c: int, in_scale: float, out_scale: float, rng) -> str:
    """Q/DQ(src) -> 1x1 Conv (int8 weight, per channel, no bias) -> Q/DQ, uint8 activations; the dequantized output."""
    a = _q_dq(nodes, inits, f"{name}_in", src, in_scale, "uint8")
    w = _weight_dq(nodes, inits, name, rng.normal(0, 0.3, (c, c, 1)).astype(np.float32), axis=0)
    nodes.append(helper.make_node("Conv", [a, w], [name], name=f"{name}_Conv", kernel_shape=[1]))
    return _q_dq(nodes, inits, f"{name}_out", name, out_scale, "uint8")


def prelu(slope: str = "scalar", c: int = 16, t="T", quantized: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[1, c, t] -> PRelu(slope: one value ("scalar") or one per channel, [c, 1]) -> y; `quantized`: between two
    QDQ 1x1 convs (uint8), the PRelu's input and output quantized too, as ORT's quantize_static leaves it."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    values = rng.uniform(0.05, 0.5, (1,) if slope == "scalar" else (c, 1)).astype(np.float32)
    inits.append(numpy_helper.from_array(values, "slope"))
    src = _qdq_pointwise(nodes, inits, "pw1", "x", c, 0.05, 0.08, rng) if quantized else "x"
    nodes.append(helper.make_node("PRelu", [src, "slope"], ["act"], name="act_PRelu"))
    out = _qdq_pointwise(nodes, inits, "pw2", "act", c, 0.06, 0.1, rng) if quantized else "act"
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    return _model(nodes, inits, [1, c, t], [1, c, t], "prelu")


def group_norm_one_group(c: int = 16, t="T", quantized: bool = False, seed: int = 0) -> onnx.ModelProto:
    """GroupNorm(1, c) as torch exports it: x[1, c, t] -> Reshape [1, 1, -1] -> InstanceNormalization -> Reshape
    [1, c, -1] -> Mul(gamma[c, 1]) -> Add(beta[c, 1]) -> y. One mean and variance over the whole tensor.
    `quantized`: between two QDQ 1x1 convs (uint8), every op's output quantized, as ORT's quantize_static leaves it."""
    rng = np.random.default_rng(seed)
    if quantized:
        return _quantized_group_norm(c, t, rng)
    inits = [numpy_helper.from_array(np.array([1, 1, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, c, -1], np.int64), "back"),
             numpy_helper.from_array(np.ones(1, np.float32), "in_scale"),
             numpy_helper.from_array(np.zeros(1, np.float32), "in_bias"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, (c, 1)).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, (c, 1)).astype(np.float32), "beta")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["flat_x"], name="flat_Reshape"),
             helper.make_node("InstanceNormalization", ["flat_x", "in_scale", "in_bias"], ["normed"], name="norm",
                              epsilon=1e-5),
             helper.make_node("Reshape", ["normed", "back"], ["back_x"], name="back_Reshape"),
             helper.make_node("Mul", ["back_x", "gamma"], ["scaled"], name="gamma_Mul"),
             helper.make_node("Add", ["scaled", "beta"], ["y"], name="beta_Add")]
    return _model(nodes, inits, [1, c, t], [1, c, t], "group_norm_one_group")


def _quantized_group_norm(c: int, t, rng) -> onnx.ModelProto:
    nodes, inits = [], []
    src = _qdq_pointwise(nodes, inits, "pw1", "x", c, 0.05, 0.08, rng)
    inits += [numpy_helper.from_array(np.array([1, 1, -1], np.int64), "flat"),
              numpy_helper.from_array(np.array([1, c, -1], np.int64), "back"),
              numpy_helper.from_array(np.ones(1, np.float32), "in_scale"),
              numpy_helper.from_array(np.zeros(1, np.float32), "in_bias"),
              numpy_helper.from_array(rng.uniform(0.5, 1.5, (c, 1)).astype(np.float32), "gamma"),
              numpy_helper.from_array(rng.normal(0, 0.1, (c, 1)).astype(np.float32), "beta")]
    nodes.append(helper.make_node("Reshape", [src, "flat"], ["flat_x"], name="flat_Reshape"))
    flat = _q_dq(nodes, inits, "flat", "flat_x", 0.08, "uint8")
    nodes.append(helper.make_node("InstanceNormalization", [flat, "in_scale", "in_bias"], ["normed"], name="norm",
                                  epsilon=1e-5))
    normed = _q_dq(nodes, inits, "normed", "normed", 0.03, "uint8")
    nodes.append(helper.make_node("Reshape", [normed, "back"], ["back_x"], name="back_Reshape"))
    back = _q_dq(nodes, inits, "back", "back_x", 0.03, "uint8")
    nodes.append(helper.make_node("Mul", [back, "gamma"], ["scaled"], name="gamma_Mul"))
    scaled = _q_dq(nodes, inits, "scaled", "scaled", 0.04, "uint8")
    nodes.append(helper.make_node("Add", [scaled, "beta"], ["shifted"], name="beta_Add"))
    out = _qdq_pointwise(nodes, inits, "pw2", "shifted", c, 0.04, 0.1, rng)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    return _model(nodes, inits, [1, c, t], [1, c, t], "group_norm_one_group_q")


def scalar_length_slice(c: int = 8) -> onnx.ModelProto:
    """x[1, T, c] -> the first (T + 1) // 2 frames, the length computed as torch's dynamo exporter writes it: Shape
    (start 1, end 2) -> Squeeze -> Add 1 -> Div 2 -> Reshape [1] -> Slice ends. Float, no QDQ."""
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array([1], np.int64), "as_1d"),
             numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("Shape", ["x"], ["t_1d"], name="t_Shape", start=1, end=2),
             helper.make_node("Squeeze", ["t_1d"], ["t"], name="t_Squeeze"),
             helper.make_node("Add", ["t", "one"], ["t_plus"], name="t_Add"),
             helper.make_node("Div", ["t_plus", "two"], ["half"], name="half_Div"),
             helper.make_node("Reshape", ["half", "as_1d"], ["ends"], name="ends_Reshape"),
             helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="first_half")]
    return _finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", c])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "H", c])], "scalar_length_slice", opset=18)


def qdq_conv_pool(pool: str = "MaxPool", ndim: int = 2, c: int = 16, kernel=2, stride=2, pads=0, ceil_mode: int = 0,
                  spatial=("T", 20), act_dtype: str = "uint8", activation: str = "Relu", seed: int = 0) -> onnx.ModelProto:
    """x[1, c, *spatial] -> Q/DQ -> 3x3 (3-tap) Conv + activation -> Q/DQ -> MaxPool / AveragePool (kernel, stride,
    pads on every spatial axis) -> Q/DQ -> 1x1 Conv -> Q/DQ -> y: a CNN stem as ORT's quantize_static leaves it (the
    pool's output quantized with its input's scale and zero point). activation: "Relu", "LeakyRelu" (alpha 0.1), or
    "Max" (Keras' leaky ReLU as tf2onnx writes `tf.math.maximum(x, 0.2 x)`: the conv's output and its scaled copy
    quantized, then Max)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    spatial = tuple(spatial[:ndim])
    xa = _q_dq(nodes, inits, "x", "x", 0.05, act_dtype)
    w1 = _weight_dq(nodes, inits, "conv1", rng.normal(0, 0.2, (c, c, *[3] * ndim)).astype(np.float32), axis=0)
    nodes.append(helper.make_node("Conv", [xa, w1], ["conv1"], name="conv1_Conv", kernel_shape=[3] * ndim,
                                  pads=[1] * (2 * ndim)))
    if activation == "Max":
        conv1 = _q_dq(nodes, inits, "conv1_out", "conv1", 0.05, act_dtype)
        inits.append(numpy_helper.from_array(np.array(0.2, np.float32), "slope"))
        nodes.append(helper.make_node("Mul", [conv1, "slope"], ["scaled"], name="conv1_Mul"))
        scaled = _q_dq(nodes, inits, "scaled", "scaled", 0.01, act_dtype)
        nodes.append(helper.make_node("Max", [conv1, scaled], ["relu"], name="conv1_Max"))
    else:
        nodes.append(helper.make_node(activation, ["conv1"], ["relu"], name=f"conv1_{activation}",
                                      **({"alpha": 0.1} if activation == "LeakyRelu" else {})))
    act = _q_dq(nodes, inits, "act", "relu", 0.04, act_dtype)
    attrs = {"kernel_shape": [kernel] * ndim, "strides": [stride] * ndim, "pads": [pads] * (2 * ndim),
             "ceil_mode": ceil_mode}
    if pool == "AveragePool":
        attrs["count_include_pad"] = 0
    nodes.append(helper.make_node(pool, [act], ["pooled"], name="pool", **attrs))
    pooled = _q_dq(nodes, inits, "pooled", "pooled", 0.04 if pool == "MaxPool" else 0.03, act_dtype)
    w2 = _weight_dq(nodes, inits, "conv2", rng.normal(0, 0.2, (c, c, *[1] * ndim)).astype(np.float32), axis=0)
    nodes.append(helper.make_node("Conv", [pooled, w2], ["conv2"], name="conv2_Conv", kernel_shape=[1] * ndim))
    out = _q_dq(nodes, inits, "y", "conv2", 0.1, act_dtype)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    out_shape = [f"{d}_out" if isinstance(d, str) else f"S{i}_out" for i, d in enumerate(spatial)]
    return _model(nodes, inits, [1, c, *spatial], [1, c, *out_shape], f"qdq_conv_{pool.lower()}")


def skip_concat(channels: int = 16, spatial=(12, 16), seed: int = 0) -> onnx.ModelProto:
    """A U-Net level (uint8 QDQ, per-channel int8 weights, as ORT's quantize_static writes it): x[1, 4, *spatial] ->
    3x3 Conv (e) -> stride-2 3x3 Conv -> LeakyRelu -> ConvTranspose k4 s2 p1 -> PRelu per channel -> Concat with e
    along the channels -> 1x1 Conv -> y[1, channels, *spatial]. Channels-last, the concat and the transposed conv's
    phase interleave are both along the innermost axis of one elementwise kernel. Even spatial sizes."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    n = len(spatial)

    def conv(name, src, c_in, c_out, kernel, stride=1, pad=0, op="Conv"):
        shape = (c_in, c_out) if op == "ConvTranspose" else (c_out, c_in)
        w = _weight_dq(nodes, inits, name, rng.normal(0, 0.4 / np.sqrt(c_in), (*shape, *[kernel] * n)).astype(np.float32),
                       axis=1 if op == "ConvTranspose" else 0)
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), f"{name}_b"))
        nodes.append(helper.make_node(op, [src, w, f"{name}_b"], [name], name=f"{name}_{op}", kernel_shape=[kernel] * n,
                                      strides=[stride] * n, pads=[pad] * 2 * n))
        return name

    x = _q_dq(nodes, inits, "x", "x", 0.05, "uint8")
    e = _q_dq(nodes, inits, "e", conv("enc", x, 4, channels, 3, pad=1), 0.06, "uint8")
    down = _q_dq(nodes, inits, "down", conv("down", e, channels, channels, 3, stride=2, pad=1), 0.07, "uint8")
    nodes.append(helper.make_node("LeakyRelu", [down], ["leaky"], name="leaky_LeakyRelu", alpha=0.2))
    leaky = _q_dq(nodes, inits, "leaky", "leaky", 0.05, "uint8")
    up = _q_dq(nodes, inits, "up", conv("up", leaky, channels, channels, 4, stride=2, pad=1, op="ConvTranspose"), 0.08,
               "uint8")
    inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (channels, *[1] * n)).astype(np.float32), "slope"))
    nodes.append(helper.make_node("PRelu", [up, "slope"], ["act"], name="act_PRelu"))
    act = _q_dq(nodes, inits, "act", "act", 0.06, "uint8")
    nodes.append(helper.make_node("Concat", [act, e], ["cat"], name="cat_Concat", axis=1))
    cat = _q_dq(nodes, inits, "cat", "cat", 0.06, "uint8")
    out = _q_dq(nodes, inits, "y", conv("head", cat, 2 * channels, channels, 1), 0.1, "uint8")
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    return _model(nodes, inits, [1, 4, *spatial], [1, channels, *spatial], "skip_concat")
