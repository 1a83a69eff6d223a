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


def qdq_conv2d(c_in: int = 8, c_out: int = 16, kernel: int = 3, h: int = 20, w: int = 20, act_dtype: str = "int8",
               stride: int = 2, relu: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, h, w] -> Q/DQ -> Conv2d(DQ(W)) + bias (-> Relu) -> Q/DQ -> y."""
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
    ho = (h + 2 - kernel) // stride + 1
    wo = (w + 2 - kernel) // stride + 1
    return _model(nodes, inits, [1, c_in, h, w], [1, c_out, ho, wo], "qdq_conv2d")
