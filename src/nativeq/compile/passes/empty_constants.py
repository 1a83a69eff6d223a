"""EmptyConstantsAsAllocations: a tensor constant with no elements becomes a run-time allocation.

Where it sits: after CallTIRRewrite (allocations are explicit `R.builtin.alloc_tensor` calls there), before
StaticPlanBlockMemory, at the end of the Relax pipeline: FoldConstant is the last pass that makes constants.

Why: TVM's executable stores every constant as a serialized tensor, and its loader refuses one whose first dim is
not 0 but which has no elements (a [1, 0] tensor: reading its 0 bytes "fails", "Invalid DLTensor file format"), so
such a library compiles and then cannot be loaded. Exporters make them from empty slices and concats of an empty
cache (Emformer without a memory bank quantizes a [1, 0] mask piece), and `verify`'s localization, which makes
every quantized tensor an output, met them. An empty tensor carries only its shape and dtype: allocating it costs
nothing and needs no bytes in the library.
"""

from __future__ import annotations

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions


def _is_empty_tensor_constant(expr) -> bool:
    if not isinstance(expr, tvm.ir.GenericConst) or not isinstance(expr.ty, relax.TensorType):
        return False
    return any(int(dim) == 0 for dim in expr.value.shape)


@relax.expr_functor.mutator
class _Allocator(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.replaced = 0

    def visit_generic_const_(self, op):
        if not _is_empty_tensor_constant(op):
            return op
        self.replaced += 1
        shape = relax.ShapeExpr([int(dim) for dim in op.value.shape])
        return self.builder_.emit(relax.op.builtin.alloc_tensor(shape, str(op.value.dtype), 0), name_hint="empty")


@tvm.transform.module_pass(opt_level=0, name="nativeq.EmptyConstantsAsAllocations")
class EmptyConstantsAsAllocations:
    """Replace every tensor constant with no elements by an allocation of its shape (see the module docstring)."""

    def __init__(self):
        self.replaced = 0

    def transform_module(self, mod, _ctx):
        allocator = _Allocator(mod)
        new_mod = rewrite_functions(allocator)
        self.replaced = allocator.replaced
        return new_mod
