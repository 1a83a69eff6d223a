"""LowerQDQToInteger: dequantize -> matmul/conv -> float  becomes  integer matmul/conv -> int32 -> float.

Where it sits: first int8 pass, right after ONNX import and before any FoldConstant (which would fold
the weight dequantize into a float tensor and hide the int8 weights). FoldBiasIntoAccumulator follows.

For every site found by `qdq_sites.match_site` it emits, in canonical Relax ops (the form the int8
schedules match):

    x_k  = x_q shifted to the kernel activation dtype (see `activation_dtype`)
    x_k  = R.nn.pad(x_k, pad_value=zx_k)            # conv only, when it pads and zx_k != 0
    acc  = R.matmul(x_k, W, out_dtype="int32")      # or R.nn.conv1d/conv2d(..., out_dtype="int32")
    acc  = R.subtract(acc, zx_k * sum_k W)          # zero-point correction, precomputed per output channel
    y    = R.multiply(R.astype(acc, "float32"), sx * sw)

`y` replaces the float contraction, so whatever consumed it (bias Add, Relu, QuantizeLinear, a float
op) is unchanged and stays exact: the requantize is the importer's own `R.quantize` (round half to
even, saturate, as in ONNX Runtime), which operator fusion folds into the kernel's epilogue.
W stays an int8 constant in its natural layout ([K, N] for matmul, OIW/OIHW for conv).

Variants of the same algebra, Σ_k (x - zx)(w - zw) expanded:
  - a weight zero point that cannot be folded into int8 W: - zw * Σ_k x, a row sum of the activation
    (matmul) or its sum over each receptive field (conv: a conv with a ones kernel per group);
  - a run-time activation zero point / scale (DynamicQuantizeLinear): the correction is zx * const,
    the scale sx * const, computed in the graph;
  - MatMulInteger (int32 result): no rescale, the corrected accumulator is the result;
  - activation x activation (attention's Q·Kᵀ, P·V; `match_activation_product`): the second operand
    becomes int8 and both corrections are run-time sums.

`activation_dtype` is the dtype the integer kernel reads:
  - "uint8": x86 (VNNI `vpdpbusd` is u8 x s8); int8 activations are shifted by +128,
  - "int8": ARM (`sdot`/`smull` are s8 x s8); uint8 activations are shifted by -128,
  - None: keep the model's activation dtype.
The shift changes the activation zero point by the same amount, so the correction term absorbs it.
If the activation comes straight from a QuantizeLinear, the shift is that quantize with the shifted
zero point (exactly the same values); otherwise it is an explicit add on the integers.
Padding is done with the (shifted) zero point so padded positions contribute exactly zero, as the
float graph's zero padding does.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.provenance import with_span
from nativeq.compile.passes.qdq_sites import (
    ActivationProductSite,
    QdqSite,
    const_array,
    match_activation_product,
    match_site,
    op_name,
)

ACTIVATION_DTYPES = ("uint8", "int8", None)
_SHIFT = {("int8", "uint8"): 128, ("uint8", "int8"): -128}


def _shift_activation(x_q: relax.Expr, producer, x_dtype: str, kernel_dtype: str) -> relax.Expr:
    shift = _SHIFT[(x_dtype, kernel_dtype)]
    if op_name(producer) == "relax.quantize":
        zero_point = const_array(producer.args[2])
        if zero_point is not None and zero_point.size == 1:
            shifted_zp = relax.const(int(zero_point.reshape(())) + shift, kernel_dtype)
            return relax.op.quantize(producer.args[0], producer.args[1], shifted_zp, producer.attrs.axis, kernel_dtype)
    widened = relax.op.add(relax.op.astype(x_q, "int32"), relax.const(shift, "int32"))
    return relax.op.astype(widened, kernel_dtype)


def _channel_shape(site: QdqSite) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector against the contraction's output."""
    n = site.out_channels
    return (n,) if site.op == "matmul" else (1, n) + (1,) * (site.weight.ndim - 2)


def _pad_width(site: QdqSite) -> list[int]:
    padding = [int(p) for p in site.call.attrs.padding]
    spatial = len(padding) // 2
    width = [0, 0, 0, 0]
    for i in range(spatial):  # TVM order: all "before" pads, then all "after" pads
        width += [padding[i], padding[i + spatial]]
    return width


def _padded_input(site: QdqSite, x_k: relax.Expr, zero_point) -> tuple[relax.Expr, list[int]]:
    """The conv input and the padding left to the conv: padded here with the zero point when it is not 0."""
    padding = [int(p) for p in site.call.attrs.padding]
    if zero_point != 0 and any(padding):  # NOTE: match_site refuses padded convs with a runtime zero point
        return relax.op.nn.pad(x_k, _pad_width(site), pad_value=float(zero_point)), [0] * len(padding)
    return x_k, padding


def _conv(site: QdqSite, x: relax.Expr, weight: np.ndarray, padding: list[int], groups: int) -> relax.Expr:
    attrs = site.call.attrs
    conv = relax.op.nn.conv1d if site.op == "conv1d" else relax.op.nn.conv2d
    return conv(
        x,
        relax.const(weight, "int8"),
        strides=[int(s) for s in attrs.strides],
        padding=padding,
        dilation=[int(d) for d in attrs.dilation],
        groups=groups,
        data_layout=attrs.data_layout,
        kernel_layout=attrs.kernel_layout,
        out_layout=attrs.out_layout,
        out_dtype="int32",
    )


def _window_sums(site: QdqSite, x: relax.Expr, padding: list[int]) -> relax.Expr:
    """Σ of the activation over each output's receptive field (its group's channels x the kernel window),
    broadcast to every output channel: a conv with a ones kernel, one output channel per group."""
    groups = int(site.call.attrs.groups)
    ones = np.ones((groups,) + site.weight.shape[1:], np.int8)
    sums = _conv(site, x, ones, padding, groups)
    per_group = site.out_channels // groups
    return relax.op.repeat(sums, per_group, axis=1) if per_group > 1 else sums


def _int32_const(values: np.ndarray, shape) -> relax.Expr:
    # NOTE: match_site bounds K * 255 * 128 by the int32 range, so every correction term fits int32.
    per_channel = np.broadcast_to(values, (int(np.prod(shape)),))
    return relax.const(per_channel.astype(np.int32).reshape(shape))


def lower_site(site: QdqSite, x_k: relax.Expr, kernel_dtype: str, visit=lambda e: e, emit=lambda e: e) -> relax.Expr:
    """The integer expression replacing `site.call`; `x_k` is the activation already in `kernel_dtype`.

    acc = Σ_k (x - zx)(W - zw) = Σ_k x·W - zx·(Σ_k W - K·zw) - zw·Σ_k x; the middle term is a
    compile-time constant per output channel (times zx when zx is a runtime scalar), the last one a
    sum of the activation (per row, or per receptive field for a conv), only needed when the weight
    zero point could not be folded into W.
    `visit` maps expressions of the original function (runtime scales, zero points) to the new one; `emit` binds
    an expression (the conv's input: the integer conv then keeps the ONNX node's span, which normalizing a call
    with nested arguments drops; a pass that splits the conv names its node with it).
    """
    shift = _SHIFT.get((site.x_dtype, kernel_dtype), 0)
    if isinstance(site.x_zero_point, relax.Expr):
        zero_point = visit(site.x_zero_point)
        if str(zero_point.ty.dtype) != "int32":
            zero_point = relax.op.astype(zero_point, "int32")
        if shift:
            zero_point = relax.op.add(zero_point, relax.const(shift, "int32"))
    else:
        zero_point = site.x_zero_point + shift
    channels = _channel_shape(site)
    if site.op == "matmul":
        acc = relax.op.matmul(x_k, relax.const(site.weight, "int8"), out_dtype="int32")
    else:
        x_k, padding = _padded_input(site, x_k, zero_point)
        if not isinstance(x_k, relax.Var):
            x_k = emit(x_k)
        acc = with_span(_conv(site, x_k, site.weight, padding, int(site.call.attrs.groups)), site.call.span)
    weight_terms = site.weight_sums() - site.reduction_size * site.weight_zero_point
    if isinstance(zero_point, relax.Expr):
        acc = relax.op.subtract(acc, relax.op.multiply(zero_point, _int32_const(weight_terms, channels)))
    elif zero_point != 0 and weight_terms.any():
        acc = relax.op.subtract(acc, _int32_const(zero_point * weight_terms, channels))
    if site.weight_zero_point.any():
        if site.op == "matmul":
            input_sums = relax.op.sum(relax.op.astype(x_k, "int32"), axis=[-1], keepdims=True)
        else:
            input_sums = _window_sums(site, x_k, padding)
        acc = relax.op.subtract(acc, relax.op.multiply(input_sums, _int32_const(site.weight_zero_point, channels)))
    if site.x_scale is None:  # MatMulInteger: the int32 accumulator is the result
        return acc
    w_scale = site.w_scale.reshape(channels) if site.w_scale.ndim else site.w_scale
    if isinstance(site.x_scale, relax.Expr):
        scale = relax.op.multiply(visit(site.x_scale), relax.const(w_scale.astype(np.float32)))
    else:
        scale = relax.const((np.float32(site.x_scale) * w_scale).astype(np.float32))
    return relax.op.multiply(relax.op.astype(acc, "float32"), scale)


def lower_activation_product(site: ActivationProductSite, lhs: relax.Expr, rhs: relax.Expr,
                             kernel_dtype: str) -> relax.Expr:
    """Integer form of dequantize(a) @ dequantize(b) with `lhs` in `kernel_dtype` and `rhs` in int8.

    acc = Σ_k (a - za)(b - zb) = Σ_k a·b - zb·Σ_k a - za·Σ_k (b - zb): a row sum of a and a column
    sum of b at run time (each only when its zero point is non-zero; K may be symbolic, as in P·V).
    """
    lhs_zp = site.lhs_zero_point + _SHIFT.get((site.lhs_dtype, kernel_dtype), 0)
    rhs_zp = site.rhs_zero_point + _SHIFT.get((site.rhs_dtype, "int8"), 0)
    if site.rhs_axes is not None:
        rhs = relax.op.permute_dims(rhs, list(site.rhs_axes))
    acc = relax.op.matmul(lhs, rhs, out_dtype="int32")
    if rhs_zp:
        row_sums = relax.op.sum(relax.op.astype(lhs, "int32"), axis=[-1], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(row_sums, relax.const(rhs_zp, "int32")))
    if lhs_zp:
        rhs_centered = relax.op.astype(rhs, "int32")
        if rhs_zp:
            rhs_centered = relax.op.subtract(rhs_centered, relax.const(rhs_zp, "int32"))
        col_sums = relax.op.sum(rhs_centered, axis=[-2], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(col_sums, relax.const(lhs_zp, "int32")))
    scale = relax.const(np.float32(site.lhs_scale) * np.float32(site.rhs_scale), "float32")
    return relax.op.multiply(relax.op.astype(acc, "float32"), scale)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, activation_dtype):
        super().__init__(mod)
        self.mod_ = mod
        self.activation_dtype = activation_dtype
        self.var2val = {}
        self.shifted = {}  # (activation, dtype) -> var of its shifted copy, shared by all its sites

    def transform(self):
        for gvar, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function):
                continue
            self.var2val = relax.analysis.get_var2val(func)
            self.shifted = {}
            new_func = self.visit_expr(func)
            self.builder_.update_func(gvar, relax.analysis.remove_all_unused(new_func))
        return self.builder_.get()

    def _as_dtype(self, x_q: relax.Expr, x_dtype: str, dtype: str) -> relax.Expr:
        """`x_q` (of the original function) shifted to `dtype`; one shifted copy per tensor and dtype."""
        if dtype == x_dtype:
            return self.visit_expr(x_q)
        key = (x_q, dtype)
        if key not in self.shifted:
            producer = self.var2val.get(x_q) if isinstance(x_q, relax.Var) else None
            if producer is not None and op_name(producer) == "relax.quantize":
                producer = relax.Call(producer.op, [self.visit_expr(a) for a in producer.args], producer.attrs)
            shifted = _shift_activation(self.visit_expr(x_q), producer, x_dtype, dtype)
            self.shifted[key] = self.builder_.emit(shifted)
        return self.shifted[key]

    def visit_call_(self, call):
        site = match_site(call, self.var2val)
        if isinstance(site, QdqSite):
            kernel_dtype = self.activation_dtype or site.x_dtype
            x_k = self._as_dtype(site.x_q, site.x_dtype, kernel_dtype)
            return lower_site(site, x_k, kernel_dtype, self.visit_expr, self.builder_.emit)
        product = match_activation_product(call, self.var2val)
        if isinstance(product, ActivationProductSite):
            kernel_dtype = self.activation_dtype or product.lhs_dtype
            lhs = self._as_dtype(product.lhs_q, product.lhs_dtype, kernel_dtype)
            rhs = self._as_dtype(product.rhs_q, product.rhs_dtype, "int8")
            return lower_activation_product(product, lhs, rhs, kernel_dtype)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="nativeq.LowerQDQToInteger")
class LowerQDQToInteger:
    """Rewrite every matching dequantize -> matmul/conv site into an int32-accumulating integer op.

    activation_dtype: "uint8" (x86 VNNI), "int8" (ARM sdot/smull) or None (keep the model's).
    """

    def __init__(self, activation_dtype: str | None = None):
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {activation_dtype!r}")
        self.activation_dtype = activation_dtype

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod, self.activation_dtype).transform()
