"""Relax passes of nativeq's compile pipeline, one pass per file."""


def rewrite_functions(mutator, prepare=None, remove_unused: bool = False) -> "object":
    """Run a `relax.PyExprMutator` over every Relax function of the module it was built on; the new module.

    prepare(func): called before each function is visited (e.g. to analyse its bindings);
    remove_unused: drop the bindings the rewrite left unused.
    """
    from nativeq.compile._tvm import relax

    for gvar, func in list(mutator.builder_.get().functions_items()):
        if isinstance(func, relax.Function):
            if prepare is not None:
                prepare(func)
            new_func = mutator.visit_expr(func)
            mutator.builder_.update_func(gvar, relax.analysis.remove_all_unused(new_func) if remove_unused else new_func)
    return mutator.builder_.get()


def dims_product(dims):
    """The product of tensor dims (ints or PrimExprs) as an int64 PrimExpr: an element count."""
    import functools
    import operator

    from nativeq.compile._tvm import tirx

    return functools.reduce(operator.mul, dims, tirx.IntImm("int64", 1))


def use_counts(func) -> dict:
    """Relax Var -> how many times the body of `func` reads it."""
    from nativeq.compile._tvm import relax

    counts: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def result_dtype(call) -> str:
    """The dtype a matmul/conv call produces: its `out_dtype` attribute, or, when that is unset (TVM prints
    it as None or void: a float op), its first operand's."""
    out_dtype = str(call.attrs.out_dtype)
    return str(call.args[0].ty.dtype) if out_dtype in ("", "void", "None") else out_dtype
