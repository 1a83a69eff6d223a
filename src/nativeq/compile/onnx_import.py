"""ONNX -> Relax import: `legalize`, `check_importable`, then TVM's importer with its fixes and the recurrent ops.

This is the entry of `compile/`: everything after it works on the Relax module it returns.
TVM 0.27's ONNX importer loses the static shape of typical exported models with a dynamic
time axis (`pos_emb(arange(T))`, `x[:, :-1]`), after which it cannot build them
("shape_of expects a tensor input", "CodeGenVM cannot emit this Relax operator"). The
importer used here differs from `tvm.relax.frontend.onnx.from_onnx` only in:

- `Range` with a constant delta and a symbolic limit (and start) keeps the symbolic length
  (TVM's converter creates a fresh, unrelated length variable, which FuseOps may then use before the
  binding that defines it), also as a float Range to a cast length (`torch.arange(T, dtype=float)`);
- `Gather` on a shape value that is not a literal `ShapeExpr` converts it to a tensor first, and
  clips run-time indices (TVM's "fast" take reads out of bounds on a bad index);
- scalar immediates folded from shape arithmetic become constants of the other operand's
  dtype (TVM keeps `(d // heads) ** -0.5` as a float64 immediate and then refuses the Mul);
- operands of a broadcasting elementwise op whose shapes are equal but not provably so are
  reshaped (a free view) to one spelling of each dimension;
- a constant `Pad` becomes `R.nn.pad` (TVM's converter emits an opaque TE call, which the int8 and
  layout passes cannot see through); pads, a Tile's repeats, computed from shapes (`F.pad(x, (0, n - x.shape[1]))`)
  are evaluated as expressions of the symbolic dims (TVM refuses run-time pads and repeats);
- a Reshape's -1 is worked out after cancelling the dims both shapes share (Relax's quotient of two products of
  symbolic lengths does not simplify), and an Expand of symbolic dims to a constant shape follows ONNX's
  broadcasting (TVM's converter reads every dim as a number);
- a shape value read by an op outside the thirteen TVM lets read one becomes the tensor of its values;
- `LSTM`, `GRU` and `RNN`, for which TVM has no converter, convert through `recurrent.py`;
- a two-operand `Einsum` is a batched matmul (`einsum.py`): TVM's converter emits one opaque kernel.

It also collects the shape conditions TVM's Relax does not check at run time (`ShapeCheck`): a
`Reshape` whose element counts are not provably equal (a length the exporter traced into a constant
target shape: `[T, B*4, 36] -> [50, B*4, 36]`), and the dims the operand reshapes above rename. ONNX
Runtime refuses inputs that break them; the artifact records them in its manifest and refuses such
inputs before running (`runtime/shape_checks.py`) instead of returning a wrongly shaped result.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import onnx

from nativeq._text import first_line
from nativeq.compile._tvm import Analyzer, onnx_convert_map, onnx_frontend, relax, te, tirx, topi, tvm
from nativeq.compile.onnx_legalize import IMPORTER_BUILTIN_OPS, check_importable, legalize
from nativeq.compile.passes import dims_product
from nativeq.compile.provenance import node_span, span_node, used_vars, with_node_spans
from nativeq.compile.einsum import CONVERTERS as EINSUM_CONVERTERS
from nativeq.compile.recurrent import CONVERTERS as RECURRENT_CONVERTERS, check_node as check_recurrent_node
from nativeq.errors import NativeqError

# The ops TVM's importer lets read a shape value (`ONNXGraphImporter._construct_nodes`); it refuses any other.
_SHAPE_VALUE_OPS = {"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand", "Concat", "Equal",
                    "Where", "Cast", "CastLike", "Squeeze"}
_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And", "Or"}


@dataclass(frozen=True)
class ShapeCheck:
    """A condition on the input dims the graph needs and Relax does not check: `lhs == rhs`.

    `lhs` / `rhs` are integer expressions over the graph inputs' symbolic dim names (ONNX names),
    in Python syntax (`+ - * // %`, `min`, `max`), as the manifest stores them.
    """

    node: str
    op: str
    lhs: str
    rhs: str

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "lhs": self.lhs, "rhs": self.rhs}


def import_onnx(model: onnx.ModelProto, shape_dict: dict | None = None) -> "tvm.IRModule":
    """Legalize `model`, check every op is importable, and import it into a Relax IRModule."""
    return import_onnx_with_checks(model, shape_dict)[0]


def import_onnx_with_checks(model: onnx.ModelProto, shape_dict: dict | None = None) -> tuple["tvm.IRModule", list[ShapeCheck]]:
    """`import_onnx`, and the shape conditions the artifact must check at run time.

    Every call of the module's `main` carries a span naming the ONNX node it converts (`provenance.node_span`;
    the user's node where the legalization rewrote it).
    """
    origins: dict[str, tuple[str, str]] = {}
    model = legalize(model, origins)
    check_importable(model)
    importer = _importer(shape_dict, origins)
    mod = importer.from_onnx(model.graph, _opset(model))
    mod["main"] = with_node_spans(mod["main"], importer.var_nodes)
    return mod, importer.checks_by_onnx_name(model.graph, mod)


def from_onnx_fixed(model: onnx.ModelProto, shape_dict: dict | None = None) -> "tvm.IRModule":
    """`tvm.relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)` with the fixes above."""
    return _importer(shape_dict).from_onnx(model.graph, _opset(model))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _importer(shape_dict: dict | None, origins: dict[str, tuple[str, str]] | None = None) -> "_Importer":
    importer = _Importer(shape_dict or {}, "float32", keep_params_in_input=False, sanitize=True)
    importer.origins = origins or {}
    return importer


class _Range(onnx_frontend.Range):
    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        start, limit, delta = (onnx_frontend.get_constant(i, params) for i in inputs[:3])
        start_value, limit_value, delta_value = _range_bound(start), _range_bound(limit), _integral_scalar(delta)
        if None in (start_value, limit_value) or not delta_value or isinstance(limit_value, int):
            return super()._impl_v12(bb, inputs, attr, params)
        dtype = str(start.ty.dtype) if isinstance(start, tvm.ir.GenericConst) else str(start.ty)
        if delta_value > 0:
            return relax.op.arange(start_value, limit_value, delta_value, dtype)
        # NOTE: Relax sizes a symbolic arange with a negative step as if it were positive ((limit - start + step - 1)
        # // step: 2T + 1 for `arange(T - 1, -T, -1)`, which has 2T - 1 values). Counted down as the flip of the
        # same values counted up, the size is exact.
        step = -delta_value
        count = (start_value - limit_value + step - 1) // step
        if not _provably_non_negative(count):
            count = tvm.tirx.max(count, 0)
        first = start_value - (count - 1) * step
        return relax.op.flip(relax.op.arange(first, start_value + 1, step, dtype), axis=0)


def _provably_non_negative(expr) -> bool:
    """`expr` >= 0 for every input size: its symbolic dims are at least 1 (the runtime refuses empty inputs)."""
    analyzer = Analyzer()
    free = tirx.analysis.undefined_vars(expr, [])
    with analyzer.constraint_scope(tvm.tirx.all(*(v >= 1 for v in free)) if free else tvm.tirx.const(True)):
        return analyzer.can_prove(expr >= 0)


def _range_bound(expr):
    """A Range bound as an int (a constant) or an integer PrimExpr (a length from the input's shape, also under a
    cast: `torch.arange(x.shape[1], dtype=torch.float32)`, or `arange(T - 1, -T, -1)` of relative positions);
    None for anything else."""
    value = _integral_scalar(expr)
    if value is not None:
        return value
    if isinstance(expr, tvm.tirx.Cast):
        expr = expr.value
    return expr if tvm.ir.is_prim_expr(expr) and "int" in str(expr.ty) else None


class _Gather(onnx_frontend.Gather):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        if isinstance(data.ty, relax.ShapeType) and not isinstance(data, relax.ShapeExpr):
            inputs[0] = bb.normalize(relax.op.shape_to_tensor(data))
        result = super()._impl_v13(bb, inputs, attr, params)
        if isinstance(result, relax.Call) and getattr(result.op, "name", "") == "relax.take" and result.attrs.mode == "fast":
            # NOTE: "fast" reads out of bounds (a crash) for an out-of-range run-time index; "clip" costs a
            # min/max per index (negative ones are already normalized by TVM's converter).
            result = relax.op.take(result.args[0], result.args[1], result.attrs.axis, mode="clip")
        return result


class _Pad(onnx_frontend.Pad):
    @classmethod
    def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        """A constant Pad as `R.nn.pad` (TVM emits an opaque `topi.nn.pad` call that later passes cannot read)."""
        if attr.get("mode", b"constant").decode("utf-8") != "constant":
            return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
        pads = _values_from_shapes(bb, inputs[1])
        if pads is not None and pads.ndim == 1 and len(inputs) < 4 and not all(isinstance(p, int) for p in pads):
            # pads computed from the input's size (`F.pad(x, (0, 0, 0, n - x.shape[1]))`, padding to a multiple of a
            # chunk): TVM's converter refuses run-time pads; their values are expressions of the symbolic dims
            constant = onnx_frontend.get_constant(inputs[2], params) if len(inputs) > 2 else None
            value = 0.0 if constant is None else constant.value.numpy().item()
            before, after = list(pads[: len(pads) // 2]), list(pads[len(pads) // 2:])
            return bb.emit_te(topi.nn.pad, inputs[0], [_as_int64(p) for p in before], [_as_int64(p) for p in after],
                              value, primfunc_name_hint="pad")
        pad_before, pad_after, constant_value = cls._parse_pads_and_axes(inputs, params)
        pad_width = [int(p) for pair in zip(pad_before, pad_after) for p in pair]
        return relax.op.nn.pad(inputs[0], pad_width, "constant", float(constant_value))


class _Tile(onnx_frontend.Tile):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        """Tile with repeats computed from shapes (`x.repeat(q.size(0) // heads, 1, 1)`), by their values: TVM's
        converter takes constant repeats only."""
        given = onnx_frontend.get_constant(inputs[1], params)
        repeats = _values_from_shapes(bb, given)
        if repeats is None or repeats.ndim != 1 or isinstance(given, tvm.ir.GenericConst):
            return super()._impl_v13(bb, inputs, attr, params)
        return bb.emit_te(_tile, inputs[0], [_as_int64(r) for r in repeats], primfunc_name_hint="tile")


def _tile(x, repeats: list):
    """ONNX Tile with repeats that may be PrimExprs (`topi.tile` takes ints): out[i] = x[i % x.shape]."""
    shape = list(x.shape)
    return te.compute([d * r for d, r in zip(shape, repeats)],
                      lambda *index: x(*(i % d for i, d in zip(index, shape))), name="tile")


# Ops `_values_from_shapes` evaluates on object arrays: a size computation's tensor ops (TorchScript's pads idiom:
# Concat, Reshape [-1, 2], a reversing Slice, Transpose, Reshape [-1], Cast).
_SHAPE_VALUE_ARITHMETIC = {"relax.add": operator.add, "relax.subtract": operator.sub, "relax.multiply": operator.mul,
                           "relax.floor_divide": operator.floordiv}


def _elements(expr) -> list:
    """The fields of a Relax tuple or the values of a shape."""
    return list(getattr(expr, "fields", None) or getattr(expr, "values", None) or [])


def _values_from_shapes(bb, expr, depth: int = 0):
    """The values of a small integer tensor computed from the graph's shapes and constants, as a numpy object array
    of ints and PrimExprs over the symbolic dims; None when any part is data or an op this does not evaluate."""
    if depth > 32:
        return None
    if isinstance(expr, relax.Var):
        bound = bb.lookup_binding(expr)
        return None if bound is None else _values_from_shapes(bb, bound, depth + 1)
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value.numpy()
        return value.astype(object) if value.dtype.kind in "iu" and value.size <= 64 else None
    if isinstance(expr, relax.ShapeExpr):
        return np.array([_int_value(v) if _int_value(v) is not None else v for v in expr.values] or [], dtype=object)
    if tvm.ir.is_prim_expr(expr):
        return np.array(expr if _int_value(expr) is None else _int_value(expr), dtype=object)
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
        return None
    name, args = expr.op.name, expr.args
    if name in ("relax.shape_to_tensor", "relax.astype"):
        return _values_from_shapes(bb, args[0], depth + 1)
    if name == "relax.concat":
        parts = [_values_from_shapes(bb, a, depth + 1) for a in args[0].fields]
        return None if any(p is None for p in parts) else np.concatenate(parts, axis=int(expr.attrs.axis))
    if name in _SHAPE_VALUE_ARITHMETIC:
        a, b = (_values_from_shapes(bb, arg, depth + 1) for arg in args[:2])
        return None if a is None or b is None else _SHAPE_VALUE_ARITHMETIC[name](a, b)
    x = _values_from_shapes(bb, args[0], depth + 1)
    if x is None:
        return None
    if name == "relax.reshape":
        shape = [_int_value(v) for v in getattr(args[1], "values", [None])]
        return None if None in shape else x.reshape(shape)
    if name == "relax.permute_dims":
        return np.transpose(x, None if expr.attrs.axes is None else [int(a) for a in expr.attrs.axes])
    if name == "relax.flip":
        return np.flip(x, int(expr.attrs.axis))
    if name == "relax.strided_slice":
        axes, begins, ends, steps = ([_int_value(v) for v in _elements(a)] for a in args[1:5])
        if None in axes + begins + ends + steps:
            return None
        index = [slice(None)] * x.ndim
        for axis, begin, end, step in zip(axes, begins, ends, steps):
            index[axis] = slice(begin, end, step)
        return x[tuple(index)]
    return None


class _Reshape(onnx_frontend.Reshape):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        """A reshape of a scalar size (torch's dynamo exporter: Shape -> Squeeze -> Add -> Div -> Reshape [1], an
        output length to slice by) as the reshape of a one-dim shape: TVM keeps such a scalar as a PrimValue, which
        its converter refuses ("Reshape expects the input data to be a Tensor")."""
        if tvm.ir.is_prim_expr(inputs[0]):
            inputs = [relax.ShapeExpr([inputs[0]]), *inputs[1:]]
        target = _target_with_inferred_dim(inputs[0], onnx_frontend.get_constant(inputs[1], params),
                                           attr.get("allowzero", 0))
        if target is not None:
            return relax.op.reshape(inputs[0], target)
        return super()._impl_v13(bb, inputs, attr, params)


def _target_with_inferred_dim(data, new_shape, allowzero: int):
    """The Reshape target `new_shape` with its -1 worked out by cancelling the dims it shares with `data`'s shape, as
    a ShapeExpr; None when nothing is to be gained (static dims, no -1, unknown shapes).

    Relax sizes a -1 as numel // (product of the other dims), which TVM's simplifier cannot reduce once both are
    products of symbolic lengths: `view(1, 2T - 1, -1, 36)` of a [1, 2T - 1, 144] position table (Transformer-XL
    style relative attention) had the size `(288 T + 144) // (72 T + 36)`, every op after it an unknown shape and
    the next shape-built Reshape failed to import. Cancelled first, the size is 144 // 36 = 4."""
    dims = _dims(data)
    if isinstance(new_shape, relax.ShapeExpr):
        values = list(new_shape.values)
    elif isinstance(new_shape, tvm.ir.GenericConst) and new_shape.ty.ndim == 1:
        values = [tvm.tirx.IntImm("int64", int(v)) for v in new_shape.value.numpy().tolist()]
    else:
        return None
    if dims is None or all(_int_value(d) is not None for d in dims):
        return None
    unknown = [k for k, v in enumerate(values) if _int_value(v) == -1]
    if len(unknown) != 1:
        return None
    if not allowzero:
        values = [dims[k] if _int_value(v) == 0 and k < len(dims) else v for k, v in enumerate(values)]
    numerator, denominator = _without_common_dims(dims, [v for k, v in enumerate(values) if k != unknown[0]])
    values[unknown[0]] = Analyzer().simplify(dims_product(numerator) // dims_product(denominator))
    return relax.ShapeExpr(values)


def _without_common_dims(a: list, b: list) -> tuple[list, list]:
    """`a` and `b` (lists of dims) without the symbolic dims provably equal in both: what is left of each side of
    `product(a) == product(b)` or of `product(a) // product(b)`. TVM's simplifier does not expand a product of sums,
    so `4 * (T + 1) * (2 * T + 2)` and `4 * (2 * T + 2) * (T + 1)` are not provably equal until cancelled."""
    analyzer = Analyzer()
    rest_a, rest_b = list(a), []
    for d in b:
        match = next((i for i, n in enumerate(rest_a) if _int_value(d) is None and analyzer.can_prove_equal(n, d)),
                     None)
        if match is None:
            rest_b.append(d)
        else:
            del rest_a[match]
    return rest_a, rest_b


class _Expand(onnx_frontend.Expand):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        """Expand of a tensor with symbolic dims to a constant shape (torch's `x.expand(1, -1, -1)`: the exporter
        computes `Where(shape == -1, 1, shape)`, which folds to [1, 1, 1]) by ONNX's broadcasting rules. TVM's
        converter reads every dim of the data as a number on that path and fails on a symbolic one."""
        data, shape = inputs[0], onnx_frontend.get_constant(inputs[1], params)
        dims = _dims(data)
        if not isinstance(shape, tvm.ir.GenericConst) or dims is None or all(_int_value(d) is not None for d in dims):
            return super()._impl_v13(bb, inputs, attr, params)
        target = [int(v) for v in shape.value.numpy().tolist()]
        rank = max(len(target), len(dims))
        target = [1] * (rank - len(target)) + target
        aligned = [tvm.tirx.IntImm("int64", 1)] * (rank - len(dims)) + dims
        out = []
        for d, t in zip(aligned, target):
            if t in (1, -1):  # -1: TVM's reading (keep the data's dim); ONNX defines only 1 to do so
                out.append(d)
            elif _int_value(d) in (1, None) or _int_value(d) == t:
                out.append(tvm.tirx.IntImm("int64", t))  # a symbolic dim must be 1 or t, as ORT requires
            else:
                raise ValueError(f"Expand cannot broadcast a dim of {_int_value(d)} to {t}")
        if len(out) == len(dims) and all(Analyzer().can_prove_equal(a, b) for a, b in zip(out, dims)):
            return data
        return relax.op.broadcast_to(data, relax.ShapeExpr(out))


# An end at or past this is "to the end of the axis" (torch writes INT64_MAX for `x[..., k:]`).
_SLICE_TO_END = 2**31 - 1


class _Slice(onnx_frontend.Slice):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        """A Slice of a symbolic axis with its bounds resolved against the axis's length and clamped to it as ONNX
        clamps them, as an in-bound slice (a clamp the analyzer proves needless for every non-negative size is left
        out; a symbolic bound whose sign it cannot tell keeps TVM's slice). Two cases TVM gets wrong:

        - a constant bound: torch's `x[:, :, -4:]` of a cache concatenated before a chunk, [1, C, 4 + T], ends at
          INT64_MAX, which TVM sizes `min(INT64_MAX, n) - ...` and its simplifier cannot reduce (n + 4 might
          overflow): the new cache was typed [1, C, INT64_MAX - max(T, INT64_MAX - 4)];
        - a bound computed from the sizes: DPRNN's `x[:, :, :-rest]` with `rest` from the length modulo its chunk
          size ends at `-rest`, which TVM takes as the end itself (its "assume in bounds" skips ONNX's negative-index
          rule): the slice was sized `-rest`, a negative length. A bound provably negative counts from the end.
        """
        result = super()._impl_v13(bb, inputs, attr, params)
        if not (isinstance(result, relax.Call) and getattr(result.op, "name", "") == "relax.strided_slice"):
            return result
        data, axes, begins, ends, steps = result.args
        dims = _dims(data)
        if dims is None:
            return result
        axis_dims = [dims[value] for value in map(_int_value, axes) if value is not None]
        if len(axis_dims) != len(axes) or any(_int_value(step) is None or _int_value(step) <= 0 for step in steps):
            return result
        if all(_int_value(v) is not None for v in (*axis_dims, *begins, *ends)):
            return result  # static: TVM's sizes are exact
        analyzer = Analyzer()
        free = {v.name: v for dim in axis_dims for v in tirx.analysis.undefined_vars(dim, [])}
        for bound in (*begins, *ends):
            if _int_value(bound) is None:
                free.update({v.name: v for v in tirx.analysis.undefined_vars(bound, [])})
        with analyzer.constraint_scope(tvm.tirx.all(*(v >= 0 for v in free.values()))):
            resolved = [(_slice_bound(analyzer, begin, dim), _slice_bound(analyzer, end, dim))
                        for dim, begin, end in zip(axis_dims, begins, ends)]
            if any(b is None or e is None for b, e in resolved):
                return result
            resolved = [_clamped(analyzer, b, e, dim) for (b, e), dim in zip(resolved, axis_dims)]
        return relax.op.strided_slice(data, [_int_value(a) for a in axes], [b for b, _ in resolved],
                                      [e for _, e in resolved], [_int_value(s) for s in steps], assume_inbound=True)


def _clamped(analyzer, begin, end, dim):
    """(begin, end) of a positive-step slice of an axis of length `dim` clamped as ONNX clamps them (to [0, dim], an
    end before the begin an empty slice), as int64 PrimExprs; a clamp the analyzer proves needless is left out."""
    begin, end = _as_int64(begin), _as_int64(end)
    if not analyzer.can_prove(0 <= begin):
        begin = tirx.max(begin, tirx.IntImm("int64", 0))
    if not analyzer.can_prove(begin <= dim):
        begin = tirx.min(begin, dim)
    if not analyzer.can_prove(end <= dim):
        end = tirx.min(end, dim)
    if not analyzer.can_prove(begin <= end):
        end = tirx.max(end, begin)
    return _as_int64(analyzer.simplify(begin)), _as_int64(analyzer.simplify(end))


def _slice_bound(analyzer, bound, dim):
    """A Slice start or end (an integer PrimExpr) as a position in an axis of length `dim` (ONNX: a negative one
    counts from the end, INT64_MAX is the end), or None when a symbolic one's sign is unknown."""
    value = _int_value(bound)
    if value is not None:
        return dim if value >= _SLICE_TO_END else (dim + value if value < 0 else value)
    if analyzer.can_prove(bound < 0):
        return dim + bound
    return bound if analyzer.can_prove(bound >= 0) else None


class _PairwiseMultiInput:
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        """Max / Min of run-time tensors as a chain of `maximum` / `minimum` (elementwise: fused, and carried
        through channels-last layouts), not TVM's stack of the inputs and a reduction over it (a kernel of its
        own, with transposes around it in a channels-last model). Exact either way."""
        if len(inputs) > 1 and not all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
            return cls._impl_dynamic(bb, inputs)
        return super()._impl_v1(bb, inputs, attr, params)


class _Max(_PairwiseMultiInput, onnx_frontend.Max):
    pass


class _Min(_PairwiseMultiInput, onnx_frontend.Min):
    pass


# Converters used instead of TVM's; LSTM/GRU/RNN have none in TVM 0.27 (see recurrent.py), Einsum's is one opaque
# kernel (see einsum.py).
_CONVERTER_FIXES = {"Range": _Range, "Gather": _Gather, "Pad": _Pad, "Reshape": _Reshape, "Slice": _Slice,
                    "Expand": _Expand, "Tile": _Tile, "Max": _Max, "Min": _Min,
                    **RECURRENT_CONVERTERS,
                    **EINSUM_CONVERTERS}


def with_computed_output_dims(model: onnx.ModelProto, mod) -> onnx.ModelProto:
    """`model` with each graph output's declared dims replaced where the imported graph computes another size.

    A declared static size the graph does not compute (an output declared [1, 3, 8] that is [1, T, 8]) would
    make the manifest describe outputs the library never returns; ONNX Runtime, too, returns what the graph
    computes (with a warning). A replaced dim takes the input dim's name when the computed size is one, else
    a name of its own (`<output>_dim<k>`). The model itself is left alone when every declaration agrees.
    """
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(fields) != len(model.graph.output):
        return model
    names = _input_dim_names(model.graph, mod)
    fixed = None
    for k, (info, field) in enumerate(zip(model.graph.output, fields)):
        if not isinstance(field, relax.TensorType) or field.shape is None or not hasattr(field.shape, "values"):
            continue
        computed = list(field.shape.values)
        declared = info.type.tensor_type.shape.dim
        if not info.type.tensor_type.HasField("shape") or len(declared) != len(computed):
            continue
        for axis, (dim, value) in enumerate(zip(declared, computed)):
            if not dim.HasField("dim_value") or (isinstance(value, tvm.tirx.IntImm) and value.value == dim.dim_value):
                continue
            if fixed is None:
                fixed = onnx.ModelProto()
                fixed.CopyFrom(model)
            target = fixed.graph.output[k].type.tensor_type.shape.dim[axis]
            if isinstance(value, tvm.tirx.IntImm):
                target.dim_value = int(value.value)
            else:
                target.dim_param = names.get(value, f"{info.name}_dim{axis}")
    return model if fixed is None else fixed


def _input_dim_names(graph: onnx.GraphProto, mod) -> dict:
    """TVM's dim variable of each symbolic input dim -> its ONNX dim name."""
    initializers = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializers]
    names = {}
    for value_info, param in zip(inputs, mod["main"].params):
        ty = param.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            continue
        for dim, value in zip(value_info.type.tensor_type.shape.dim, ty.shape.values):
            if isinstance(value, tvm.tirx.Var) and dim.dim_param:
                names[value] = dim.dim_param
    return names


class _Importer(onnx_frontend.ONNXGraphImporter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checks: list[tuple[str, str, object, object]] = []  # (node, op, lhs PrimExpr, rhs PrimExpr)
        self.origins: dict[str, tuple[str, str]] = {}  # legalized node name -> the user's node (op type, name)
        self.var_nodes: dict = {}  # Relax variable bound while converting a node -> that node (op type, name)
        self.outputs_for_tensor_ops: dict[str, list] = {}  # node name -> outputs an op reads that takes no shape value

    def checks_by_onnx_name(self, graph: onnx.GraphProto, mod) -> list[ShapeCheck]:
        """The collected conditions with TVM's dim variables renamed to the graph inputs' ONNX dim names.

        A condition over a variable that is not an input dim (a data-dependent size) is left out.
        """
        names = _input_dim_names(graph, mod)
        checks, seen = [], set()
        for node, op, lhs, rhs in self._checks:
            lhs_text, rhs_text = _expr_text(lhs, names), _expr_text(rhs, names)
            if lhs_text is None or rhs_text is None or (node, lhs_text, rhs_text) in seen:
                continue
            seen.add((node, lhs_text, rhs_text))
            checks.append(ShapeCheck(node, op, lhs_text, rhs_text))
        return checks

    def _check_for_unsupported_ops(self, graph):
        """TVM's check, counting the ops of `_CONVERTER_FIXES` as supported; refuses recurrent attributes early."""
        known = set(onnx_convert_map()) | set(_CONVERTER_FIXES) | IMPORTER_BUILTIN_OPS
        unsupported = {node.op_type for node in graph.node if node.op_type not in known}
        consumers: dict[str, set] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
        self.outputs_for_tensor_ops = {node.name: [o for o in node.output if consumers.get(o, set()) - _SHAPE_VALUE_OPS]
                                       for node in graph.node}
        for node in graph.node:
            if node.op_type in RECURRENT_CONVERTERS:
                check_recurrent_node(node)
        if unsupported:
            raise tvm.error.OpNotImplemented(
                "The following operators are not supported for frontend ONNX: " + ", ".join(sorted(unsupported)))

    def _convert_operator(self, op_name, inputs, attrs, opset):
        name = str(attrs.get("tvm_custom", {}).get("name") or op_name)
        user_op, node = self.origins.get(name, (op_name, name))
        try:
            return self._convert_node(op_name, inputs, attrs, opset, name, node)
        except NativeqError:
            raise
        except Exception as e:  # noqa: BLE001  (TVM's converters raise anything from KeyError to TVMError)
            raise NativeqError(f"{user_op} node '{node}': TVM's ONNX importer cannot convert it: {first_line(e)}") from None

    def _convert_node(self, op_name, inputs, attrs, opset, name: str, node: str):
        if op_name in _BROADCAST_OPS:
            renamed = []
            inputs = _unify_operand_shapes(self.bb, _immediates_as_tensor_constants(inputs), renamed)
            self._checks.extend((node, op_name, old, new) for old, new in renamed)
        elif op_name == "Concat":
            renamed = []
            inputs = _unify_concat_operands(self.bb, inputs, int(attrs.get("axis", 0)), renamed)
            self._checks.extend((node, op_name, old, new) for old, new in renamed)
        fixed = _CONVERTER_FIXES.get(op_name)
        if fixed is None:
            result = super()._convert_operator(op_name, inputs, attrs, opset)
        else:
            result = self.bb.normalize(fixed.get_converter(opset)(self.bb, inputs, attrs, [self._nodes, self._params]))
        if op_name == "Reshape":
            self._check_same_size(node, inputs[0], result)
        read_as_tensor = self.outputs_for_tensor_ops.get(name)
        if read_as_tensor and isinstance(getattr(result, "ty", None), relax.ShapeType):
            # a shape value read by an op TVM's importer refuses shape values for ("cannot handle ShapeExpr
            # inputs": Tile, Mul, ...) becomes the tensor of its values, which those ops take
            result = self.bb.normalize(relax.op.shape_to_tensor(result))
        return self._attribute(result, self.origins.get(name, (op_name, name)))

    def _attribute(self, expr, node: tuple[str, str]):
        """`expr` (a converter's result) with its calls spanned as ONNX node `node`; the variables bound while
        converting it recorded as `node`'s (`var_nodes`; `import_onnx` spans their calls once the import is done).

        Stops at variables already recorded (earlier nodes'); a variable bound to a call an earlier node left
        unbound (spanned already) keeps that node.
        """
        if isinstance(expr, relax.Var):
            self._record_bound(expr, node)
            return expr
        if isinstance(expr, relax.Call):
            args = [self._attribute(arg, node) for arg in expr.args]
            if span_node(expr.span) is not None and all(a.same_as(b) for a, b in zip(args, expr.args)):
                return expr
            return self.bb.normalize(relax.Call(expr.op, args, expr.attrs, expr.ty_args,
                                                span=expr.span if span_node(expr.span) else node_span(node)))
        if isinstance(expr, relax.Tuple):
            fields = [self._attribute(field, node) for field in expr.fields]
            return expr if all(a.same_as(b) for a, b in zip(fields, expr.fields)) else self.bb.normalize(relax.Tuple(fields))
        if isinstance(expr, relax.TupleGetItem):
            self._record_bound(expr.tuple_value, node)
        return expr

    def _record_bound(self, var, node: tuple[str, str]) -> None:
        """Record `var` and the variables its binding reads, back to those already recorded, as `node`'s."""
        pending = [var]
        while pending:
            var = pending.pop()
            if not isinstance(var, relax.Var) or var in self.var_nodes:
                continue
            value = self.bb.lookup_binding(var)
            if value is None:  # a graph input or parameter
                continue
            self.var_nodes[var] = span_node(getattr(value, "span", None)) or node
            pending.extend(used_vars(value))

    def _check_same_size(self, node: str, data, result) -> None:
        """Record `numel(data) == numel(result)` unless TVM can prove it (Relax's reshape does not check it)."""
        before, after = _numel(data), _numel(result)
        if before is None or after is None:
            return
        rest_before, rest_after = _without_common_dims(_dims(data), _dims(result))
        if not Analyzer().can_prove_equal(dims_product(rest_before), dims_product(rest_after)):
            self._checks.append((node, "Reshape", before, after))


def _immediates_as_tensor_constants(inputs):
    """Scalar immediates folded from shape arithmetic (e.g. `T.float64(0.25)`) as constants of the tensor operand's dtype."""
    dtypes = [str(i.ty.dtype) for i in inputs if isinstance(getattr(i, "ty", None), relax.TensorType)]
    if not dtypes:
        return inputs
    for k, inp in enumerate(inputs):
        if isinstance(inp, (tvm.tirx.FloatImm, tvm.tirx.IntImm)):
            inputs[k] = relax.const(inp.value, dtypes[0])
    return inputs


def _as_int64(value):
    """An int or integer PrimExpr as an int64 PrimExpr (what `strided_slice` takes)."""
    if isinstance(value, int):
        return tvm.tirx.IntImm("int64", value)
    return value if "int64" in str(value.ty) else tvm.tirx.Cast("int64", value)


def _integral_scalar(expr) -> int | None:
    """The value of a one-element constant holding an integer (of an integer or float dtype), else None."""
    if isinstance(expr, tvm.ir.GenericConst) and expr.value.numpy().size == 1:
        value = expr.value.numpy().item()
        if float(value).is_integer():
            return int(value)
    return None


def _int_value(expr) -> int | None:
    """The value of an integer immediate (an IntImm, or a PrimValue holding one), else None."""
    value = getattr(expr, "value", expr)
    return int(value) if isinstance(value, (int, tvm.tirx.IntImm)) else None


def _dims(expr) -> list | None:
    """The dims of a tensor expression (PrimExprs), or None if its shape is unknown."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _numel(expr):
    """The element count of a tensor expression (a PrimExpr), or None if its shape is unknown."""
    dims = _dims(expr)
    return None if dims is None else dims_product(dims)


_TEXT_OPS = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%"}


def _expr_text(expr, names: dict) -> str | None:
    """`expr` (a TIR integer expression) in Python syntax over `names`, or None if it has other terms."""
    if isinstance(expr, tvm.tirx.IntImm):
        return str(int(expr.value))
    if isinstance(expr, tvm.tirx.Var):
        return names.get(expr)
    kind = type(expr).__name__
    operands = [_expr_text(expr.a, names), _expr_text(expr.b, names)] if hasattr(expr, "a") else [None]
    if None in operands:
        return None
    if kind in _TEXT_OPS:
        return f"({operands[0]} {_TEXT_OPS[kind]} {operands[1]})"
    if kind in ("Min", "Max"):
        return f"{kind.lower()}({operands[0]}, {operands[1]})"
    return None


def _unify_concat_operands(bb, inputs, axis: int, renamed: list):
    """Reshape a Concat's operands to the first one's spelling of every axis but `axis`.

    Those dims must be equal at run time; where TVM cannot prove it (a U-Net's skip connection: an upsampled
    `2 * ((T - 1) // 8 + 1)` beside the encoder's `(T - 1) // 4 + 1`) the concat's shape would be unknown and no
    later op could be built. The condition is recorded (`renamed`, as `ShapeCheck`s): inputs that break it are
    refused, as ONNX Runtime refuses them.
    """
    shapes = [_dims(inp) for inp in inputs]
    if len(shapes) < 2 or any(s is None or len(s) != len(shapes[0]) for s in shapes):
        return inputs
    axis %= len(shapes[0])
    for k, dims in enumerate(shapes[1:], start=1):
        new_dims = [d if i == axis else shapes[0][i] for i, d in enumerate(dims)]
        differ = [(old, new) for old, new in zip(dims, new_dims) if not Analyzer().can_prove_equal(old, new)]
        if differ:
            renamed.extend(differ)
            inputs[k] = bb.normalize(relax.op.reshape(inputs[k], relax.ShapeExpr(new_dims)))
    return inputs


def _unify_operand_shapes(bb, inputs, renamed: list | None = None):
    """Reshape operands of a broadcasting op to one spelling of each dimension.

    The importer's shape arithmetic can spell one runtime length two ways (`T` and
    `min(1, T) + min(max(T - 1, 0), T)` after a slice and concat); the op's result shape
    is then unknown and cannot be built. Each non-1 dimension takes the spelling of the operand
    with the most non-1 dimensions (then the shortest): the other operands are reshaped, which
    is a copy when TVM cannot prove the two spellings equal, so it should hit the small ones.
    """
    shapes = {}
    for k, inp in enumerate(inputs):
        ty = getattr(inp, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.shape is not None:
            shapes[k] = list(ty.shape.values)
    if len(shapes) < 2:
        return inputs
    ndim = max(len(s) for s in shapes.values())

    def is_one(d):
        return isinstance(d, tvm.tirx.IntImm) and d.value == 1

    # The operand with the most non-1 dims (the activation, not a broadcast table) keeps its
    # spelling, so the reshape that renames a dimension copies the smallest operand.
    def weight(k):
        return sum(not is_one(d) for d in shapes[k])

    chosen = []
    for axis in range(ndim):
        candidates = [(weight(k), -len(str(s[axis - ndim + len(s)])), s[axis - ndim + len(s)])
                      for k, s in shapes.items() if axis - ndim + len(s) >= 0 and not is_one(s[axis - ndim + len(s)])]
        chosen.append(max(candidates, key=lambda c: c[:2])[2] if candidates else None)
    for k, dims in shapes.items():
        offset = ndim - len(dims)
        new_dims = [d if is_one(d) else chosen[offset + i] for i, d in enumerate(dims)]
        if renamed is not None:
            renamed.extend((old, new) for old, new in zip(dims, new_dims)
                           if str(old) != str(new) and not Analyzer().can_prove_equal(old, new))
        if [str(d) for d in new_dims] != [str(d) for d in dims]:
            # NOTE: a reshape, not a match_cast: TVM 0.27's KillAfterLastUse segfaults on a match_cast alias.
            inputs[k] = bb.normalize(relax.op.reshape(inputs[k], relax.ShapeExpr(new_dims)))
    return inputs
