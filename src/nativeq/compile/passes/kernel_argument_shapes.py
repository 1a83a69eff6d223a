"""KernelArgumentShapes: a kernel argument whose size is spelled otherwise than the kernel's parameter gets the
parameter's spelling (a `match_cast`), so FuseTIR can match them.

Pipeline position: right after LegalizeOps (and `RepackAfterLegalize`), before FuseOps / FuseTIR. The kernels
nativeq builds before legalization (`call_te`: depthwise and packed matmuls, the channels-last layouts) take the
sizes of their operands as Relax spelled them then; legalization re-derives the operands' sizes through TE, which
may spell the same size otherwise: a cache [1, C, 4] concatenated before a chunk [1, C, T] is `4 + T` to Relax's
concat and `T + 4` to the legalized one. FuseTIR matches a kernel's parameter sizes to its arguments' term by
term and fails on such a pair ("expected an integer argument with value 4, but was provided with the argument
T"). The kernel's own size variables are bound to the sizes they stand for (a parameter or output size that is a
variable alone); the cast is inserted where the parameter's sizes, so written, are provably the argument's. It
is a shape check the VM runs, not a copy.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, relax, structural_equal, tirx, tvm
from nativeq.compile.passes import rewrite_functions


_BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max)


def _substituted(expr, bound: list):
    """`expr` (a size) with the kernel's variables replaced by the argument sizes they are bound to, term by term;
    None for a variable not bound or a node other than an integer, a variable or integer arithmetic."""
    if isinstance(expr, tirx.IntImm):
        return expr
    if isinstance(expr, tirx.Var):
        return next((value for var, value in bound if var.same_as(expr)), None)
    if isinstance(expr, _BINARY):
        a, b = _substituted(expr.a, bound), _substituted(expr.b, bound)
        return None if a is None or b is None else type(expr)(a, b)
    return None


def _shape(ty) -> list | None:
    shape = getattr(ty, "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def _bindings(kernel, shapes: list) -> list:
    """(kernel variable, size) for every parameter size of `kernel` that is a variable alone, `shapes` the sizes
    of its arguments then its outputs, in parameter order."""
    bound = []
    for param, shape in zip(kernel.params, shapes):
        param_shape = getattr(param, "shape", None)
        if shape is None or param_shape is None or len(param_shape) != len(shape):
            continue
        bound += [(p, a) for p, a in zip(param_shape, shape)
                  if isinstance(p, tirx.Var) and not any(p.same_as(v) for v, _ in bound)]
    return bound


def _respelled(arg_shape, param_shape, bound):
    """The parameter's shape in the argument's variables if it spells the argument's sizes otherwise, else None."""
    if len(arg_shape) != len(param_shape):
        return None
    spelled = [_substituted(p, bound) for p in param_shape]
    if any(s is None for s in spelled) or all(structural_equal(a, s) for a, s in zip(arg_shape, spelled)):
        return None
    analyzer = Analyzer()
    return spelled if all(analyzer.can_prove_equal(a, s) for a, s in zip(arg_shape, spelled)) else None


@relax.expr_functor.mutator
class _Respeller(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod
        self.cast = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", "") != "relax.call_tir":
            return call
        kernel = self.mod[call.args[0]]
        args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else None
        if not isinstance(kernel, tvm.tirx.PrimFunc) or args is None:
            return call
        outputs = call.ty.fields if isinstance(call.ty, relax.TupleType) else [call.ty]
        arg_shapes = [_shape(getattr(arg, "ty", None)) for arg in args]
        bound = _bindings(kernel, arg_shapes + [_shape(ty) for ty in outputs])
        new_args = []
        for arg, param, shape in zip(args, kernel.params, arg_shapes):
            param_shape = getattr(param, "shape", None)
            respelled = None
            if isinstance(arg, relax.Var) and shape is not None and param_shape is not None:
                respelled = _respelled(shape, list(param_shape), bound)
            if respelled is None:
                new_args.append(arg)
                continue
            new_args.append(self.builder_.match_cast(arg, relax.TensorType(respelled, arg.ty.dtype)))
            self.cast += 1
        if all(a.same_as(b) for a, b in zip(new_args, args)):
            return call
        return relax.Call(call.op, [call.args[0], relax.Tuple(new_args), *call.args[2:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="nativeq.KernelArgumentShapes")
class KernelArgumentShapes:
    """Respell kernel arguments' sizes as the kernels' parameters spell them (see the module docstring)."""

    def __init__(self):
        self.cast = 0

    def transform_module(self, mod, _ctx):
        respeller = _Respeller(mod)
        new_mod = rewrite_functions(respeller)
        self.cast = respeller.cast
        return new_mod
