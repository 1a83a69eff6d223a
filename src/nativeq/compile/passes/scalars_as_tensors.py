"""Legalization rules that pass an op's scalar constants (scales, zero points) to its kernel as tensors.

Pipeline position: entries of the `customize_legalize_map` of the pipeline's `LegalizeOps` (beside
`legalize_like_ort`). FuseTIR then emits one PrimFunc per distinct fused kernel: it adds each fused
function through `BlockBuilder.add_func`, which returns the existing GlobalVar for a structurally
equal PrimFunc.

TVM's own rules turn a 0-d constant operand of quantize, dequantize or an elementwise binary op into
an immediate of the generated PrimFunc. Every requantize then bakes its layer's scale and zero point
into its kernel, and identical layers (the Q, K and V projections; the blocks of an encoder) become
as many different kernels as there are layers. Here such a constant becomes a constant vector
argument instead, the scalar repeated along the other operand's last axis (a per-tensor quantize or
dequantize then reads it per channel of that axis), so after fusion those kernels are structurally
identical and one kernel serves all of them. Where the last axis has no static length the immediate
stays (e.g. attention scores [B, H, T, T]), and so it does where the last axis is longer than a channel axis
(`MAX_VECTOR`).

NOTE: a vector along the last axis, not a one-element tensor: with `c[0]` the encoder's quantize
loops compiled to scalar `vdivss` (1.1-1.8x slower kernels), while `c[i]` along the vectorized axis
stays a vector load, as per-channel scales already are.

On aarch64 targets the constants stay immediates (see `scalars_as_tensors`: no memory operands there).

The arithmetic is unchanged: a value read from memory is the same float32 or integer as the
immediate, and LLVM only rewrites an operation on an immediate when the result is exact (e.g. a
division by a power of two into a multiplication).
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, structural_equal, te, tirx, tvm
from nativeq.compile.passes.legalize_like_ort import rounded_multiply

_QDQ = ("relax.quantize", "relax.dequantize")
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")


def _scalar_constant(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value.numpy()
        if value.ndim == 0:
            return value
    return None


# The longest last axis a scalar is repeated along: a channel axis is; a flattened [1, 1, C x T] (GroupNorm with one
# group) is not: every element would load two values from two 2 MB vectors of one repeated scale and zero point.
MAX_VECTOR = 4096


def _static_extent(expr, axis: int) -> int | None:
    """The static extent of `expr`'s axis, when it is at most `MAX_VECTOR`."""
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not values:
        return None
    extent = values[axis % len(values)]
    return int(extent) if isinstance(extent, tirx.IntImm) and int(extent) <= MAX_VECTOR else None


def _as_vector(expr, length: int | None):
    """A 0-d constant repeated `length` times; anything else (or an unknown length) unchanged."""
    value = _scalar_constant(expr)
    if value is None or length is None:
        return expr
    return relax.const(np.full((length,), value, dtype=value.dtype), str(value.dtype))


def _tvm_rule(op_name: str):
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def is_power_of_two(value: np.ndarray) -> bool:
    """A positive float32 2^k (x / value is then exactly x * (1 / value))."""
    mantissa, _ = np.frexp(np.float32(value))
    return bool(value > 0 and mantissa == 0.5)


def _quantize_by_reciprocal(data, inverse_scale, zero_point, out_dtype: str):
    """TVM's quantize with `data * (1 / scale)` for `data / scale`: the same float when scale is 2^k.

    `zero_point` is a per-channel te tensor or a Python int (an immediate, as TVM's rule makes it)."""

    def compute(*index):
        channel = index[-1]
        scaled = data[index] * inverse_scale[channel]
        if isinstance(zero_point, int):
            rounded = te.round(scaled) + tirx.const(float(zero_point), "float32")
        else:
            rounded = te.round(scaled) + zero_point[channel]
        return te.max(te.min(rounded, tirx.max_value(out_dtype)), tirx.min_value(out_dtype)).astype(out_dtype)

    return te.compute(data.shape, compute, name="quantized")


def _qdq_rule(op_name: str, repeat: bool):
    tvm_rule = _tvm_rule(op_name)

    def legalize(bb, call):
        x, scale, zero_point = call.args
        scale_value, zero_point_value = _scalar_constant(scale), _scalar_constant(zero_point)
        if not repeat or scale_value is None or zero_point_value is None:
            return tvm_rule(bb, call)
        # a per-tensor scale applies to every axis: repeat it along the last one (the vectorized loop)
        length = _static_extent(x, -1)
        if length is None:
            return tvm_rule(bb, call)
        # a zero point of 0 (symmetric quantization: every layer alike) stays an immediate
        zero = int(zero_point_value) == 0
        # NOTE: as float32 (exact for 8-bit values): the kernel adds it without an int -> float conversion
        zero_points = zero_point if zero else relax.const(np.full((length,), zero_point_value, np.float32))
        if op_name == "relax.quantize" and is_power_of_two(scale_value) and x.ty.dtype == "float32":
            # NOTE: LLVM turns a division by an immediate 2^k into a multiplication, not one by a value
            # loaded from memory (measured: the QAT model's int8 kernels 10% slower); multiply here.
            inverse = relax.const(np.full((length,), np.float32(1.0) / scale_value, np.float32))
            return bb.call_te(_quantize_by_reciprocal, x, inverse, 0 if zero else zero_points,
                              str(call.attrs.out_dtype), primfunc_name_hint="quantize")
        make = relax.op.quantize if op_name == "relax.quantize" else relax.op.dequantize
        return tvm_rule(bb, make(x, _as_vector(scale, length), zero_points, -1, call.attrs.out_dtype))

    return legalize


def _binary_rule(op_name: str, repeat: bool):
    tvm_rule = _tvm_rule(op_name)

    def legalize(bb, call):
        lhs, rhs = call.args
        lhs_value, rhs_value = _scalar_constant(lhs), _scalar_constant(rhs)
        if not repeat or (lhs_value is None) == (rhs_value is None):  # no scalar constant, or two
            return rule(bb, call)
        scalar, tensor = (lhs_value, rhs) if lhs_value is not None else (rhs_value, lhs)
        if scalar.dtype.kind != "f" and op_name != "relax.multiply":
            # integer shifts (the +128 of a uint8 -> int8 move) are alike in every layer: keep the immediate;
            # integer products (zero point x row sum) differ per layer and become vectors
            return tvm_rule(bb, call)
        length = _static_extent(tensor, -1)
        args = [_as_vector(lhs, length), _as_vector(rhs, length)]
        return rule(bb, relax.Call(call.op, args, call.attrs, call.ty_args))

    def rule(bb, call):
        lhs, rhs = call.args
        if (op_name == "relax.multiply" and lhs.ty.dtype in ("float16", "float32", "float64")
                and not isinstance(lhs, tvm.ir.GenericConst) and not isinstance(rhs, tvm.ir.GenericConst)):
            # a product of two computed tensors (e.g. rotary's k * cos): rounded on its own, as ORT does.
            # Products with a constant (scales, LayerNorm weights) keep TVM's rule, so the int8 kernels'
            # epilogues and their tuning records are unchanged.
            same_shape = structural_equal(lhs.ty.shape, rhs.ty.shape)
            return bb.call_te(rounded_multiply, lhs, rhs, primfunc_name_hint="multiply",
                              primfunc_attrs={"op_pattern": 0 if same_shape else 1})  # elementwise / broadcast
        return tvm_rule(bb, call)

    return legalize


def scalars_as_tensors(target=None) -> dict:
    """`LegalizeOps(customize_legalize_map=...)` entries: op name -> legalization function.

    On an aarch64 target the scalars stay immediates (products of two computed tensors are still rounded on their
    own): AArch64 has no memory operands, so a per-channel vector costs a load instruction per use in every
    elementwise loop, where LLVM materializes an immediate once, outside the loop (the Pi 5's elementwise kernels
    of ECAPA-TDNN and the Conformer: 22% and 40% fewer instructions), and x86 folds the load into the arithmetic."""
    repeat = target is None or target.arch != "aarch64"
    rules = {name: _qdq_rule(name, repeat) for name in _QDQ}
    rules.update({name: _binary_rule(name, repeat) for name in _BINARY})
    return rules
