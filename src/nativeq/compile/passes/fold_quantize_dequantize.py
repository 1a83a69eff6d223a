"""FoldQuantizeDequantize: dequantize(quantize(x)) with one scale becomes a float clip of round(x / s).

Where it sits: last of the int8 passes (after LutElementwise, which consumes quantize/dequantize
chains of its own), before the kernel layout passes. It is the mirror of FoldDequantizeQuantize.

A QDQ graph rounds every intermediate result to 8 bits and reads it straight back as float when
the next op is a float op, e.g. the bias of a Linear that `quantize_static` left beside its MatMul:

    q = R.quantize(acc_scaled, s, z, out_dtype="uint8")   # round, add z, clip, narrow
    y = R.add(R.dequantize(q, s, z), bias)                # widen, subtract z, scale
becomes
    r = R.maximum(R.minimum(R.round(R.divide(acc_scaled, s)), qmax - z), qmin - z)
    y = R.add(R.multiply(r, s), bias)

Exact: with r = round(x / s), quantize gives q = clip(r + z, qmin, qmax) and dequantize gives
(q - z) * s. Where |r| < 2^24 - 2^16 the float r + z is exact, so q - z = clip(r, qmin - z, qmax - z)
as the same integer-valued float; larger |r| (and infinities) clip to the same bound either way.
The product with s is then the same float32 multiplication. Inside a fused epilogue the integer
round trip (add z, clamp, convert, narrow, widen, convert back, subtract z) was six instructions
per vector that this drops.

Only inside a function's dataflow (not for a value it returns), where q has no other reader (else
the integer tensor is materialized anyway), for per-tensor scale and zero point known at compile
time and 8/16-bit integer types.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions, use_counts
from nativeq.compile.passes.fold_dequantize_quantize import INTEGER_DTYPES
from nativeq.compile.passes.qdq_sites import op_name, resolve, static_scalar
from nativeq.compile.passes.scalars_as_tensors import is_power_of_two

def rounded_in_float(emit, x, scale: np.ndarray, zero_point: int, dtype: str):
    """clip(round(x / scale), qmin - z, qmax - z) * scale: dequantize(quantize(x)) without the integers.

    emit(expr) binds one call and returns its var (a block builder's `emit`); the result is the last call, unbound."""
    info = np.iinfo(dtype)
    scale = np.float32(scale)
    # NOTE: x * 2^-k is x / 2^k exactly; a multiplication stays one (a division by a loaded value does not)
    scaled = emit(relax.op.multiply(x, relax.const(np.float32(1.0) / scale, "float32")) if is_power_of_two(scale)
                  else relax.op.divide(x, relax.const(scale, "float32")))
    rounded = emit(relax.op.round(scaled))
    upper = relax.const(np.float32(int(info.max) - zero_point), "float32")
    lower = relax.const(np.float32(int(info.min) - zero_point), "float32")
    clipped = emit(relax.op.maximum(emit(relax.op.minimum(rounded, upper)), lower))
    return relax.op.multiply(clipped, relax.const(scale, "float32"))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.folded = 0

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)
        self.uses = use_counts(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def _match(self, call):
        """(x, scale, zero point, integer dtype) if `call` is dequantize(quantize(x)) with one scale and zero point."""
        q = call.args[0]
        quantize = resolve(q, self.var2val)
        if op_name(quantize) != "relax.quantize" or self.uses.get(q, 0) != 1:
            return None
        dtype = str(quantize.ty.dtype)
        x = quantize.args[0]
        if dtype not in INTEGER_DTYPES or str(x.ty.dtype) != "float32":
            return None
        if isinstance(resolve(x, self.var2val), tvm.ir.GenericConst):  # a quantized constant: FoldConstant folds it
            return None
        scale1, zero1 = static_scalar(quantize.args[1], self.var2val), static_scalar(quantize.args[2], self.var2val)
        scale2, zero2 = static_scalar(call.args[1], self.var2val), static_scalar(call.args[2], self.var2val)
        if any(v is None for v in (scale1, zero1, scale2, zero2)):
            return None
        if np.float32(scale1).tobytes() != np.float32(scale2).tobytes() or int(zero1) != int(zero2):
            return None
        if not (np.isfinite(np.float32(scale1)) and np.float32(scale1) > 0):
            return None
        return x, scale1, int(zero1), dtype

    def visit_var_binding_(self, binding):
        # NOTE: only inside the graph: a value the function returns keeps dequantize's +0.0 where
        # round(x / s) is -0.0 (the float form would return -0.0, equal but not the same bits)
        value = binding.value
        matched = None
        if isinstance(binding.var, relax.DataflowVar) and op_name(value) == "relax.dequantize" \
                and str(value.ty.dtype) == "float32":
            matched = self._match(value)
        if matched is None:
            return super().visit_var_binding_(binding)
        x, scale, zero_point, dtype = matched
        self.folded += 1
        folded = rounded_in_float(self.builder_.emit, self.visit_expr(x), scale, zero_point, dtype)
        self.set_var_remap(binding.var, self.builder_.emit(folded, name_hint=str(binding.var.name)))


@tvm.transform.module_pass(opt_level=0, name="nativeq.FoldQuantizeDequantize")
class FoldQuantizeDequantize:
    """Replace dequantize(quantize(x)) with one per-tensor scale and zero point by its float equivalent."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).transform()
