"""Find the quantized contraction sites in an imported Relax function (analysis only, no rewrite).

A *site* is a matmul/conv whose operands are integers in disguise. The forms the ONNX importer emits:

  QDQ (DequantizeLinear -> MatMul/Gemm/Conv; also QLinearMatMul/QLinearConv after onnx_legalize):
    x_f = R.dequantize(x_q, sx, zx)                   # activation: int8/uint8, per-tensor
    w_f = R.dequantize(W_q, sw, zw, axis=...)          # constant int8/uint8 weight, per-tensor or per-out-channel
    (w_f = R.permute_dims(w_f, ...))                   # Gemm transB
    y   = R.matmul(x_f, w_f) | R.nn.conv1d/conv2d(x_f, w_f, ...)          -> float32 result

  MatMulInteger (TVM's converter widens to int32 first; also DynamicQuantizeLinear + MatMulInteger):
    y = R.matmul(R.astype(x_q, "int32") (- zx), R.astype(W_q, "int32") (- zw), out_dtype="int32")
                                                                          -> int32 result

  ConvInteger (onnx_legalize makes it an exact float conv): the weight is a float constant holding
  small integers and the activation a dequantize with scale 1.

The activation scale and zero point may be runtime scalars (DynamicQuantizeLinear). `match_site`
returns a `QdqSite` (everything the integer rewrite needs, with the weight already int8 in its
natural layout: [K, N] for matmul, OIW/OIHW for conv) or a one-line reason why the site stays float.
`LowerQDQToInteger` and `explain_sites` both use it, so what is reported is what is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nativeq.compile._tvm import relax, tvm

CONTRACTION_OPS = {"relax.matmul": "matmul", "relax.nn.conv1d": "conv1d", "relax.nn.conv2d": "conv2d"}
_CONV_LAYOUTS = {"conv1d": ("NCW", "OIW"), "conv2d": ("NCHW", "OIHW")}
_ACT_DTYPES = ("int8", "uint8")
_MAX_PRODUCT = 255 * 128  # |x - zx| * |w - zw| for 8-bit operands with an int8-centered weight


@dataclass(frozen=True)
class QdqSite:
    """One matmul/conv whose two inputs are dequantized integers, ready to become an integer op."""

    op: str  # "matmul", "conv1d" or "conv2d"
    call: relax.Call  # the contraction as imported
    x_q: relax.Expr  # the int8/uint8 activation
    x_dtype: str
    x_scale: float | relax.Expr | None  # None: the site's result is the int32 accumulator itself
    x_zero_point: int | relax.Expr  # a Python int, or a runtime integer scalar
    weight: np.ndarray  # int8, natural layout
    weight_zero_point: np.ndarray  # int64, () or (out_channels,): what is left after centering `weight`
    w_scale: np.ndarray | None  # float32, () per-tensor or (out_channels,) per-channel; None for int32 sites

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] if self.op == "matmul" else self.weight.shape[0]

    @property
    def reduction_size(self) -> int:
        return self.weight.shape[0] if self.op == "matmul" else int(np.prod(self.weight.shape[1:]))

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


def const_array(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    return None


def resolve(expr, var2val):
    """Follow Var -> bound value (the importer binds every call to a var)."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def _strip_int32_cast(expr, var2val):
    """`x` if `expr` is R.astype(x, "int32") of an 8-bit x, else None."""
    value = resolve(expr, var2val)
    if op_name(value) == "relax.astype" and str(value.attrs.dtype) == "int32" and _dtype(value.args[0]) in _ACT_DTYPES:
        return value.args[0]
    return None


def _is_scalar(expr) -> bool:
    shape = expr.ty.shape if hasattr(expr.ty, "shape") else None
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in shape)


def _scalar_param(expr, var2val):
    """A per-tensor quantization parameter: a Python number if constant, the Relax expr if a runtime scalar."""
    value = static_value(expr, var2val)
    if value is not None:
        return value.reshape(()).item() if value.size == 1 else None
    return expr if _is_scalar(expr) else None


def _permutation(permute_dims_call) -> list[int]:
    axes = permute_dims_call.attrs.axes
    if axes is None:  # R.permute_dims(x) reverses the axes
        return list(range(len(permute_dims_call.ty.shape)))[::-1]
    return [int(a) for a in axes]


def _weight_operand(expr, var2val, op: str):
    """(raw weight array in natural layout, zero point, scale or None, zero-point/scale axis) or a reason."""
    axes = None
    value = resolve(expr, var2val)
    if op == "matmul" and op_name(value) == "relax.permute_dims":
        axes = _permutation(value)
        value = resolve(value.args[0], var2val)
    if op_name(value) == "relax.dequantize":
        w_q = static_value(value.args[0], var2val)
        if w_q is None:
            return "weight is not a constant (activation x activation product)"
        scale, zero_point = static_value(value.args[1], var2val), static_value(value.args[2], var2val)
        if scale is None or zero_point is None:
            return "weight scale/zero point are not constants"
        axis = int(value.attrs.axis) % w_q.ndim
    elif op_name(value) == "relax.subtract" and _strip_int32_cast(value.args[0], var2val) is not None:
        w_q = static_value(_strip_int32_cast(value.args[0], var2val), var2val)  # MatMulInteger with b_zero_point
        zero_point = static_value(value.args[1], var2val)
        if w_q is None or zero_point is None:
            return "MatMulInteger weight or its zero point is not a constant"
        scale, axis = None, w_q.ndim - 1
        zero_point = zero_point.reshape(-1) if zero_point.size > 1 else zero_point.reshape(())
    elif _strip_int32_cast(value, var2val) is not None:
        w_q = static_value(_strip_int32_cast(value, var2val), var2val)  # MatMulInteger without b_zero_point
        if w_q is None:
            return "MatMulInteger weight is not a constant"
        zero_point, scale, axis = np.zeros((), np.int64), None, 0
    else:
        w_q = static_value(value, var2val)
        if w_q is None or w_q.dtype != np.float32:
            return "weight is not a DequantizeLinear output"
        if not (np.array_equal(w_q, np.rint(w_q)) and w_q.min(initial=0) >= -128 and w_q.max(initial=0) <= 127):
            return "weight is a float tensor (not integers in the int8 range)"
        w_q, zero_point, scale, axis = w_q.astype(np.int8), np.zeros((), np.int64), np.ones((), np.float32), 0
    if w_q.dtype not in (np.int8, np.uint8):
        return f"weight dtype {w_q.dtype} is not int8/uint8"
    axes = axes or list(range(w_q.ndim))
    if op == "matmul" and len(axes) != 2:
        return f"matmul weight has rank {len(axes)}, only 2-D [K, N] weights are rewritten"
    return np.transpose(w_q, axes), zero_point, scale, axes.index(axis)


def _per_channel(param, axis: int, channel_axis: int, channels: int, name: str):
    if param is None or param.size == 1:
        return None if param is None else param.reshape(())
    if param.ndim != 1 or axis != channel_axis or param.size != channels:
        return f"weight {name} varies along a reduction axis (only per-output-channel is rewritten)"
    return param


def _match_weight(expr, var2val, op: str):
    """(int8 weight, residual zero point, scale) with the zero point folded into the weight when it fits."""
    operand = _weight_operand(expr, var2val, op)
    if isinstance(operand, str):
        return operand
    natural, zero_point, scale, axis = operand
    channel_axis = 1 if op == "matmul" else 0
    channels = natural.shape[channel_axis]
    scale = _per_channel(scale, axis, channel_axis, channels, "scale")
    zero_point = _per_channel(zero_point, axis, channel_axis, channels, "zero point")
    for checked in (scale, zero_point):
        if isinstance(checked, str):
            return checked
    # An 8-bit weight as int8: uint8 values are stored shifted by -128 (and so is their zero point).
    offset = 128 if natural.dtype == np.uint8 else 0
    shape = [1] * natural.ndim
    shape[channel_axis] = -1
    weight = natural.astype(np.int64) - offset
    zero_point = zero_point.astype(np.int64) - offset
    centered = weight - zero_point.reshape(shape if zero_point.ndim else ())
    if centered.min() >= -128 and centered.max() <= 127:
        weight, zero_point = centered, np.zeros((), np.int64)
    if scale is not None:
        scale = scale.astype(np.float32)
    return weight.astype(np.int8), zero_point, scale


def _match_activation(expr, var2val, result_dtype: str):
    """(x_q, dtype, scale or None, zero point) or a reason."""
    value = resolve(expr, var2val)
    if result_dtype == "int32":  # MatMulInteger: astype(x_q, int32) (- zero point)
        zero_point = 0
        x_q = _strip_int32_cast(value, var2val)
        if x_q is None and op_name(value) == "relax.subtract":
            x_q = _strip_int32_cast(value.args[0], var2val)
            zero_point = _scalar_param(value.args[1], var2val)
        if x_q is None or zero_point is None:
            return "int32 operand is not a widened 8-bit tensor minus a per-tensor zero point"
        return x_q, _dtype(x_q), None, zero_point
    if op_name(value) != "relax.dequantize":
        return "activation is not a DequantizeLinear output"
    if str(value.attrs.out_dtype) != "float32":
        return f"activation dequantizes to {value.attrs.out_dtype}, not float32"
    x_q = value.args[0]
    if _dtype(x_q) not in _ACT_DTYPES:
        return f"activation dtype {_dtype(x_q)} is not int8/uint8"
    scale = _scalar_param(value.args[1], var2val)
    zero_point = _scalar_param(value.args[2], var2val)
    if scale is None or zero_point is None:
        return "activation scale/zero point are not per-tensor"
    if not isinstance(scale, relax.Expr):
        scale = float(np.float32(scale))
    if not isinstance(zero_point, relax.Expr):
        zero_point = int(zero_point)
    return x_q, _dtype(x_q), scale, zero_point


def match_site(call, var2val) -> QdqSite | str:
    """The integer site `call` is, or why it stays float. `var2val` is `relax.analysis.get_var2val(func)`."""
    op = CONTRACTION_OPS.get(op_name(call))
    if op is None:
        return f"{op_name(call)} is not a matmul/conv"
    result_dtype = _dtype(call)
    if result_dtype == "int32" and any(_dtype(a) in _ACT_DTYPES for a in call.args[:2]):
        return "already an 8-bit integer kernel"
    if result_dtype not in ("float32", "int32") or (result_dtype == "int32" and op != "matmul"):
        return f"{op} computes in {result_dtype}"
    if op != "matmul":
        data_layout, kernel_layout = _CONV_LAYOUTS[op]
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (data_layout, kernel_layout, data_layout):
            return f"{op} layout {attrs.data_layout}/{attrs.kernel_layout} is not {data_layout}/{kernel_layout}"
    activation = _match_activation(call.args[0], var2val, result_dtype)
    if isinstance(activation, str):
        return activation
    weight = _match_weight(call.args[1], var2val, op)
    if isinstance(weight, str):
        return weight
    x_q, x_dtype, x_scale, x_zero_point = activation
    w, w_zero_point, w_scale = weight
    if (w_scale is None) != (x_scale is None):
        return "mixes a float and an integer operand"
    if op != "matmul" and isinstance(x_zero_point, relax.Expr) and any(int(p) for p in call.attrs.padding):
        return "padded conv with a runtime activation zero point"
    site = QdqSite(op, call, x_q, x_dtype, x_scale, x_zero_point, w, w_zero_point, w_scale)
    if site.reduction_size * _MAX_PRODUCT > np.iinfo(np.int32).max:
        return f"reduction over {site.reduction_size} products may overflow the int32 accumulator"
    return site


def static_value(expr, var2val) -> np.ndarray | None:
    """The value of `expr` if it is computable at compile time from constants alone.

    Covers what the importer puts around constants before FoldConstant runs: reshape, expand_dims,
    astype, per-tensor quantize and dequantize (evaluated as ONNX Runtime does: `x / scale` rounded
    half to even plus the zero point, saturated; `(q - zero_point) * scale` in float32).
    """
    expr = resolve(expr, var2val)
    value = const_array(expr)
    if value is not None:
        return value
    name = op_name(expr)
    if name in ("relax.reshape", "relax.expand_dims", "relax.astype"):
        data = static_value(expr.args[0], var2val)
        if data is None:
            return None
        if name == "relax.astype":
            return data.astype(str(expr.attrs.dtype))
        return data.reshape([int(d) for d in expr.ty.shape])
    if name == "relax.quantize" and str(expr.ty.dtype) in ("int8", "uint8"):
        data, scale, zero_point = (static_value(a, var2val) for a in expr.args)
        if data is None or scale is None or zero_point is None or scale.size > 1 or zero_point.size > 1:
            return None
        info = np.iinfo(str(expr.ty.dtype))
        # ONNX QuantizeLinear: x / scale in float32, round half to even, + zero point, saturate
        scaled = np.rint(data.astype(np.float32) / scale.astype(np.float32).reshape(()))
        return np.clip(scaled + zero_point.astype(np.float32).reshape(()), info.min, info.max).astype(info.dtype)
    if name == "relax.dequantize" and str(expr.attrs.out_dtype) == "float32":
        data, scale, zero_point = (static_value(a, var2val) for a in expr.args)
        if data is None or scale is None or zero_point is None:
            return None
        shape = [1] * data.ndim
        if scale.size > 1 or zero_point.size > 1:
            shape[int(expr.attrs.axis) % data.ndim] = -1
        centered = data.astype(np.int64) - zero_point.astype(np.int64).reshape(shape if zero_point.size > 1 else ())
        return centered.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
    return None


@dataclass(frozen=True)
class ActivationProductSite:
    """A matmul of two dequantized activations (attention's Q·Kᵀ and P·V), per-tensor constant parameters."""

    call: relax.Call
    lhs_q: relax.Expr  # int8/uint8 [..., M, K]
    lhs_dtype: str
    lhs_scale: float
    lhs_zero_point: int
    rhs_q: relax.Expr  # int8/uint8, before `rhs_axes`
    rhs_dtype: str
    rhs_scale: float
    rhs_zero_point: int
    rhs_axes: tuple[int, ...] | None  # permute_dims applied to the rhs between its dequantize and the matmul


def match_activation_product(call, var2val) -> ActivationProductSite | str:
    """`call` as a matmul of two dequantized activations, or why it is not one."""
    if op_name(call) != "relax.matmul" or _dtype(call) != "float32":
        return "not a float matmul"
    lhs = _match_activation(call.args[0], var2val, "float32")
    if isinstance(lhs, str):
        return lhs
    rhs_value = resolve(call.args[1], var2val)
    axes = None
    if op_name(rhs_value) == "relax.permute_dims":
        axes = tuple(_permutation(rhs_value))
        rhs_value = resolve(rhs_value.args[0], var2val)
    rhs = _match_activation(rhs_value, var2val, "float32") if op_name(rhs_value) == "relax.dequantize" else \
        "rhs is not a DequantizeLinear output"
    if isinstance(rhs, str):
        return rhs
    parameters = (lhs[2], lhs[3], rhs[2], rhs[3])
    if any(isinstance(p, relax.Expr) for p in parameters):
        return "activation x activation product with runtime quantization parameters"
    if static_value(rhs[0], var2val) is not None:
        return "rhs is a constant (handled as a weight)"
    if len(call.args[0].ty.shape) < 2 or len(call.args[1].ty.shape) < 2:
        return "matrix-vector product"
    return ActivationProductSite(call, lhs[0], lhs[1], lhs[2], lhs[3], rhs[0], rhs[1], rhs[2], rhs[3], axes)


def static_scalar(expr, var2val) -> np.ndarray | None:
    """The value of `expr` as a 0-d array if it is a one-element tensor known at compile time, else None."""
    value = static_value(expr, var2val)
    return None if value is None or value.size != 1 else value.reshape(())
