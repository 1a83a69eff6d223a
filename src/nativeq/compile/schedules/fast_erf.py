"""Relax pass: float32 `erf` -> TOPI's vectorizable rational approximation (`fast_erf`).

Pipeline position: `kernel_relax_passes(target)`, before LegalizeOps. The GELU of a quantized
feed-forward layer sits in the int8 matmul's fused epilogue; legalized `erf` is a scalar libm
`erff` call per element, which keeps the whole epilogue scalar and dominated the benchmark
encoder (2.7 ms of a 0.3 ms int8 layer). `fast_erf` is a polynomial the vectorizer handles
(max abs error ~1e-7 on float32, well below one int8 quantization step). The replacement
PrimFunc is marked elementwise so FuseOps still fuses it into the epilogue.
"""

from __future__ import annotations

from nativeq.compile._tvm import relax, topi, tvm

_ELEMWISE = 0  # TVM OpPatternKind.kElemWise


@relax.expr_functor.mutator
class _FastErf(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.replaced = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.erf"):
            return call
        if call.args[0].ty.dtype != "float32":
            return call
        self.replaced += 1
        return self.builder_.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="fast_erf",
                                     primfunc_attrs={"op_pattern": _ELEMWISE})


@tvm.transform.module_pass(opt_level=0, name="nativeq.FastErf")
class FastErf:
    """Replace float32 `R.erf` by TOPI's `fast_erf` (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        mutator = _FastErf(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()
