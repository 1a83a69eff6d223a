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
stays (e.g. attention scores [B, H, T, T]).

NOTE: a vector along the last axis, not a one-element tensor: with `c[0]` the encoder's quantize
loops compiled to scalar `vdivss` (1.1-1.8x slower kernels), while `c[i]` along the vectorized axis
stays a vector load, as per-channel scales already are.

The arithmetic is unchanged: a value read from memory is the same float32 or integer as the
immediate, and LLVM only rewrites an operation on an immediate when the result is exact (e.g. a
division by a power of two into a multiplication).
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tirx, tvm

_QDQ = ("relax.quantize", "relax.dequantize")
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")


def _scalar_constant(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value.numpy()
        if value.ndim == 0:
            return value
    return None


def _static_extent(expr, axis: int) -> int | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not values:
        return None
    extent = values[axis % len(values)]
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _as_vector(expr, length: int | None):
    """A 0-d constant repeated `length` times; anything else (or an unknown length) unchanged."""
    value = _scalar_constant(expr)
    if value is None or length is None:
        return expr
    return relax.const(np.full((length,), value, dtype=value.dtype), str(value.dtype))


def _tvm_rule(op_name: str):
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _qdq_rule(op_name: str):
    tvm_rule = _tvm_rule(op_name)

    def legalize(bb, call):
        x, scale, zero_point = call.args
        if _scalar_constant(scale) is None or _scalar_constant(zero_point) is None:
            return tvm_rule(bb, call)
        # a per-tensor scale applies to every axis: repeat it along the last one (the vectorized loop)
        length = _static_extent(x, -1)
        if length is None:
            return tvm_rule(bb, call)
        make = relax.op.quantize if op_name == "relax.quantize" else relax.op.dequantize
        vector_call = make(x, _as_vector(scale, length), _as_vector(zero_point, length), -1, call.attrs.out_dtype)
        return tvm_rule(bb, vector_call)

    return legalize


def _binary_rule(op_name: str):
    tvm_rule = _tvm_rule(op_name)

    def legalize(bb, call):
        lhs, rhs = call.args
        if (_scalar_constant(lhs) is None) == (_scalar_constant(rhs) is None):
            return tvm_rule(bb, call)
        tensor = rhs if _scalar_constant(lhs) is not None else lhs
        length = _static_extent(tensor, -1)
        args = [_as_vector(lhs, length), _as_vector(rhs, length)]
        return tvm_rule(bb, relax.Call(call.op, args, call.attrs, call.ty_args))

    return legalize


def scalars_as_tensors() -> dict:
    """`LegalizeOps(customize_legalize_map=...)` entries: op name -> legalization function."""
    rules = {name: _qdq_rule(name) for name in _QDQ}
    rules.update({name: _binary_rule(name) for name in _BINARY})
    return rules
