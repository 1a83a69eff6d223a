"""The manifest's `memory` field: an upper bound of one call's memory, a polynomial in the symbolic sizes.

The bound is the sum of the sizes of every tensor the imported Relax `main` computes (each
binding's output, tuples included), as if none were ever freed: the VM's memory plan (which
reuses storage) is not exposed, and it allocates no more than that for the graph's tensors.
Each symbolic dim expression (`(T - 1) // 2 + 1`, `T * 4`, `min(1, T)`, ...) is bounded by a
linear form `a·T + c` in its one size variable, fitted by evaluation at large sizes (slope) and
at small ones (the intercept, rounded up so the form bounds every size it was checked at); the
tensor's bytes are then the product of its dims' forms. A size computed at run time (a Range's
length, a shape read from a tensor's values) is assumed at most the sum of the largest input-linear
dims (true of positional tables as long as the sequence, the case in the shipped Conformer). A dim
in two or more size variables, or one that is not linear, gives no bound (`memory` null: the
runtime does not check).

The polynomial's variables are the manifest's input dim names (the ONNX names, e.g. "T"), found
by matching the Relax function's parameter shapes to the ONNX inputs by position.
"""

from __future__ import annotations

import math
from collections import defaultdict

_LARGE = (1 << 20, 1 << 21, 1 << 22)
_SMALL = tuple(range(1, 65)) + (127, 128, 129, 1000, 4097)


class _NoBound(Exception):
    pass


def _linear(expr, tir, Analyzer) -> tuple[object, float, float]:
    """(var or None, slope, intercept) with expr <= slope*var + intercept at every size checked; _NoBound otherwise."""
    if isinstance(expr, tir.IntImm):
        return None, 0.0, float(expr.value)
    free = list(tir.analysis.undefined_vars(expr))
    if len(free) != 1:
        raise _NoBound
    var = free[0]

    def at(n: int) -> int:
        analyzer = Analyzer()
        analyzer.bind(var, tir.IntImm("int64", n))
        value = analyzer.simplify(expr)
        if not isinstance(value, tir.IntImm):
            raise _NoBound
        return int(value.value)

    a, b, c = (at(n) for n in _LARGE)
    slopes = ((b - a) / (_LARGE[1] - _LARGE[0]), (c - b) / (_LARGE[2] - _LARGE[1]))
    if abs(slopes[0] - slopes[1]) > 1e-6 * max(1.0, abs(slopes[1])):
        raise _NoBound  # not linear
    slope = max((c - a) / (_LARGE[2] - _LARGE[0]), 0.0)
    intercept = max(at(n) - slope * n for n in _SMALL + _LARGE)
    return var, slope, float(math.ceil(intercept))


def _dims(shape) -> list:
    if shape is None or not hasattr(shape, "values"):
        raise _NoBound
    return list(shape.values)


def _tensor_shapes(ty, relax):
    if isinstance(ty, relax.TensorType):
        yield ty
    elif isinstance(ty, relax.TupleType):
        for field in ty.fields:
            yield from _tensor_shapes(field, relax)


def _times(a: dict, b: dict) -> dict:
    out: dict[tuple, float] = defaultdict(float)
    for ka, ca in a.items():
        for kb, cb in b.items():
            if ca and cb:
                powers = dict(ka)
                for name, p in kb:
                    powers[name] = powers.get(name, 0) + p
                out[tuple(sorted(powers.items()))] += ca * cb
    return out


def memory_bound(mod, input_shapes: list[list]) -> dict | None:
    """The manifest's `memory` field for the imported module `mod` whose inputs have these ONNX shapes."""
    import numpy as np

    from nativeq.compile._tvm import Analyzer, relax
    from nativeq.compile._tvm import tirx as tir

    func = mod["main"]
    names: dict[str, str] = {}
    for param, onnx_shape in zip(func.params, input_shapes):
        shape = getattr(param.ty, "shape", None)
        if shape is None or onnx_shape is None or not hasattr(shape, "values"):
            continue
        for dim, onnx_dim in zip(shape.values, onnx_shape):
            if isinstance(dim, tir.Var) and isinstance(onnx_dim, str):
                names[dim.name] = onnx_dim
    try:
        tensors = [(str(ty.dtype), [_linear(dim, tir, Analyzer) for dim in _dims(getattr(ty, "shape", None))])
                   for block in func.body.blocks for binding in block.bindings
                   for ty in _tensor_shapes(binding.var.ty, relax)]
    except (_NoBound, TypeError, ValueError):
        return None
    # a size computed at run time (a Range's length, a shape read from a tensor): at most the sum over the
    # inputs' sizes of the largest dim linear in each, e.g. a positional table as long as the sequence
    largest: dict[str, tuple[float, float]] = {}
    for _, forms in tensors:
        for var, slope, intercept in forms:
            if var is not None and var.name in names:
                old = largest.get(names[var.name], (0.0, 0.0))
                largest[names[var.name]] = (max(old[0], slope), max(old[1], intercept))
    unknown = {(): sum(c for _, c in largest.values())}
    for name, (slope, _) in largest.items():
        unknown[((name, 1),)] = slope

    poly: dict[tuple, float] = defaultdict(float)
    for dtype, forms in tensors:
        itemsize = 1 if dtype in ("int4", "uint4", "bool") else np.dtype(dtype).itemsize
        term: dict[tuple, float] = {(): float(itemsize)}
        for var, slope, intercept in forms:
            if var is None:
                factor = {(): intercept}
            elif var.name in names:
                factor = {(): intercept, ((names[var.name], 1),): slope}
            else:
                factor = {key: coef * slope for key, coef in unknown.items()}
                factor[()] = factor.get((), 0.0) + intercept
            term = _times(term, factor)
        for key, coef in term.items():
            poly[key] += coef
    return {"method": "sum of intermediate tensors",
            "bytes": [{"coef": coef, "dims": dict(key)} for key, coef in sorted(poly.items()) if coef > 0]}
