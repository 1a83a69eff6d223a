"""ONNX `Einsum` of two operands -> Relax `permute_dims` / `reshape` / `matmul`.

Pipeline position: a converter of the ONNX import (`onnx_import._CONVERTER_FIXES`). TVM 0.27's
converter emits `topi.einsum` as one opaque TE kernel, which no nativeq schedule recognizes: an
attention written with `torch.einsum` ("bhid,bhjd->bhij") ran its products on the generic path,
one scalar dot product per output. Written as a batched matmul it is the same contraction that
the float (or int8) matmul schedules and the run-time operand packing already take.

Each letter of a two-operand equation is one of:

| letter in      | role     | placed                                   |
|----------------|----------|------------------------------------------|
| A, B, output   | batch    | leading axes of both operands            |
| A, B           | contract | A's last axis, B's second-to-last (K)    |
| A, output      | A free   | A's rows (M)                             |
| B, output      | B free   | B's columns (N)                          |
| A only / B only| summed   | `sum` over it first                      |

A is permuted to [batch, A free, contract] and B to [batch, contract, B free]; groups of more
than one letter are merged by a reshape (sizes may be symbolic), an empty group is a unit axis.
The matmul's [batch, M, N] is reshaped back to [batch, A free, B free] and permuted to the
output's order. ONNX's ellipsis ("...") stands for the leading axes an operand's letters do
not name, right-aligned across operands as numpy broadcasts them; in implicit mode (no "->") the
output is the ellipsis then the letters used once, in alphabetical order.

Every product and sum is the einsum's own (each output adds the same K products; only their
order differs, as between any two float engines). Left to TVM's converter: one or three or more
operands, a letter repeated within a term (a diagonal or trace), a batch letter whose sizes
differ between the operands, and operands of unknown rank.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, onnx_frontend, relax

_ELLIPSIS = "..."
# Letters for the axes an ellipsis stands for: upper case ones an equation's own letters may use are skipped.
_ELLIPSIS_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Einsum(onnx_frontend.Einsum):
    """TVM's converter, with two-operand contractions as a batched matmul (see the module docstring)."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        equation = attr["equation"].decode("utf-8") if isinstance(attr["equation"], bytes) else attr["equation"]
        if len(inputs) == 2:
            result = einsum_as_matmul(bb, inputs[0], inputs[1], equation)
            if result is not None:
                return result
        return super()._impl_v12(bb, inputs, attr, params)


def _shape(expr) -> list | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    return list(shape.values)


def parse_equation(equation: str, ranks: tuple[int, ...]) -> tuple[list[str], ...] | None:
    """The letters of each operand's term and of the output, one letter per axis, or None when the
    equation repeats a letter within a term or does not match the ranks."""
    equation = equation.replace(" ", "")
    inputs_text, arrow, output_text = equation.partition("->")
    terms = inputs_text.split(",")
    if len(terms) != len(ranks):
        return None
    used = set(equation) - set(",->.")
    spare = [c for c in _ELLIPSIS_LETTERS if c not in used]
    widths = []
    for term, rank in zip(terms, ranks):
        named = len(term.replace(_ELLIPSIS, ""))
        if term.count(_ELLIPSIS) > 1 or (_ELLIPSIS not in term and named != rank) or named > rank:
            return None
        widths.append(rank - named if _ELLIPSIS in term else 0)
    width = max(widths)
    if width > len(spare):
        return None
    ellipsis = spare[:width]
    parsed = []
    for term, term_width in zip(terms, widths):
        before, _, after = term.partition(_ELLIPSIS)
        letters = list(before) + (ellipsis[width - term_width:] if _ELLIPSIS in term else []) + list(after)
        parsed.append(letters)
    if arrow:
        before, _, after = output_text.partition(_ELLIPSIS)
        output = list(before) + (ellipsis if _ELLIPSIS in output_text else []) + list(after)
    else:
        counts = {c: sum(term.count(c) for term in parsed) for c in used}
        output = ellipsis + sorted(c for c, n in counts.items() if n == 1)
    if any(len(set(letters)) != len(letters) for letters in (*parsed, output)):
        return None
    if any(c not in {c for term in parsed for c in term} for c in output):
        return None
    return (*parsed, output)


def _is_one(dim) -> bool:
    return isinstance(dim, int) and dim == 1 or getattr(dim, "value", None) == 1


def _product(sizes):
    total = 1
    for size in sizes:
        total = total * size
    return Analyzer().simplify(total) if not isinstance(total, int) else total


def _permuted(bb, expr, letters: list[str], order: list[str]):
    if letters == order:
        return expr
    return bb.normalize(relax.op.permute_dims(expr, [letters.index(c) for c in order]))


def _reshaped(bb, expr, shape: list):
    if len(shape) == len(_shape(expr)) and all(Analyzer().can_prove_equal(a, b)
                                               for a, b in zip(shape, _shape(expr))):
        return expr
    return bb.normalize(relax.op.reshape(expr, shape))


def einsum_as_matmul(bb, a, b, equation: str):
    """`Einsum(a, b)` as permute_dims / reshape / matmul ops emitted on `bb`, or None when the equation is not
    a two-operand contraction this handles (see the module docstring)."""
    shape_a, shape_b = _shape(a), _shape(b)
    if shape_a is None or shape_b is None:
        return None
    parsed = parse_equation(equation, (len(shape_a), len(shape_b)))
    if parsed is None:
        return None
    letters_a, letters_b, output = parsed
    size, sizes_a, sizes_b = {}, dict(zip(letters_a, shape_a)), dict(zip(letters_b, shape_b))
    analyzer = Analyzer()
    for c in sizes_a.keys() & sizes_b.keys():
        a_dim, b_dim = sizes_a[c], sizes_b[c]
        broadcast = c in output and (_is_one(a_dim) or _is_one(b_dim))  # a batch letter of size 1 on one side
        if not (analyzer.can_prove_equal(a_dim, b_dim) or broadcast):
            return None  # sizes that differ (a contracted letter included): TVM's converter decides
        size[c] = b_dim if _is_one(a_dim) else a_dim
    for c, dim in (*sizes_a.items(), *sizes_b.items()):
        size.setdefault(c, dim)

    # letters in one operand only and not in the output are summed first
    for side in ("a", "b"):
        letters, other = (letters_a, letters_b) if side == "a" else (letters_b, letters_a)
        summed = [i for i, c in enumerate(letters) if c not in other and c not in output]
        if summed:
            expr = bb.normalize(relax.op.sum(a if side == "a" else b, axis=summed))
            kept = [c for c in letters if c in other or c in output]
            if side == "a":
                a, letters_a = expr, kept
            else:
                b, letters_b = expr, kept

    batch = [c for c in output if c in letters_a and c in letters_b]
    free_a = [c for c in output if c in letters_a and c not in letters_b]
    free_b = [c for c in output if c in letters_b and c not in letters_a]
    contract = [c for c in letters_a if c in letters_b and c not in output]

    a = _permuted(bb, a, letters_a, batch + free_a + contract)
    b = _permuted(bb, b, letters_b, batch + contract + free_b)
    m, k, n = (_product(size[c] for c in group) for group in (free_a, contract, free_b))
    a = _reshaped(bb, a, [sizes_a[c] for c in batch] + [m, k])
    b = _reshaped(bb, b, [sizes_b[c] for c in batch] + [k, n])
    batch_dims = [size[c] for c in batch]
    if any(_is_one(sizes_a[c]) and not _is_one(size[c]) for c in batch):
        # the kernels broadcast the right operand only: the left one is repeated along its unit batch axes
        a = bb.normalize(relax.op.broadcast_to(a, batch_dims + [m, k]))
    result = bb.normalize(relax.op.matmul(a, b))
    result = _reshaped(bb, result, batch_dims + [size[c] for c in free_a + free_b])
    return _permuted(bb, result, batch + free_a + free_b, output)


# Converters `onnx_import` uses instead of TVM's.
CONVERTERS = {"Einsum": Einsum}
