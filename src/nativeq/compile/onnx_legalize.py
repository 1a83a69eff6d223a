"""ONNX front-end legalization: the first stage of `compile/`, before `from_onnx`.

TVM 0.27's ONNX importer has no converter for some standard integer ops and fails on some
QDQ encodings users bring. `legalize(model)` rewrites those into equivalent standard ONNX
that the importer (and ONNX Runtime) accept, so the legalized model is still a model a
user could run anywhere:

- INT4/UINT4 initializers -> INT8/UINT8 holding the same values (the importer fails with
  `TensorCopyFromBytes: size mismatch`); a QuantizeLinear producing INT4 becomes an 8-bit
  QuantizeLinear followed by a Clip to the 4-bit range. INT4/UINT4 graph inputs and outputs
  become INT8/UINT8 too: the artifact's manifest keeps the 4-bit type, and the runtime
  converts the (ml_dtypes) arrays at the call.
- QuantizeLinear/DequantizeLinear of float8, float4 or 2-bit types are refused with a
  one-line `NativeqError` naming the op, node and type.
- com.microsoft QuantizeLinear/DequantizeLinear (ONNX Runtime's quantizer writes them for 4-bit weights below
  opset 21) -> the standard ops, the opset raised to 21 when they carry 16- or 4-bit types: shape inference, and
  the static shape folding below, see through them.
- QuantizeLinear of a float initializer (float weights behind a Q/DQ pair: NNCF, PT2E, `AddQDQPairToWeight`) ->
  the integer initializer ONNX Runtime computes, so the weight reads as `quantize_static` writes it.
- QLinearMatMul with float16/bfloat16 scales -> MatMulInteger, then the requantize in float64
  as ONNX defines it (the QDQ form, computed in float16, comes out a step off).
- blocked DequantizeLinear (`block_size`) of constants -> a float initializer, folded here
  exactly as ONNX Runtime computes it, `(x - zero_point) * scale` in float32; blocked
  QuantizeLinear, and blocked DequantizeLinear of run-time tensors (of static shape) -> the
  scale and zero point repeated over each block, then float32 elementwise ops computing the
  ONNX formula.
- QLinearMatMul / QLinearConv -> the QDQ form DequantizeLinear -> MatMul/Conv ->
  QuantizeLinear, the form the int8 lowering pass recognizes. The integer bias of
  QLinearConv becomes an int32 DequantizeLinear with scale `x_scale * w_scale`. Results
  may differ from ORT's integer kernels by one quantization step on rounding ties.
- com.microsoft QLinearAdd/Mul/Sigmoid/LeakyRelu/Softmax/Concat/(Global)AveragePool and
  QGemm (ORT's QOperator format) -> the same QDQ form around the float op.
- ConvInteger -> DequantizeLinear(scale 1) -> float Conv -> Cast(int32). This is exact
  because every partial sum is an integer below 2**24; when the constant weights could
  exceed that, the input channels are split into slices whose float Convs are each exact
  and the slices are summed in int32. A run-time weight is accepted when its static shape
  bounds every sum within 2**24 (C/group * kernel size * 255 * 255), refused otherwise.

- If whose condition folds (from static sizes, ranks, constants, inputs fixed by `--input-value`) -> the nodes of the
  branch it takes (`inline_constant_ifs`); an If on a run-time value -> both branches and a `Where` per output
  (`select_runtime_ifs`), refused by name when the branches' outputs differ in type or shape. TVM's importer would
  make Relax control flow outside any dataflow block, where nothing is fused or lowered to int8.

- PRelu -> Less, Mul, Where (the importer puts a one-element slope on the last axis, which must then be
  static, and runs a per-channel one between two transposes of the whole tensor).
- STFT of a real signal with constant framing -> a strided Conv with the windowed DFT basis (the importer has
  no STFT; `torch.stft` exports one).

MatMulInteger and DynamicQuantizeLinear are left alone: TVM's converters compute them
exactly (int32 matmul; the same rounding as ORT).

`check_importable(model)` raises a one-line `NativeqError` naming every op (and node) the
TVM importer cannot convert.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nativeq.errors import NativeqError

# NOTE: float32 represents every integer of magnitude <= 2**24 exactly; ConvInteger slices keep
# every partial sum at or below this bound.
FLOAT32_EXACT_INT = 1 << 24

_INT4_TO_INT8 = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
_INT4_RANGE = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}

# Ops the importer handles outside its converter table, and ops `legalize` removes.
IMPORTER_BUILTIN_OPS = {"If", "Constant"}


def legalize(model: onnx.ModelProto, origins: dict[str, str] | None = None) -> onnx.ModelProto:
    """Return a copy of `model` in which every node is one TVM's ONNX importer can convert exactly.

    A node without a name gets its first output's. origins: when given, filled with each node name of the copy ->
    the node of `model` it comes from, as (op type, name) (a rewrite's nodes -> the node they replace).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _check_default_opset(out)
    out = standard_domain_qdq(out)
    ctx = _Context(out)
    names = {node.name for node in out.graph.node}
    for node in out.graph.node:
        if not node.name:  # named after its first output, as nativeq's errors name an unnamed node
            node.name = node.output[0] if node.output and node.output[0] not in names else ctx.fresh(node.op_type)
            names.add(node.name)
    origins = {} if origins is None else origins
    origins.update((node.name, (node.op_type, node.name)) for node in out.graph.node)
    refuse_unsupported_quantized_types(ctx)
    widen_int4_initializers(ctx)
    # Each folding round can make more dimensions static for shape inference, and each inlined If branch brings
    # its nodes to the top level where they fold: repeat to a fixed point. An If whose condition stays a run-time
    # value runs both branches and selects.
    while fold_static_shape_arithmetic(ctx) | inline_constant_ifs(ctx, origins) or select_runtime_ifs(ctx, origins):
        ctx.flush_initializers()
        ctx.shapes, ctx.static_dims = _infer_shapes(out)
    check_selected_ifs(ctx)
    new_nodes = []
    for node in out.graph.node:
        replacement = None
        for rewrite in _NODE_REWRITES:
            replacement = rewrite(node, ctx)
            if replacement is not None:
                break
        new_nodes.extend(replacement if replacement is not None else [node])
        for new_node in replacement or ():
            origins[new_node.name] = origins.get(node.name, (node.op_type, node.name))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    ctx.flush_initializers()
    _drop_stale_value_info(out)
    if ctx.opset < ctx.needs_opset:
        out = _upgrade_opset(out, ctx.needs_opset)
    return out


# The opset from which the standard QuantizeLinear / DequantizeLinear take 16- and 4-bit types.
_WIDE_QDQ_OPSET = 21
_WIDE_QDQ_TYPES = (TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4, TensorProto.UINT4)


def standard_domain_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """com.microsoft QuantizeLinear / DequantizeLinear -> the standard ops (the same definition), the opset raised to
    21 when they carry 16- or 4-bit types.

    ONNX Runtime's quantizer writes the contrib ops below opset 21 for 4-bit weights and 16-bit activations
    (`quantize_static(weight_type=QInt4)`, `extra_options={"UseQDQContribOps": True}`). ONNX shape inference does
    not know them: every shape computed after one (attention's head reshapes) would stay a run-time tensor, which
    TVM's Reshape converter refuses.
    """
    nodes = [n for n in model.graph.node
             if n.domain == "com.microsoft" and n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return model
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update((vi.name, vi.type.tensor_type.elem_type) for vi in [*model.graph.input, *model.graph.output])
    wide = any(types.get(name) in _WIDE_QDQ_TYPES for n in nodes for name in (n.input[0], *n.input[2:3]))
    for node in nodes:
        node.domain = ""
    if wide and _default_opset(model) < _WIDE_QDQ_OPSET:
        return _upgrade_opset(model, _WIDE_QDQ_OPSET, "16- and 4-bit QuantizeLinear/DequantizeLinear")
    return model


def check_importable(model: onnx.ModelProto) -> None:
    """Raise NativeqError listing every op (with its nodes) that TVM's ONNX importer cannot convert."""
    from nativeq.compile._tvm import onnx_convert_map
    from nativeq.compile.recurrent import CONVERTERS as RECURRENT_CONVERTERS

    known = set(onnx_convert_map()) | IMPORTER_BUILTIN_OPS | set(RECURRENT_CONVERTERS)
    missing: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        op = node.op_type
        if node.domain not in ("", "ai.onnx") and node.domain != "com.microsoft":
            missing.setdefault(f"{node.domain}.{op}", []).append(node.name or node.output[0])
        elif op not in known:
            qualified = op if node.domain in ("", "ai.onnx") else f"{node.domain}.{op}"
            missing.setdefault(qualified, []).append(node.name or node.output[0])
        elif op in ("QuantizeLinear", "DequantizeLinear") and _attr(node, "block_size", 0):
            missing.setdefault(f"{op} with block_size", []).append(node.name or node.output[0])
    for init in model.graph.initializer:
        if init.data_type in _INT4_TO_INT8:
            missing.setdefault(f"{TensorProto.DataType.Name(init.data_type)} initializer", []).append(init.name)
    if not missing:
        return
    parts = []
    for op, nodes in missing.items():
        shown = ", ".join(f"'{n}'" for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        parts.append(f"op '{op}' (node{'s' if len(nodes) > 1 else ''} {shown})")
    raise NativeqError("; ".join(parts) + " " + ("is" if len(parts) == 1 else "are") +
                       " not supported by the TVM ONNX importer")


# ---------------------------------------------------------------------------------------------
# Graph bookkeeping


class _Context:
    """Initializers by name, fresh names, and the opset a rewrite needs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = _default_opset(model)
        self.needs_opset = 0
        self.widened_int4: dict[str, int] = {}
        self.selected_ifs: list[tuple] = []  # (If node, output index, then name, else name) made by a select
        self.elem_types: dict[str, int] | None = None  # of the input graph, inferred on first use
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._new_inits: list[onnx.TensorProto] = []
        self._used = {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        for node in _all_nodes(self.graph):
            self._used.update(node.output)
            self._used.add(node.name)
        self.shapes, self.static_dims = _infer_shapes(model)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        """A new initializer holding `value`, named after `base`."""
        name = self.fresh(base)
        self.add_initializer(name, value)
        return name

    def add_initializer(self, name: str, value: np.ndarray) -> None:
        """Make `name` (the output of a node being removed) an initializer holding `value`."""
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.initializers[name] = tensor
        self._new_inits.append(tensor)

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer `name`, or None if it is computed at run time."""
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def rank(self, name: str) -> int | None:
        if name in self.initializers:
            return len(self.initializers[name].dims)
        return self.shapes.get(name)

    def require_opset(self, version: int) -> None:
        self.needs_opset = max(self.needs_opset, version)

    def flush_initializers(self) -> None:
        self.graph.initializer.extend(self._new_inits)
        self._new_inits = []
        used = {i for node in _all_nodes(self.graph) for i in node.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _check_default_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise NativeqError("model imports no default ONNX opset (opset_import has no '' / 'ai.onnx' entry)")


def _infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """Rank, and dims (an int, or None when symbolic), of every tensor shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - a model shape inference cannot type just gets fewer ranks
        inferred = model
    ranks, dims = {}, {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return ranks, dims


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Remove value_info entries for tensors no node produces any more or whose type changed."""
    produced = {o for node in model.graph.node for o in node.output}
    keep = [vi for vi in model.graph.value_info
            if vi.name in produced and vi.type.tensor_type.elem_type not in _INT4_TO_INT8]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _upgrade_opset(model: onnx.ModelProto, version: int, needed_for: str = "per-channel DequantizeLinear") -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, version)
    except Exception as err:  # noqa: BLE001
        raise NativeqError(
            f"model opset {_default_opset(model)} is too old for {needed_for} and "
            f"converting it to opset {version} failed: {str(err).splitlines()[0]}") from None


def _is_absent(node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) <= index or node.input[index] == ""


def _scale_axis(ctx: _Context, scale: str, data: str, axis_from_end: int) -> dict:
    """DequantizeLinear/QuantizeLinear attributes for `scale` applied to `data`.

    A scalar or one-element scale is per-tensor (no attribute); a 1-D scale is per-axis on
    the dimension `axis_from_end` counted from the end of `data`.
    """
    value = ctx.array(scale)
    if value is not None and value.size == 1:
        return {}
    if value is None and ctx.rank(scale) == 0:
        return {}
    ctx.require_opset(13)
    rank = ctx.rank(data)
    return {"axis": rank - axis_from_end if rank is not None else -axis_from_end}


def _axis_attr(ctx: _Context, scale: str, axis: int) -> dict:
    """`{"axis": axis}` when `scale` is a 1-D per-axis scale, `{}` when it is per-tensor."""
    value = ctx.array(scale)
    if (value is not None and value.size == 1) or (value is None and ctx.rank(scale) == 0):
        return {}
    ctx.require_opset(13)
    return {"axis": axis}


def _as_scalar(ctx: _Context, name: str) -> str:
    """A one-element initializer as a scalar initializer (DequantizeLinear's per-tensor form)."""
    if not name:
        return name
    value = ctx.array(name)
    if value is None or value.ndim == 0 or value.size != 1:
        return name
    return ctx.const(name + "_scalar", value.reshape(()))


_SHAPE_ARITHMETIC_OPS = {
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Slice", "Reshape",
    "Range", "Equal", "Where", "Expand", "ConstantOfShape", "Identity", "Floor", "Ceil", "Sqrt", "Pow", "Neg",
    "ReduceProd", "Max", "Min", "Mod", "Less", "Greater", "Not", "Size", "Transpose", "LessOrEqual", "GreaterOrEqual",
    "And", "Or",
}
# NOTE: only tensors this small are folded: shape arithmetic, never weights (their Q/DQ must stay visible).
_FOLD_MAX_ELEMENTS = 64


def fold_static_shape_arithmetic(ctx: _Context) -> bool:
    """Replace shape computations whose result is static (e.g. `x.shape[-1] // 3` of a dynamic-T tensor) by constants.

    Exporters compute slice bounds and reshape targets from `Shape` even when the dimension
    is static; TVM's importer then emits dynamic strided slices it cannot build. Only small
    tensors produced by shape-arithmetic ops are folded. Returns whether anything was folded.
    """
    from onnx.reference import ReferenceEvaluator

    consts: dict[str, np.ndarray] = {
        name: numpy_helper.to_array(t) for name, t in ctx.initializers.items() if np.prod(t.dims) <= _FOLD_MAX_ELEMENTS
    }
    static_dims = ctx.static_dims
    partial_shapes: dict[str, list] = {}  # Shape outputs with some symbolic dims: int or None per dim
    graph_outputs = {o.name for o in ctx.graph.output}
    kept = []
    for node in ctx.graph.node:
        value = None
        if node.domain in ("", "ai.onnx") and not any(o in graph_outputs for o in node.output):
            if node.op_type == "Constant":
                value = [numpy_helper.to_array(_attr(node, "value"))] if _attr(node, "value") is not None else None
            elif node.op_type == "Shape":
                value = _static_shape(node, static_dims, partial_shapes)
            elif node.op_type == "Size" and node.input[0] in partial_shapes:  # a rank: `x.dim()`
                value = [np.array(len(partial_shapes[node.input[0]]), np.int64)]
            elif node.op_type == "Gather" and node.input[0] in partial_shapes and node.input[1] in consts:
                value = _gather_static_dims(partial_shapes[node.input[0]], consts[node.input[1]])
            elif node.op_type in _SHAPE_ARITHMETIC_OPS and node.input and all(i == "" or i in consts for i in node.input):
                value = _evaluate(ReferenceEvaluator, node, consts)
        if value is None or any(v.size > _FOLD_MAX_ELEMENTS and node.op_type != "Constant" for v in value):
            kept.append(node)
            continue
        for name, v in zip(node.output, value):
            ctx.add_initializer(name, v)
            if v.size <= _FOLD_MAX_ELEMENTS:
                consts[name] = np.asarray(v)
    folded = len(kept) != len(ctx.graph.node)
    del ctx.graph.node[:]
    ctx.graph.node.extend(kept)
    return folded


def inline_constant_ifs(ctx: _Context, origins: dict) -> bool:
    """An If whose condition is a constant (often folded from shapes: `if x.dim() == 3`, a squeeze when a size
    is 1) -> the nodes of the branch it takes. Returns whether any If was inlined.

    TVM's importer turns If into Relax control flow outside any dataflow block, where nothing is fused or
    lowered to int8; the exporters' Ifs on shapes are decided once the sizes are known.
    """
    kept, inlined = [], False
    for node in ctx.graph.node:
        cond = ctx.array(node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if cond is None or cond.size != 1:
            kept.append(node)
            continue
        branch = _attr(node, "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        outputs, nodes = _inline_branch(ctx, branch, node.name)
        nodes += [helper.make_node("Identity", [src], [dst], name=ctx.fresh(f"{node.name}/{dst}"))
                  for src, dst in zip(outputs, node.output)]
        for new_node in nodes:
            origins[new_node.name] = origins.get(node.name, (node.op_type, node.name))
        kept.extend(nodes)
        inlined = True
    if inlined:
        del ctx.graph.node[:]
        ctx.graph.node.extend(kept)
    return inlined


def select_runtime_ifs(ctx: _Context, origins: dict) -> bool:
    """An If whose condition is computed at run time (a value of the data, an input such as a sample rate) ->
    both branches, then `Where(condition, then, else)` per output. ONNX ops have no side effects, so this
    computes the same values; it costs the branch not taken. Refused, naming the node, when shape inference
    cannot show the branches' outputs to be tensors of one type and shape (a select could not reproduce them).
    """
    if not any(node.op_type == "If" and node.domain in ("", "ai.onnx") for node in ctx.graph.node):
        return False
    kept, pairs = [], []
    for node in ctx.graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        then_out, nodes = _inline_branch(ctx, _attr(node, "then_branch"), f"{node.name}/then")
        else_out, else_nodes = _inline_branch(ctx, _attr(node, "else_branch"), f"{node.name}/else")
        nodes += else_nodes
        cond = node.input[0]
        if ctx.rank(cond) != 0:  # a one-element tensor of any rank: Where needs the scalar
            scalar = ctx.fresh(f"{cond}/scalar")
            nodes.append(helper.make_node("Reshape", [cond, ctx.const(f"{cond}/no_dims", np.zeros(0, np.int64))],
                                          [scalar], name=scalar))
            cond = scalar
        nodes += [helper.make_node("Where", [cond, t, e], [dst], name=ctx.fresh(f"{node.name}/{dst}"))
                  for t, e, dst in zip(then_out, else_out, node.output)]
        pairs += [(node, i, t, e) for i, (t, e) in enumerate(zip(then_out, else_out))]
        for new_node in nodes:
            origins[new_node.name] = origins.get(node.name, (node.op_type, node.name))
        kept.extend(nodes)
    del ctx.graph.node[:]
    ctx.graph.node.extend(kept)
    ctx.selected_ifs += pairs
    return True


def check_selected_ifs(ctx: _Context) -> None:
    """After folding: every output `select_runtime_ifs` made must select between tensors of one type and shape."""
    if not ctx.selected_ifs:
        return
    types = _value_types(ctx.model)
    for node, i, then_name, else_name in ctx.selected_ifs:
        then_type, else_type = types.get(then_name), types.get(else_name)
        if then_type is None or then_type != else_type:
            raise NativeqError(
                f"If node '{node.name}': its condition '{node.input[0]}' is computed at run time and its branches "
                f"give output {i} as {_type_text(then_type)} and {_type_text(else_type)}; nativeq compiles such an "
                "If only when both give the same type and shape (decide it at compile time: fix the sizes the "
                "condition depends on with --dim, or an input it reads with "
                f"--input-value {(_mode_inputs(ctx, node.input[0]) or ['NAME'])[0]}=VALUE)")
        if i == 0:
            modes = _mode_inputs(ctx, node.input[0])
            hint = f" (to decide it at compile time: --input-value {modes[0]}=VALUE)" if modes else ""
            warnings.warn(f"If node '{node.name}': condition '{node.input[0]}' is computed at run time; both "
                          f"branches run and the result is selected{hint}", stacklevel=3)


def _mode_inputs(ctx: _Context, name: str) -> list[str]:
    """Graph inputs of at most 4 elements (a sample rate, a mode flag) that tensor `name` is computed from."""
    producers = {out: node for node in ctx.graph.node for out in node.output}
    inputs = {vi.name: vi for vi in ctx.graph.input}
    found, seen, todo = [], set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in inputs:
            dims = ctx.static_dims.get(current)
            if dims is not None and None not in dims and int(np.prod(dims)) <= 4:
                found.append(current)
        elif current in producers:
            todo.extend(i for i in producers[current].input if i)
    return sorted(found)


def _inline_branch(ctx: _Context, branch: onnx.GraphProto, tag: str) -> tuple[list[str], list[onnx.NodeProto]]:
    """The nodes of an If branch for the graph around it, every name the branch defines made fresh (outer-scope
    names it reads are kept), its initializers moved to the graph; returns (its output names, its nodes)."""
    renamed: dict[str, str] = {}
    for init in branch.initializer:
        renamed[init.name] = ctx.const(f"{tag}/{init.name}", numpy_helper.to_array(init))
    nodes = []
    for old in branch.node:
        node = onnx.NodeProto()
        node.CopyFrom(old)
        node.name = ctx.fresh(f"{tag}/{old.name or old.output[0]}")
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        _rename_reads(node, renamed)
        for i, name in enumerate(node.output):
            if name:
                renamed[name] = node.output[i] = ctx.fresh(f"{tag}/{name}")
        nodes.append(node)
    return [renamed.get(o.name, o.name) for o in branch.output], nodes


def _rename_reads(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    """Names a node's subgraphs read from the scope around them, renamed."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                for i, name in enumerate(inner.input):
                    inner.input[i] = renamed.get(name, name)
                _rename_reads(inner, renamed)
            for out in g.output:
                out.name = renamed.get(out.name, out.name)


def _value_types(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name -> (elem type, dims) from shape inference, a dim an int or its symbol; names with an unknown
    dim are left out."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an untyped tensor is refused by the caller
        inferred = model
    types = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = value.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim)
        if None not in dims:
            types[value.name] = (t.tensor_type.elem_type, dims)
    for init in model.graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    return types


def _type_text(t) -> str:
    return "an untyped value" if t is None else f"{TensorProto.DataType.Name(t[0]).lower()}[{', '.join(map(str, t[1]))}]"


def _static_shape(node: onnx.NodeProto, static_dims: dict[str, list], partial_shapes: dict) -> list[np.ndarray] | None:
    dims = static_dims.get(node.input[0])
    if dims is None:
        return None
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    selected = dims[start:end]
    if any(d is None for d in selected):
        partial_shapes[node.output[0]] = selected
        return None
    return [np.array(selected, np.int64)]


def _gather_static_dims(dims: list, indices: np.ndarray) -> list[np.ndarray] | None:
    """`Gather(Shape(x), indices)` when every gathered dimension is static."""
    picked = np.asarray(indices).reshape(-1)
    if any(not -len(dims) <= i < len(dims) or dims[i] is None for i in picked):
        return None
    return [np.array([dims[i] for i in picked], np.int64).reshape(np.asarray(indices).shape)]


def _evaluate(evaluator_cls, node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    try:
        feeds = {i: consts[i] for i in node.input if i}
        return [np.asarray(v) for v in evaluator_cls(node).run(None, feeds)]
    except Exception:  # noqa: BLE001 - a node the reference evaluator cannot fold stays in the graph
        return None


# ---------------------------------------------------------------------------------------------
# Rewrites: each returns the replacement nodes, or None when it does not apply.


# Quantized types nativeq computes; QuantizeLinear/DequantizeLinear of any other type is refused.
_QUANTIZED_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, *_INT4_TO_INT8}


def _elem_types(ctx: _Context) -> dict[str, int]:
    """The element type of every tensor the input graph declares, initializes or shape inference types."""
    if ctx.elem_types is None:
        ctx.elem_types = _infer_elem_types(ctx.model)
    return ctx.elem_types


def _infer_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - a model shape inference cannot type just gets fewer types
        graph = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def refuse_unsupported_quantized_types(ctx: _Context) -> None:
    """Refuse QuantizeLinear/DequantizeLinear of a type nativeq does not compute (float8, float4, int2)."""
    nodes = [n for n in ctx.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return
    types = _elem_types(ctx)
    for node in nodes:
        base = node.name or node.output[0]
        if node.op_type == "QuantizeLinear":
            qtype = _attr(node, "output_dtype", 0) or (types.get(node.input[2], 0) if not _is_absent(node, 2) else 0) \
                or types.get(node.output[0], 0) or TensorProto.UINT8
            allowed = _QUANTIZED_TYPES
        else:
            qtype = types.get(node.input[0], 0)
            allowed = _QUANTIZED_TYPES | {TensorProto.INT32}
        name = TensorProto.DataType.Name(qtype).lower() if qtype else "unknown"
        if qtype and qtype not in allowed:
            raise NativeqError(f"{node.op_type} node '{base}': {name} quantization is not supported "
                               "(nativeq computes int8/uint8, int16/uint16 and int4/uint4)")


def widen_int4_initializers(ctx: _Context) -> None:
    """INT4/UINT4 initializers, graph inputs and outputs -> INT8/UINT8 with the same values.

    The importer cannot read 4-bit data; the artifact declares 4-bit inputs and outputs as such and
    carries them across DLPack (which has no 4-bit type) as int8/uint8 (`runtime/model.py`).
    """
    for i, init in enumerate(ctx.graph.initializer):
        if init.data_type in _INT4_TO_INT8:
            ctx.widened_int4[init.name] = init.data_type
            wide_dtype = helper.tensor_dtype_to_np_dtype(_INT4_TO_INT8[init.data_type])
            wide = numpy_helper.from_array(numpy_helper.to_array(init).astype(wide_dtype), init.name)
            ctx.graph.initializer[i].CopyFrom(wide)
            ctx.initializers[init.name] = ctx.graph.initializer[i]
    for info in [*ctx.graph.input, *ctx.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type in _INT4_TO_INT8:
            ctx.widened_int4[info.name] = tensor_type.elem_type
            tensor_type.elem_type = _INT4_TO_INT8[tensor_type.elem_type]


def fold_constant_quantize(node: onnx.NodeProto, ctx: _Context):
    """QuantizeLinear of a float initializer (per-tensor or per-axis) -> the integer initializer ORT computes.

    Producers that keep float weights behind a Q/DQ pair (NNCF, PyTorch's PT2E export, fake-quant graphs)
    write `W_float -> QuantizeLinear -> DequantizeLinear -> MatMul`; folded, the weight is the integer
    initializer behind a DequantizeLinear that `quantize_static` writes, and the int8 rewrite takes the site.
    Computed as ONNX Runtime's kernel does: saturate(round_half_even(x / scale) + zero_point), the division
    in float32. 4-bit outputs are stored widened to 8 bits with the 4-bit range (as `widen_int4_initializers`).
    """
    if node.op_type != "QuantizeLinear" or _attr(node, "block_size", 0):
        return None
    x, scale = ctx.array(node.input[0]), ctx.array(node.input[1])
    zp = None if _is_absent(node, 2) else ctx.array(node.input[2])
    if x is None or scale is None or (zp is None and not _is_absent(node, 2)):
        return None
    if x.dtype != np.float32 or scale.dtype != np.float32 or x.ndim == 0:
        return None
    four_bit = _four_bit_output(node, ctx)
    out_type = _attr(node, "output_dtype", 0)
    if zp is not None:
        dtype = zp.dtype
    elif four_bit is not None:
        dtype = helper.tensor_dtype_to_np_dtype(_INT4_TO_INT8[four_bit])
    else:
        dtype = helper.tensor_dtype_to_np_dtype(out_type) if out_type else np.dtype(np.uint8)
    if np.dtype(dtype) not in (np.int8, np.uint8, np.int16, np.uint16):
        return None
    lo, hi = _INT4_RANGE[four_bit] if four_bit is not None else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[_attr(node, "axis", 1) % x.ndim] = -1
    offset = np.zeros(()) if zp is None else zp.astype(np.float64).reshape(shape if zp.size > 1 else ())
    rounded = np.rint(x / scale.reshape(shape if scale.size > 1 else ())).astype(np.float64)
    value = np.clip(rounded + offset, lo, hi).astype(dtype)
    folded = ctx.const(node.output[0] + "_folded", value)
    return [helper.make_node("Identity", [folded], list(node.output), name=node.name or ctx.fresh("folded_q"))]


def _four_bit_output(node: onnx.NodeProto, ctx: _Context) -> int | None:
    """INT4/UINT4 when the QuantizeLinear `node` produces 4-bit values (its output_dtype, else its zero point's type
    before widening), else None."""
    out_type = _attr(node, "output_dtype", 0)
    if out_type in _INT4_TO_INT8:
        return out_type
    return None if _is_absent(node, 2) else ctx.widened_int4.get(node.input[2])


def quantize_int4_to_int8_clip(node: onnx.NodeProto, ctx: _Context):
    """QuantizeLinear to INT4/UINT4 -> QuantizeLinear to INT8/UINT8 -> Clip to the 4-bit range."""
    if node.op_type != "QuantizeLinear":
        return None
    out_type = _attr(node, "output_dtype", 0)
    four_bit = _four_bit_output(node, ctx)
    if four_bit is None:
        return None
    lo, hi = _INT4_RANGE[four_bit]
    wide = helper.tensor_dtype_to_np_dtype(_INT4_TO_INT8[four_bit])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "output_dtype"}
    if out_type:
        attrs["output_dtype"] = _INT4_TO_INT8[four_bit]
    q8 = ctx.fresh(node.output[0] + "_q8")
    lo_name = ctx.const(node.output[0] + "_lo", np.array(lo, wide))
    hi_name = ctx.const(node.output[0] + "_hi", np.array(hi, wide))
    return [
        helper.make_node("QuantizeLinear", list(node.input), [q8], name=ctx.fresh(node.name + "_q8"), **attrs),
        helper.make_node("Clip", [q8, lo_name, hi_name], list(node.output), name=ctx.fresh(node.name + "_clip4")),
    ]


def blocked_to_elementwise(node: onnx.NodeProto, ctx: _Context):
    """Blocked QuantizeLinear, and blocked DequantizeLinear of run-time tensors -> float32 elementwise ops.

    The scale (and zero point) is repeated `block_size` times along `axis` and cut to the input's
    length (Unsqueeze, Expand, Reshape, Slice; the input's shape must be static); then, as ONNX
    defines them in float32, DequantizeLinear is `(x - zp) * scale` and QuantizeLinear
    `saturate(round_half_even(x / scale) + zp)`.
    """
    block = _attr(node, "block_size", 0)
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or not block:
        return None
    x, scale, zp = node.input[0], node.input[1], _input(node, 2)
    if node.op_type == "DequantizeLinear" and all(ctx.array(n) is not None for n in (x, scale, zp) if n):
        return None  # constants: folded by fold_blocked_dequantize
    base, out = node.name or node.output[0], node.output[0]
    types = _elem_types(ctx)
    if node.op_type == "QuantizeLinear":
        qtype = _attr(node, "output_dtype", 0) or types.get(zp, 0) or TensorProto.UINT8
    else:
        qtype = types.get(x, 0)
    what = f"{node.op_type} node '{base}': blocked ({_type_label(qtype)}, block_size={block})"
    dims = ctx.static_dims.get(x)
    if dims is None or any(d is None for d in dims):
        raise NativeqError(f"{what} needs the static shape of its input '{x}', which is not known")
    if types.get(scale, TensorProto.FLOAT) != TensorProto.FLOAT:
        raise NativeqError(f"{what} with a {_type_label(types.get(scale, 0))} scale is not supported (float32 only)")
    axis = _attr(node, "axis", 1) % len(dims)
    nodes: list = []

    def make(op, inputs, **attrs):
        result = ctx.fresh(f"{out}_{op.lower()}")
        nodes.append(helper.make_node(op, inputs, [result], name=ctx.fresh(f"{base}_{op}"), **attrs))
        return result

    def expand(name):
        blocks = -(-dims[axis] // block)
        shape = list(dims[:axis]) + [blocks, block] + list(dims[axis + 1:])
        merged = list(dims[:axis]) + [blocks * block] + list(dims[axis + 1:])
        t = make("Unsqueeze", [name, ctx.const(f"{out}_axes", np.array([axis + 1], np.int64))])
        t = make("Expand", [t, ctx.const(f"{out}_blocks", np.array(shape, np.int64))])
        t = make("Reshape", [t, ctx.const(f"{out}_merged", np.array(merged, np.int64))])
        if blocks * block != dims[axis]:
            t = make("Slice", [t, ctx.const(f"{out}_start", np.array([0], np.int64)),
                               ctx.const(f"{out}_end", np.array([dims[axis]], np.int64)),
                               ctx.const(f"{out}_axis", np.array([axis], np.int64))])
        return t

    scale_e = expand(scale)
    zp_f = make("Cast", [expand(zp)], to=TensorProto.FLOAT) if zp else None
    if node.op_type == "DequantizeLinear":
        centered = make("Cast", [x], to=TensorProto.FLOAT)
        if zp_f:
            centered = make("Sub", [centered, zp_f])
        nodes.append(helper.make_node("Mul", [centered, scale_e], [out], name=ctx.fresh(f"{base}_Mul")))
        return nodes
    if qtype in _INT4_RANGE:
        lo, hi = _INT4_RANGE[qtype]
    else:
        info = np.iinfo(helper.tensor_dtype_to_np_dtype(qtype))
        lo, hi = int(info.min), int(info.max)
    y = make("Round", [make("Div", [x, scale_e])])
    if zp_f:
        y = make("Add", [y, zp_f])
    lo_name = ctx.const(f"{out}_qmin", np.array(lo, np.float32))
    y = make("Clip", [y, lo_name, ctx.const(f"{out}_qmax", np.array(hi, np.float32))])
    nodes.append(helper.make_node("Cast", [y], [out], name=ctx.fresh(f"{base}_Cast"), to=_INT4_TO_INT8.get(qtype, qtype)))
    ctx.require_opset(13)
    return nodes


def _type_label(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower() if elem else "unknown type"


def fold_blocked_dequantize(node: onnx.NodeProto, ctx: _Context):
    """Blocked DequantizeLinear of constants -> float initializer `(x - zp) * scale` (as ORT computes it)."""
    if node.op_type != "DequantizeLinear" or not _attr(node, "block_size", 0):
        return None
    block = _attr(node, "block_size")
    x = ctx.array(node.input[0])
    scale = ctx.array(node.input[1])
    zp = None if _is_absent(node, 2) else ctx.array(node.input[2])
    if x is None or scale is None or (not _is_absent(node, 2) and zp is None):
        raise NativeqError(f"DequantizeLinear node '{node.name or node.output[0]}': blocked "
                           f"({_type_name(ctx, node.input[0])}, block_size={block}) dequantization of a run-time "
                           "tensor is not supported; only blocked weights stored as initializers are")
    axis = _attr(node, "axis", 1) % x.ndim

    def expand(v):
        return np.repeat(v, block, axis=axis).take(range(x.shape[axis]), axis=axis)

    centered = x.astype(np.int32) - (expand(zp).astype(np.int32) if zp is not None else 0)
    out_dtype = scale.dtype
    if _attr(node, "output_dtype", 0):
        out_dtype = helper.tensor_dtype_to_np_dtype(_attr(node, "output_dtype"))
    value = (centered.astype(np.float32) * expand(scale).astype(np.float32)).astype(out_dtype)
    folded = ctx.const(node.output[0] + "_folded", value)
    return [helper.make_node("Identity", [folded], list(node.output), name=node.name or ctx.fresh("blocked_dq"))]


def qlinear_matmul_to_qdq(node: onnx.NodeProto, ctx: _Context):
    """QLinearMatMul -> DequantizeLinear(a), DequantizeLinear(b) -> MatMul -> QuantizeLinear."""
    if node.op_type != "QLinearMatMul":
        return None
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = node.input
    types = _elem_types(ctx)
    if types.get(a_s, TensorProto.FLOAT) != TensorProto.FLOAT:
        return _qlinear_matmul_exact(node, ctx, types)
    a_s, a_zp, b_s, b_zp, y_s, y_zp = (_as_scalar(ctx, s) for s in (a_s, a_zp, b_s, b_zp, y_s, y_zp))
    a_f, b_f, y_f = (ctx.fresh(f"{node.output[0]}_{t}") for t in ("a_f", "b_f", "f"))
    base = node.name or node.output[0]
    return [
        helper.make_node("DequantizeLinear", [a, a_s, a_zp], [a_f], name=ctx.fresh(base + "_DQ_a"),
                         **_scale_axis(ctx, a_s, a, 2)),
        helper.make_node("DequantizeLinear", [b, b_s, b_zp], [b_f], name=ctx.fresh(base + "_DQ_b"),
                         **_scale_axis(ctx, b_s, b, 1)),
        helper.make_node("MatMul", [a_f, b_f], [y_f], name=ctx.fresh(base + "_MatMul")),
        helper.make_node("QuantizeLinear", [y_f, y_s, y_zp], list(node.output), name=ctx.fresh(base + "_Q")),
    ]


def _qlinear_matmul_exact(node: onnx.NodeProto, ctx: _Context, types: dict[str, int]):
    """QLinearMatMul with float16/bfloat16 scales, as ONNX defines it: the int32 product (MatMulInteger)
    times `a_scale * b_scale / y_scale` (computed in the scales' type) in float64, rounded half to even,
    plus y_zero_point, saturated.

    The QDQ form, computed in float16, comes out a step off.
    """
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = node.input
    base, out = node.name or node.output[0], node.output[0]
    qtype = types.get(y_zp, 0) or types.get(a, TensorProto.UINT8)
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(qtype))
    nodes: list = []
    a_zp, b_zp, y_zp = (_scalar_of(ctx, z, nodes) if _one_element(ctx, z) else z for z in (a_zp, b_zp, y_zp))
    acc, acc_d, ab_s, m, m_d, d, r, zp_d, shifted = (ctx.fresh(f"{out}_{t}") for t in (
        "acc", "acc_f64", "ab_scale", "multiplier", "multiplier_f64", "scaled", "rounded", "zp_f64", "shifted"))
    lo = ctx.const(f"{out}_qmin", np.array(info.min, np.float64))
    hi = ctx.const(f"{out}_qmax", np.array(info.max, np.float64))
    clipped = ctx.fresh(f"{out}_clipped")

    def make(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=ctx.fresh(f"{base}_{op}"), **attrs))

    make("MatMulInteger", [a, b, a_zp, b_zp], [acc])
    make("Cast", [acc], [acc_d], to=TensorProto.DOUBLE)
    make("Mul", [a_s, b_s], [ab_s])
    make("Div", [ab_s, y_s], [m])
    make("Cast", [m], [m_d], to=TensorProto.DOUBLE)
    make("Mul", [acc_d, m_d], [d])
    make("Round", [d], [r])
    make("Cast", [y_zp], [zp_d], to=TensorProto.DOUBLE)
    make("Add", [r, zp_d], [shifted])
    make("Clip", [shifted, lo, hi], [clipped])
    make("Cast", [clipped], list(node.output), to=qtype)
    ctx.require_opset(12)
    return nodes


def qlinear_conv_to_qdq(node: onnx.NodeProto, ctx: _Context):
    """QLinearConv -> DequantizeLinear(x, w, int32 bias) -> Conv -> QuantizeLinear."""
    if node.op_type != "QLinearConv":
        return None
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (list(node.input) + [""] * 8)[:8]
    x_s, x_zp, w_s, w_zp, y_s, y_zp = (_as_scalar(ctx, s) for s in (x_s, x_zp, w_s, w_zp, y_s, y_zp))
    base = node.name or node.output[0]
    x_f, w_f, y_f = (ctx.fresh(f"{node.output[0]}_{t}") for t in ("x_f", "w_f", "f"))
    nodes = [
        helper.make_node("DequantizeLinear", [x, x_s] + ([x_zp] if x_zp else []), [x_f], name=ctx.fresh(base + "_DQ_x")),
        helper.make_node("DequantizeLinear", [w, w_s] + ([w_zp] if w_zp else []), [w_f], name=ctx.fresh(base + "_DQ_w"),
                         **_axis_attr(ctx, w_s, 0)),
    ]
    conv_inputs = [x_f, w_f]
    if not _is_absent(node, 8):
        bias_scale = _bias_scale(node, ctx, x_s, w_s, nodes)
        b_f = ctx.fresh(f"{node.output[0]}_bias_f")
        nodes.append(helper.make_node("DequantizeLinear", [node.input[8], bias_scale], [b_f],
                                      name=ctx.fresh(base + "_DQ_bias"), **_axis_attr(ctx, bias_scale, 0)))
        conv_inputs.append(b_f)
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes.append(helper.make_node("Conv", conv_inputs, [y_f], name=ctx.fresh(base + "_Conv"), **conv_attrs))
    nodes.append(helper.make_node("QuantizeLinear", [y_f, y_s] + ([y_zp] if y_zp else []), list(node.output),
                                  name=ctx.fresh(base + "_Q")))
    return nodes


def _bias_scale(node, ctx: _Context, x_s: str, w_s: str, nodes: list) -> str:
    """The scale of QLinearConv's int32 bias, `x_scale * w_scale` (a constant when both are)."""
    xv, wv = ctx.array(x_s), ctx.array(w_s)
    if xv is not None and wv is not None:
        return ctx.const(f"{node.output[0]}_bias_scale", (xv.astype(np.float32) * wv.astype(np.float32)).astype(np.float32))
    out = ctx.fresh(f"{node.output[0]}_bias_scale")
    nodes.append(helper.make_node("Mul", [x_s, w_s], [out], name=ctx.fresh((node.name or out) + "_bias_scale")))
    return out


def conv_integer_to_exact_float(node: onnx.NodeProto, ctx: _Context):
    """ConvInteger -> DequantizeLinear(scale 1) -> float Conv (sliced over input channels) -> Cast(int32) (-> Add)."""
    if node.op_type != "ConvInteger":
        return None
    x, w = node.input[0], node.input[1]
    x_zp = "" if _is_absent(node, 2) else node.input[2]
    w_zp = "" if _is_absent(node, 3) else node.input[3]
    base = node.name or node.output[0]
    wv = ctx.array(w)
    zpv = np.zeros((), np.int32) if not w_zp else ctx.array(w_zp)
    if wv is None or zpv is None:
        return _conv_integer_runtime_weight(node, ctx, base, x_zp, w_zp)
    group = _attr(node, "group", 1)
    zp_full = zpv.astype(np.int32).reshape((-1,) + (1,) * (wv.ndim - 1))
    centered = np.abs(wv.astype(np.int32) - zp_full)  # |w - w_zp|, [M, C/group, k...]
    # Largest |x - x_zp| is 255 for 8-bit data; the bound is per output channel over one slice.
    slices = _channel_slices(centered, max_abs_x=255)
    if len(slices) > 1 and group != 1:
        raise NativeqError(f"ConvInteger node '{base}': grouped convolution with more than "
                           f"{FLOAT32_EXACT_INT} possible accumulation is not supported")
    one = ctx.const(f"{node.output[0]}_one", np.array(1.0, np.float32))
    x_f = ctx.fresh(f"{node.output[0]}_x_f")
    nodes = [helper.make_node("DequantizeLinear", [x, one] + ([x_zp] if x_zp else []), [x_f],
                              name=ctx.fresh(base + "_DQ_x"))]
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w_float = (wv.astype(np.int32) - zp_full).astype(np.float32)  # exact: |w - zp| <= 255
    partials = []
    for lo, hi in slices:
        x_in = x_f
        if len(slices) > 1:
            x_in = ctx.fresh(f"{node.output[0]}_x_f_{lo}_{hi}")
            nodes.append(helper.make_node(
                "Slice", [x_f, ctx.const("slice_start", np.array([lo], np.int64)),
                          ctx.const("slice_end", np.array([hi], np.int64)), ctx.const("slice_axis", np.array([1], np.int64))],
                [x_in], name=ctx.fresh(f"{base}_slice_{lo}_{hi}")))
        w_name = ctx.const(f"{w}_f_{lo}_{hi}" if len(slices) > 1 else f"{w}_f", w_float[:, lo:hi])
        conv_out, cast_out = ctx.fresh(f"{node.output[0]}_conv_{lo}"), ctx.fresh(f"{node.output[0]}_i32_{lo}")
        nodes.append(helper.make_node("Conv", [x_in, w_name], [conv_out], name=ctx.fresh(f"{base}_Conv_{lo}"), **conv_attrs))
        nodes.append(helper.make_node("Cast", [conv_out], [cast_out], name=ctx.fresh(f"{base}_Cast_{lo}"), to=TensorProto.INT32))
        partials.append(cast_out)
    total = partials[0]
    for k, p in enumerate(partials[1:], start=1):
        out = node.output[0] if k == len(partials) - 1 else ctx.fresh(f"{node.output[0]}_sum_{k}")
        nodes.append(helper.make_node("Add", [total, p], [out], name=ctx.fresh(f"{base}_Add_{k}")))
        total = out
    if len(partials) == 1:
        nodes[-1].output[0] = node.output[0]
    return nodes


def _conv_integer_runtime_weight(node: onnx.NodeProto, ctx: _Context, base: str, x_zp: str, w_zp: str):
    """ConvInteger of a run-time weight -> DequantizeLinear(scale 1) of x and w -> float Conv -> Cast(int32).

    Exact when every partial sum is an integer of magnitude <= 2**24: with 8-bit data each product
    |x - x_zp| * |w - w_zp| is at most 255 * 255, so the weight's static shape must keep
    `C/group * prod(kernel) * 255 * 255` within that bound.
    """
    x, w = node.input[0], node.input[1]
    dims = ctx.static_dims.get(w)
    if dims is None or any(d is None for d in dims):
        raise NativeqError(f"ConvInteger node '{base}': the run-time weight '{w}' has no static shape, "
                           "needed to prove the float rewrite exact")
    terms = int(np.prod(dims[1:]))
    if terms * 255 * 255 > FLOAT32_EXACT_INT:
        raise NativeqError(f"ConvInteger node '{base}': the run-time weight '{w}' sums {terms} products per output, "
                           f"more than a float32 Conv computes exactly (make the weight an initializer)")
    one = ctx.const(f"{node.output[0]}_one", np.array(1.0, np.float32))
    x_f, w_f, conv_out = (ctx.fresh(f"{node.output[0]}_{t}") for t in ("x_f", "w_f", "conv"))
    nodes = []
    w_inputs, w_attrs = [w, one], {}
    if w_zp:
        if _one_element(ctx, w_zp):
            w_inputs.append(_scalar_of(ctx, w_zp, nodes))
        else:  # per output channel: a scale of ones of the same length
            w_inputs[1:] = [ctx.const(f"{node.output[0]}_ones", np.ones(dims[0], np.float32)), w_zp]
            w_attrs = {"axis": 0}
            ctx.require_opset(13)
    x_inputs = [x, one] + ([_scalar_of(ctx, x_zp, nodes)] if x_zp else [])
    conv_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return nodes + [
        helper.make_node("DequantizeLinear", x_inputs, [x_f], name=ctx.fresh(base + "_DQ_x")),
        helper.make_node("DequantizeLinear", w_inputs, [w_f], name=ctx.fresh(base + "_DQ_w"), **w_attrs),
        helper.make_node("Conv", [x_f, w_f], [conv_out], name=ctx.fresh(base + "_Conv"), **conv_attrs),
        helper.make_node("Cast", [conv_out], list(node.output), name=ctx.fresh(base + "_Cast"), to=TensorProto.INT32),
    ]


def _one_element(ctx: _Context, name: str) -> bool:
    """`name` is a scalar or a 1-D tensor of one element (by its value or its static shape)."""
    value = ctx.array(name)
    if value is not None:
        return value.size == 1
    return ctx.rank(name) == 0 or ctx.static_dims.get(name) == [1]


def _scalar_of(ctx: _Context, name: str, nodes: list) -> str:
    """A scalar or one-element tensor `name` as a scalar (a Reshape appended to `nodes` when it is computed at run time)."""
    if ctx.array(name) is not None or ctx.rank(name) == 0:
        return _as_scalar(ctx, name)
    out = ctx.fresh(f"{name}_scalar")
    shape = ctx.const(f"{name}_scalar_shape", np.zeros(0, np.int64))
    nodes.append(helper.make_node("Reshape", [name, shape], [out], name=ctx.fresh(f"{name}_to_scalar")))
    return out


def _type_name(ctx: _Context, name: str) -> str:
    init = ctx.initializers.get(name)
    return _type_label(init.data_type if init is not None else _elem_types(ctx).get(name, 0))


def _channel_slices(centered_w: np.ndarray, max_abs_x: int) -> list[tuple[int, int]]:
    """Split input channels so that, per output channel, sum |x - zx| * |w - zw| <= 2**24 in each slice."""
    per_channel = centered_w.reshape(centered_w.shape[0], centered_w.shape[1], -1).sum(axis=2) * max_abs_x  # [M, C]
    slices, start, acc = [], 0, np.zeros(per_channel.shape[0], np.int64)
    for c in range(per_channel.shape[1]):
        if c > start and (acc + per_channel[:, c]).max() > FLOAT32_EXACT_INT:
            slices.append((start, c))
            start, acc = c, np.zeros_like(acc)
        acc += per_channel[:, c]
        if acc.max() > FLOAT32_EXACT_INT:
            raise NativeqError("ConvInteger: one input channel alone can exceed the float32-exact range "
                               f"({FLOAT32_EXACT_INT}); kernel too large for an exact rewrite")
    slices.append((start, per_channel.shape[1]))
    return slices


# com.microsoft QOperator ops (what `quantize_static(quant_format=QOperator)` writes): the
# positions of the (tensor, scale, zero point) triplets among the inputs, the (scale, zero
# point) of the output, and the float op computed in between.
_MS_QLINEAR = {
    "QLinearAdd": ([(0, 1, 2), (3, 4, 5)], (6, 7), "Add"),
    "QLinearMul": ([(0, 1, 2), (3, 4, 5)], (6, 7), "Mul"),
    "QLinearSigmoid": ([(0, 1, 2)], (3, 4), "Sigmoid"),
    "QLinearLeakyRelu": ([(0, 1, 2)], (3, 4), "LeakyRelu"),
    "QLinearSoftmax": ([(0, 1, 2)], (3, 4), "Softmax"),
    "QLinearGlobalAveragePool": ([(0, 1, 2)], (3, 4), "GlobalAveragePool"),
    "QLinearAveragePool": ([(0, 1, 2)], (3, 4), "AveragePool"),
}
_MS_DROPPED_ATTRS = {"opset", "channels_last"}


def ms_qlinear_to_qdq(node: onnx.NodeProto, ctx: _Context):
    """com.microsoft QLinearAdd/Mul/Sigmoid/LeakyRelu/Softmax/(Global)AveragePool -> DequantizeLinear -> float op -> QuantizeLinear."""
    if node.domain != "com.microsoft" or node.op_type not in _MS_QLINEAR:
        return None
    triplets, (y_s, y_zp), float_op = _MS_QLINEAR[node.op_type]
    base = node.name or node.output[0]
    if _attr(node, "channels_last", 0):
        raise NativeqError(f"{node.op_type} node '{base}' with channels_last=1 is not supported")
    if node.op_type == "QLinearSoftmax" and _attr(node, "opset", 13) < 13:
        raise NativeqError(f"QLinearSoftmax node '{base}' uses opset-{_attr(node, 'opset')} Softmax semantics; "
                           "only opset >= 13 is supported")
    nodes, float_inputs = [], []
    for k, (x, scale, zp) in enumerate(triplets):
        float_inputs.append(_dequantize(ctx, node, nodes, x, scale, zp, f"in{k}"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in _MS_DROPPED_ATTRS}
    y_f = ctx.fresh(f"{node.output[0]}_f")
    nodes.append(helper.make_node(float_op, float_inputs, [y_f], name=ctx.fresh(f"{base}_{float_op}"), **attrs))
    nodes.append(_quantize(ctx, node, y_f, node.input[y_s], _input(node, y_zp)))
    return nodes


def ms_qlinear_concat_to_qdq(node: onnx.NodeProto, ctx: _Context):
    """com.microsoft QLinearConcat(y_s, y_zp, (x, x_s, x_zp)...) -> DequantizeLinear each -> Concat -> QuantizeLinear."""
    if node.domain != "com.microsoft" or node.op_type != "QLinearConcat":
        return None
    nodes, float_inputs = [], []
    for k in range(2, len(node.input), 3):
        float_inputs.append(_dequantize(ctx, node, nodes, k, k + 1, k + 2, f"in{(k - 2) // 3}"))
    y_f = ctx.fresh(f"{node.output[0]}_f")
    nodes.append(helper.make_node("Concat", float_inputs, [y_f], name=ctx.fresh(f"{node.name or y_f}_Concat"),
                                  axis=_attr(node, "axis")))
    nodes.append(_quantize(ctx, node, y_f, node.input[0], _input(node, 1)))
    return nodes


def ms_qgemm_to_qdq(node: onnx.NodeProto, ctx: _Context):
    """com.microsoft QGemm -> DequantizeLinear(A, B, int32 bias) -> Gemm (-> QuantizeLinear when y_scale is given)."""
    if node.domain != "com.microsoft" or node.op_type != "QGemm":
        return None
    base = node.name or node.output[0]
    alpha, trans_b = _attr(node, "alpha", 1.0), _attr(node, "transB", 0)
    if alpha != 1.0:
        raise NativeqError(f"QGemm node '{base}' has alpha={alpha}; only alpha=1 is supported")
    nodes = []
    a_f = _dequantize(ctx, node, nodes, 0, 1, 2, "a")
    b_scale = _as_scalar(ctx, node.input[4])
    b_f = ctx.fresh(f"{node.output[0]}_b_f")
    b_axis = _axis_attr(ctx, b_scale, 0 if trans_b else 1)
    b_zp = _as_scalar(ctx, _input(node, 5))
    nodes.append(helper.make_node("DequantizeLinear", [node.input[3], b_scale] + ([b_zp] if b_zp else []),
                                  [b_f], name=ctx.fresh(f"{base}_DQ_b"), **b_axis))
    gemm_inputs = [a_f, b_f]
    if _input(node, 6):
        bias_scale = _bias_scale(node, ctx, _as_scalar(ctx, node.input[1]), b_scale, nodes)
        c_f = ctx.fresh(f"{node.output[0]}_c_f")
        nodes.append(helper.make_node("DequantizeLinear", [node.input[6], bias_scale], [c_f], name=ctx.fresh(f"{base}_DQ_c"),
                                      **_axis_attr(ctx, bias_scale, 0)))
        gemm_inputs.append(c_f)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    quantized_output = bool(_input(node, 7))
    y_f = ctx.fresh(f"{node.output[0]}_f") if quantized_output else node.output[0]
    nodes.append(helper.make_node("Gemm", gemm_inputs, [y_f], name=ctx.fresh(f"{base}_Gemm"), **attrs))
    if quantized_output:
        nodes.append(_quantize(ctx, node, y_f, node.input[7], _input(node, 8)))
    return nodes


def prelu_to_where(node: onnx.NodeProto, ctx: _Context):
    """PRelu -> Where(Less(x, 0), Mul(x, slope), x), its definition (the slope broadcasts to x by ONNX's rules).

    TVM's importer makes a one-element slope a per-channel one on the last axis, whose legalization needs that
    axis static (a waveform model's time axis is not), and a per-channel slope on another axis a transpose of
    the whole tensor there and back around the comparison."""
    if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
        return None
    x, slope = node.input
    elem = _elem_types(ctx).get(x, TensorProto.FLOAT)
    base = node.name or node.output[0]
    zero = ctx.const(f"{base}_zero", np.zeros((), helper.tensor_dtype_to_np_dtype(elem)))
    negative, scaled = ctx.fresh(f"{node.output[0]}_negative"), ctx.fresh(f"{node.output[0]}_scaled")
    return [helper.make_node("Less", [x, zero], [negative], name=ctx.fresh(f"{base}_Less")),
            helper.make_node("Mul", [x, slope], [scaled], name=ctx.fresh(f"{base}_Mul")),
            helper.make_node("Where", [negative, scaled, x], list(node.output), name=ctx.fresh(f"{base}_Where"))]


def stft_to_conv(node: onnx.NodeProto, ctx: _Context):
    """STFT of a real signal with a constant frame step, window and frame length -> one strided Conv with the
    windowed DFT basis (the rows cos and -sin of 2πkn/N times the window), reshaped and transposed to ONNX's
    [batch, frames, bins, 2]. TVM's importer has no STFT (`torch.stft` exports one at opset 17: a waveform model's
    spectrogram front end); a conv is also what runs fast. The sums are the DFT's; ORT computes them by an FFT, so
    they agree to float32 rounding."""
    if node.op_type != "STFT" or node.domain not in ("", "ai.onnx"):
        return None
    signal, step_name = node.input[0], node.input[1]
    window = _constant(ctx, _input(node, 2))
    frame_length = _constant(ctx, _input(node, 3))
    step = _constant(ctx, step_name)
    rank = ctx.rank(signal)
    last = (ctx.static_dims.get(signal) or [None])[-1] if rank == 3 else 1
    if step is None or (window is None and frame_length is None) or rank not in (2, 3) or last != 1:
        return None  # complex or unknown signals, run-time framing: check_importable names the node
    if (_input(node, 2) and window is None) or (_input(node, 3) and frame_length is None):
        return None
    length = int(frame_length) if frame_length is not None else int(window.shape[0])
    window = np.ones(length) if window is None else np.asarray(window, np.float64)
    if window.shape != (length,):
        return None
    bins = length // 2 + 1 if _attr(node, "onesided", 1) else length
    angle = 2 * np.pi * np.outer(np.arange(bins), np.arange(length)) / length
    basis = np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])[:, None, :].astype(np.float32)
    base = node.name or node.output[0]
    frames_in, spectrum, split = (ctx.fresh(f"{node.output[0]}_{tag}") for tag in ("frames_in", "spectrum", "split"))
    if rank == 2:
        to_channels = helper.make_node("Unsqueeze", [signal, ctx.const(f"{base}_axis", np.array([1], np.int64))],
                                       [frames_in], name=ctx.fresh(f"{base}_Unsqueeze"))
    else:
        to_channels = helper.make_node("Transpose", [signal], [frames_in], perm=[0, 2, 1], name=ctx.fresh(f"{base}_T"))
    return [to_channels,
            helper.make_node("Conv", [frames_in, ctx.const(f"{base}_dft", basis)], [spectrum], kernel_shape=[length],
                             strides=[int(step)], name=ctx.fresh(f"{base}_Conv")),
            helper.make_node("Reshape", [spectrum, ctx.const(f"{base}_shape", np.array([0, 2, bins, -1], np.int64))],
                             [split], name=ctx.fresh(f"{base}_Reshape")),
            helper.make_node("Transpose", [split], list(node.output), perm=[0, 3, 2, 1], name=ctx.fresh(f"{base}_Out"))]


def _constant(ctx: _Context, name: str) -> np.ndarray | None:
    """The value of `name`: an initializer or a Constant node's output; None when computed at run time or absent."""
    if not name:
        return None
    value = ctx.array(name)
    if value is not None:
        return value
    producer = next((n for n in ctx.graph.node if name in n.output and n.op_type == "Constant"), None)
    attribute = None if producer is None else next((a for a in producer.attribute if a.name == "value"), None)
    return None if attribute is None else numpy_helper.to_array(attribute.t)


def _input(node: onnx.NodeProto, index: int) -> str:
    return "" if _is_absent(node, index) else node.input[index]


def _dequantize(ctx: _Context, node, nodes: list, x, scale, zp, tag: str) -> str:
    """Append a per-tensor DequantizeLinear of input positions (x, scale, zp) of `node`; return its output."""
    x, scale, zp = node.input[x], _as_scalar(ctx, node.input[scale]), _as_scalar(ctx, _input(node, zp))
    out = ctx.fresh(f"{node.output[0]}_{tag}_f")
    nodes.append(helper.make_node("DequantizeLinear", [x, scale] + ([zp] if zp else []), [out],
                                  name=ctx.fresh(f"{node.name or out}_DQ_{tag}")))
    return out


def _quantize(ctx: _Context, node, y_f: str, scale: str, zp: str) -> onnx.NodeProto:
    zp = _as_scalar(ctx, zp)
    return helper.make_node("QuantizeLinear", [y_f, _as_scalar(ctx, scale)] + ([zp] if zp else []), [node.output[0]],
                            name=ctx.fresh(f"{node.name or node.output[0]}_Q"))


_NODE_REWRITES = (
    blocked_to_elementwise,
    fold_constant_quantize,
    quantize_int4_to_int8_clip,
    fold_blocked_dequantize,
    qlinear_matmul_to_qdq,
    qlinear_conv_to_qdq,
    conv_integer_to_exact_float,
    ms_qlinear_to_qdq,
    ms_qlinear_concat_to_qdq,
    ms_qgemm_to_qdq,
    prelu_to_where,
    stft_to_conv,
)
