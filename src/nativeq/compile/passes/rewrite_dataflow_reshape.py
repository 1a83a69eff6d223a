"""RewriteDataflowReshape: TVM's pass of that name, with kernels its reshape analysis cannot decide left as kernels.

Where it sits: first of the dataflow lowering, right after the schedules (in place of
`relax.transform.RewriteDataflowReshape`). A `call_tir` of a kernel that only moves a contiguous tensor into another
shape becomes `R.reshape`, which the VM runs as a view of the same storage; TVM's conditions, written as in
`src/relax/transform/rewrite_dataflow_reshape.cc`: inside a dataflow block, bound to a dataflow var, the kernel has a
reshape pattern (`relax.analysis.has_reshape_pattern`) and reads one argument of the same dtype and element count.

TVM's analysis aborts the whole compile on some scheduled kernels with symbolic sizes instead of answering "no"
(`CanProveDivisible` on the padding factor of a fused loop: a transpose [1, 2T - 1, 4, 36] -> [1, 4, 36, 2T - 1]
whose three static axes the elementwise schedule fused, in a relative-position attention). Such a kernel is not
a reshape: here it stays the kernel it is.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, relax, tirx, tvm
from nativeq.compile.passes import dims_product, rewrite_functions


def is_reshape_kernel(func) -> bool:
    """`relax.analysis.has_reshape_pattern(func)`, False where the analysis fails."""
    try:
        return bool(relax.analysis.has_reshape_pattern(func))
    except tvm.error.InternalError:
        return False


def _read_tensors(func, args) -> list:
    """The tensor arguments of a `call_tir` of `func` its body reads (scalar arguments, symbolic sizes passed in,
    are not data)."""
    free = tirx.analysis.undefined_vars(func.body, [])
    return [arg for arg, param in zip(args, func.params)
            if isinstance(arg.ty, relax.TensorType) and any(var.same_as(param) for var in free)]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod
        self.reshape_kernels: dict = {}
        self.rewritten = 0
        self.in_dataflow = False

    def _is_reshape_kernel(self, gvar) -> bool:
        if gvar not in self.reshape_kernels:
            func = self.mod[gvar]
            self.reshape_kernels[gvar] = isinstance(func, tirx.PrimFunc) and is_reshape_kernel(func)
        return self.reshape_kernels[gvar]

    def _as_reshape(self, call):
        """`R.reshape(arg, shape)` for a `call_tir` of a reshape kernel, else None."""
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return None
        gvar, args = call.args[0], call.args[1]
        if not isinstance(args, relax.Tuple) or not self._is_reshape_kernel(gvar):
            return None
        read = _read_tensors(self.mod[gvar], args.fields)
        if len(read) != 1:
            return None
        arg = read[0]
        arg_ty, out_ty = arg.ty, call.ty  # the argument is a tensor (`_read_tensors`)
        if not isinstance(out_ty, relax.TensorType):
            return None
        if arg_ty.dtype != out_ty.dtype or arg_ty.shape is None or out_ty.shape is None:
            return None
        if not hasattr(arg_ty.shape, "values") or not hasattr(out_ty.shape, "values"):
            return None
        if not Analyzer().can_prove_equal(dims_product(arg_ty.shape.values), dims_product(out_ty.shape.values)):
            return None
        return relax.op.reshape(arg, out_ty.shape)

    def visit_dataflow_block_(self, block):
        self.in_dataflow = True
        try:
            return super().visit_dataflow_block_(block)
        finally:
            self.in_dataflow = False

    def visit_var_binding_(self, binding):
        if not (self.in_dataflow and isinstance(binding.var, relax.DataflowVar)):
            return super().visit_var_binding_(binding)  # TVM's conditions: only dataflow vars of dataflow blocks
        value = self.visit_expr(binding.value)
        reshape = self._as_reshape(value)
        if reshape is not None:
            value = reshape
            self.rewritten += 1
        self.set_var_remap(binding.var, self.builder_.emit(value, name_hint=str(binding.var.name)))
        return None


@tvm.transform.module_pass(opt_level=0, name="nativeq.RewriteDataflowReshape")
class RewriteDataflowReshape:
    """Turn calls of reshape kernels into `R.reshape` views (see the module docstring)."""

    def __init__(self):
        self.rewritten = 0

    def transform_module(self, mod, _ctx):
        rewriter = _Rewriter(mod)
        new_mod = rewrite_functions(rewriter)
        self.rewritten = rewriter.rewritten
        return new_mod
