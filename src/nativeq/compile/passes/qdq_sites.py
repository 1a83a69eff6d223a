"""Find the quantized contraction sites in an imported Relax function (analysis only, no rewrite).

A *site* is what the ONNX importer makes of `DequantizeLinear(x_q) -> MatMul/Gemm/Conv <- DequantizeLinear(W_q)`:

    x_f = R.dequantize(x_q, sx, zx)                  # activation: int8/uint8, per-tensor
    w_f = R.dequantize(W_q, sw, zw, axis=...)         # constant int8 weight, per-tensor or per-output-channel
    (w_f = R.permute_dims(w_f, ...))                  # Gemm transB
    y   = R.matmul(x_f, w_f) | R.nn.conv1d/conv2d(x_f, w_f, ...)

`match_site` returns a `QdqSite` (everything the integer rewrite needs, with the weight already in
its natural layout: [K, N] for matmul, OIW/OIHW for conv) or a one-line reason why the site must stay
float. Both `LowerQDQToInteger` and `explain_sites` use it, so what is reported is what is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nativeq.compile._tvm import relax, tvm

CONTRACTION_OPS = {"relax.matmul": "matmul", "relax.nn.conv1d": "conv1d", "relax.nn.conv2d": "conv2d"}
_CONV_LAYOUTS = {"conv1d": ("NCW", "OIW"), "conv2d": ("NCHW", "OIHW")}
_ACT_DTYPES = ("int8", "uint8")


@dataclass(frozen=True)
class QdqSite:
    """One matmul/conv whose two inputs are dequantized integers, ready to become an integer op."""

    op: str  # "matmul", "conv1d" or "conv2d"
    call: relax.Call  # the float contraction as imported
    x_q: relax.Expr  # the int8/uint8 activation (input of the activation dequantize)
    x_dtype: str
    x_scale: float
    x_zero_point: int
    weight: np.ndarray  # int8, natural layout, weight zero point already subtracted
    w_scale: np.ndarray  # float32, shape () per-tensor or (out_channels,) per-channel

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] if self.op == "matmul" else self.weight.shape[0]

    def weight_sums(self) -> np.ndarray:
        """Σ over the reduction axes of the int8 weight, per output channel (int64)."""
        w = self.weight.astype(np.int64)
        return w.sum(axis=0) if self.op == "matmul" else w.reshape(w.shape[0], -1).sum(axis=1)


def op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _const_array(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    return None


def _resolve(expr, var2val):
    """Follow Var -> bound value (the importer binds every call to a var)."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def _scalar(arr: np.ndarray | None):
    if arr is None or arr.size != 1:
        return None
    return arr.reshape(()).item()


def _match_weight(expr, var2val, op: str):
    """(int8 weight in natural layout, per-channel or scalar scale) or a reason string."""
    axes = None
    value = _resolve(expr, var2val)
    if op == "matmul" and op_name(value) == "relax.permute_dims":
        axes = value.attrs.axes
        value = _resolve(value.args[0], var2val)
    if op_name(value) != "relax.dequantize":
        return "weight is not a DequantizeLinear output"
    w_q = _const_array(_resolve(value.args[0], var2val))
    if w_q is None:
        return "weight is not a constant (activation x activation product)"
    scale = _const_array(_resolve(value.args[1], var2val))
    zero_point = _const_array(_resolve(value.args[2], var2val))
    if scale is None or zero_point is None:
        return "weight scale/zero point are not constants"
    if w_q.dtype not in (np.int8, np.uint8):
        return f"weight dtype {w_q.dtype} is not int8/uint8"
    axis = int(value.attrs.axis) % w_q.ndim
    if axes is None:
        axes = list(range(w_q.ndim))
    axes = [int(a) for a in axes]
    if op == "matmul" and len(axes) != 2:
        return f"matmul weight has rank {len(axes)}, only 2-D [K, N] weights are rewritten"
    channel_axis = 1 if op == "matmul" else 0
    natural = np.transpose(w_q, axes)
    axis = axes.index(axis)

    def per_channel(param: np.ndarray, name: str):
        if param.size == 1:
            return param.reshape(())
        if param.ndim != 1 or axis != channel_axis or param.size != natural.shape[channel_axis]:
            return f"weight {name} varies along a reduction axis (only per-output-channel is rewritten)"
        return param

    scale = per_channel(scale, "scale")
    if isinstance(scale, str):
        return scale
    zero_point = per_channel(zero_point, "zero point")
    if isinstance(zero_point, str):
        return zero_point
    shape = [1] * natural.ndim
    if zero_point.ndim == 1:
        shape[channel_axis] = -1
    centered = natural.astype(np.int32) - zero_point.astype(np.int32).reshape(shape)
    if centered.min() < -128 or centered.max() > 127:
        return "weight minus its zero point does not fit int8"
    return centered.astype(np.int8), scale.astype(np.float32)


def _match_activation(expr, var2val):
    value = _resolve(expr, var2val)
    if op_name(value) != "relax.dequantize":
        return "activation is not a DequantizeLinear output"
    if str(value.attrs.out_dtype) != "float32":
        return f"activation dequantizes to {value.attrs.out_dtype}, not float32"
    x_q = value.args[0]
    if _dtype(x_q) not in _ACT_DTYPES:
        return f"activation dtype {_dtype(x_q)} is not int8/uint8"
    scale = _scalar(_const_array(_resolve(value.args[1], var2val)))
    zero_point = _scalar(_const_array(_resolve(value.args[2], var2val)))
    if scale is None or zero_point is None:
        return "activation scale/zero point are not per-tensor constants"
    return x_q, _dtype(x_q), float(np.float32(scale)), int(zero_point)


def match_site(call, var2val) -> QdqSite | str:
    """The integer site `call` is, or why it stays float. `var2val` is `relax.analysis.get_var2val(func)`."""
    op = CONTRACTION_OPS.get(op_name(call))
    if op is None:
        return f"{op_name(call)} is not a matmul/conv"
    if _dtype(call) != "float32":
        return f"{op} computes in {_dtype(call)}, not float32"
    if op != "matmul":
        data_layout, kernel_layout = _CONV_LAYOUTS[op]
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (data_layout, kernel_layout, data_layout):
            return f"{op} layout {attrs.data_layout}/{attrs.kernel_layout} is not {data_layout}/{kernel_layout}"
    activation = _match_activation(call.args[0], var2val)
    if isinstance(activation, str):
        return activation
    weight = _match_weight(call.args[1], var2val, op)
    if isinstance(weight, str):
        return weight
    x_q, x_dtype, x_scale, x_zero_point = activation
    w, w_scale = weight
    return QdqSite(op, call, x_q, x_dtype, x_scale, x_zero_point, w, w_scale)


def static_value(expr, var2val) -> np.ndarray | None:
    """The value of `expr` if it is computable at compile time from constants alone.

    Covers what the importer puts around constants before FoldConstant runs: reshape, and
    dequantize (evaluated as ONNX Runtime does, `(q - zero_point) * scale` in float32).
    """
    expr = _resolve(expr, var2val)
    value = _const_array(expr)
    if value is not None:
        return value
    name = op_name(expr)
    if name == "relax.reshape" and isinstance(expr.args[1], relax.ShapeExpr):
        data = static_value(expr.args[0], var2val)
        shape = [int(d) for d in expr.args[1].values]
        return None if data is None else data.reshape(shape)
    if name == "relax.dequantize" and str(expr.attrs.out_dtype) == "float32":
        data, scale, zero_point = (static_value(a, var2val) for a in expr.args)
        if data is None or scale is None or zero_point is None:
            return None
        shape = [1] * data.ndim
        if scale.size > 1 or zero_point.size > 1:
            shape[int(expr.attrs.axis) % data.ndim] = -1
        centered = data.astype(np.int64) - zero_point.astype(np.int64).reshape(shape if zero_point.size > 1 else ())
        return (centered.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ()))
    return None
