"""SoftmaxReadsIntegers: softmax(dequantize(q)) becomes one softmax kernel that reads the integers q.

Where it sits: among the int8 passes, after LutElementwise and before FoldQuantizeDequantize
(which would otherwise turn the quantize -> dequantize pair in front of the softmax into a float
clip and keep the tensor between the two kernels float).

Attention in a QDQ model rounds its scores to 8 bits and reads them back as float for the softmax:

    q = R.quantize(scores, s, z, out_dtype="uint8")   # the Q.K^T matmul's epilogue
    p = R.nn.softmax(R.dequantize(q, s, z), axis=-1)  # a kernel of its own (a row reduction)

FuseOps gives the dequantize to the matmul's epilogue (the softmax starts a new kernel), so the
scores crossed memory as float32: heads x T x T x 4 bytes, 4 MB per layer at T = 1000 for 4 heads.
Here the softmax is legalized with the dequantize as its prologue (compile/passes/legalize_like_ort.py,
`_mlas_softmax(..., dequantize=(s, z))`): the matmul writes 1-byte integers, the softmax reads them and
dequantizes each element exactly as relax.dequantize does, float(q - z) * s, and takes the row maximum
over the integers (the same maximum: the dequantized value is monotone in q for s > 0). The result is
bit-identical to the float chain.

Only for float32 (log-)softmax whose input is a dequantize with a per-tensor scale and zero point known
at compile time, a positive finite scale, an 8- or 16-bit integer input, and no other reader.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions, use_counts
from nativeq.compile.passes.fold_dequantize_quantize import INTEGER_DTYPES
from nativeq.compile.passes.legalize_like_ort import call_mlas_softmax
from nativeq.compile.passes.qdq_sites import op_name, resolve, static_scalar

_SOFTMAX_OPS = {"relax.nn.softmax": False, "relax.nn.log_softmax": True}  # op -> log


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)
        self.uses = use_counts(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def _match(self, x):
        """(q, scale, zero point) if `x` is dequantize(q) read only by the softmax, else None."""
        dequantize = resolve(x, self.var2val)
        if op_name(dequantize) != "relax.dequantize" or self.uses.get(x, 0) != 1:
            return None
        q = dequantize.args[0]
        if str(q.ty.dtype) not in INTEGER_DTYPES or str(dequantize.ty.dtype) != "float32":
            return None
        scale = static_scalar(dequantize.args[1], self.var2val)
        zero_point = static_scalar(dequantize.args[2], self.var2val)
        if scale is None or zero_point is None:
            return None
        scale = np.float32(scale)
        if not (np.isfinite(scale) and scale > 0):
            return None
        return q, float(scale), int(zero_point)

    def visit_var_binding_(self, binding):
        value = binding.value
        log = _SOFTMAX_OPS.get(op_name(value))
        matched = None
        if log is not None and str(value.ty.dtype) == "float32":
            matched = self._match(value.args[0])
        if matched is None:
            return super().visit_var_binding_(binding)
        q, scale, zero_point = matched
        self.rewritten += 1
        call = call_mlas_softmax(self.builder_, self.visit_expr(q), int(value.attrs.axis), log, (scale, zero_point))
        self.set_var_remap(binding.var, self.builder_.emit(call, name_hint=str(binding.var.name)))


@tvm.transform.module_pass(opt_level=0, name="nativeq.SoftmaxReadsIntegers")
class SoftmaxReadsIntegers:
    """Legalize softmax(dequantize(q)) with one static scale as a softmax kernel reading q."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).transform()
