"""FoldDequantizeQuantize: quantize(layout(dequantize(q))) with one scale becomes layout(q), in integers.

Where it sits: among the int8 passes, after LowerQDQToInteger and FoldBiasIntoAccumulator (it
works on what they leave as float QDQ), before LutElementwise.

QDQ exporters (ONNX Runtime's `quantize_static`) wrap every op in DequantizeLinear/QuantizeLinear,
data movement included, so an 8-bit activation crosses each reshape, transpose and slice as float:

    x  = R.dequantize(q, s, z1)                 # uint8 -> float32
    y  = R.permute_dims(R.reshape(x, ...), ...) # float32 moved around
    q2 = R.quantize(y, s, z2, out_dtype=dt2)    # float32 -> 8 bits, same scale s

With the same scale the float round trip is exact: (q - z1) * s / s rounds back to q - z1 (the
relative error of the two float32 roundings is far below 1/2 for |q - z1| < 2^22), so

    q2 = permute_dims(reshape(q))                            # z1 == z2 and the same dtype
    q2 = astype(clip(astype(...(q), "int32") + z2 - z1, dt2))  # otherwise (e.g. uint8 -> int8)

The move then runs on 8-bit data (a quarter of the bytes) and the kernels around it lose a
dequantize, a divide and a round. Only per-tensor scales and zero points known at compile time.

A max (MaxPool, ReduceMax) commutes with dequantize too when the scale is positive: the largest of
(q - z) * s is (max(q) - z) * s, and a max pool's padding (-inf in float, the dtype's minimum in
integers) never wins a window that holds an element. So DequantizeLinear -> MaxPool -> QuantizeLinear
runs as an 8-bit max pool (ONNX Runtime's QDQ MaxPool does the same).
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.passes.qdq_sites import op_name, resolve, static_scalar

LAYOUT_OPS = {"relax.reshape", "relax.permute_dims", "relax.strided_slice", "relax.squeeze",
              "relax.expand_dims", "relax.flatten"}
# Ops that commute with dequantize for a positive scale: max(s * (q - z)) = s * (max(q) - z).
ORDER_PRESERVING_OPS = {"relax.nn.max_pool1d", "relax.nn.max_pool2d", "relax.nn.max_pool3d", "relax.max"}
INTEGER_DTYPES = ("int8", "uint8", "int16", "uint16")


def _round_trip_exact(scale1, scale2) -> bool:
    """One float32 scale, normal, and (q - z) * scale finite for every 16-bit q - z."""
    s1, s2 = np.float32(scale1), np.float32(scale2)
    return (s1.tobytes() == s2.tobytes() and np.isfinite(s1) and abs(s1) >= np.finfo(np.float32).tiny
            and np.isfinite(np.float32(abs(s1) * np.float32(65536))))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.folded = 0

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def _match(self, call):
        """(q, layout / max calls outermost first, z1, z2) if `call` is quantize(layout(dequantize(q))) with one
        scale (positive if a max is among the calls)."""
        scale2, zero2 = static_scalar(call.args[1], self.var2val), static_scalar(call.args[2], self.var2val)
        if scale2 is None or zero2 is None:
            return None
        layout, value = [], resolve(call.args[0], self.var2val)
        while op_name(value) in LAYOUT_OPS | ORDER_PRESERVING_OPS:
            layout.append(value)
            value = resolve(value.args[0], self.var2val)
        if any(op_name(move) in ORDER_PRESERVING_OPS for move in layout) and not scale2 > 0:
            return None
        if op_name(value) != "relax.dequantize" or str(value.ty.dtype) != "float32":
            return None
        q = value.args[0]
        scale1, zero1 = static_scalar(value.args[1], self.var2val), static_scalar(value.args[2], self.var2val)
        if scale1 is None or zero1 is None or str(q.ty.dtype) not in INTEGER_DTYPES:
            return None
        if not _round_trip_exact(scale1, scale2):
            return None
        return q, layout, int(zero1), int(zero2)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if op_name(call) != "relax.quantize" or str(call.ty.dtype) not in INTEGER_DTYPES:
            return call
        matched = self._match(call)
        if matched is None:
            return call
        q, layout, zero1, zero2 = matched
        out = self.visit_expr(q)
        for move in reversed(layout):  # innermost first, on the integer tensor
            out = self.builder_.normalize(relax.Call(move.op, [out, *move.args[1:]], move.attrs, move.ty_args))
        dtype = str(call.ty.dtype)
        if zero1 != zero2 or str(q.ty.dtype) != dtype:
            info = np.iinfo(dtype)
            shifted = relax.op.add(relax.op.astype(out, "int32"), relax.const(zero2 - zero1, "int32"))
            out = relax.op.astype(relax.op.clip(shifted, int(info.min), int(info.max)), dtype)
        self.folded += 1
        return out


@tvm.transform.module_pass(opt_level=0, name="nativeq.FoldDequantizeQuantize")
class FoldDequantizeQuantize:
    """Replace quantize(layout(dequantize(q))) with the same per-tensor scale by the layout ops on q (max pools
    and reductions too, for a positive scale)."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).transform()
