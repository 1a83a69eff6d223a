"""Relax passes of nativeq's compile pipeline, one pass per file."""


def rewrite_functions(mutator) -> "object":
    """Run a `relax.PyExprMutator` over every Relax function of the module it was built on; the new module."""
    from nativeq.compile._tvm import relax

    for gvar, func in list(mutator.builder_.get().functions_items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def use_counts(func) -> dict:
    """Relax Var -> how many times the body of `func` reads it."""
    from nativeq.compile._tvm import relax

    counts: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts
