"""Compile-time validation of a model's quantization parameters, against the ONNX spec.

Where it sits: on the ONNX model, after `api.load_onnx` has parsed it and run `onnx.checker`
(the schema: op names, attributes, type constraints), and before `onnx_legalize` and the Relax
import, which assume what is checked here. `validate_model(model)` raises a one-line
`NativeqError` naming the node (its name, or op type and index when unnamed) and the tensor.

What it refuses:

- a graph with no nodes or no outputs (it would compile to an artifact returning nothing), a
  default-domain opset newer than the installed onnx defines, and names or symbolic dimensions
  that are not UTF-8 text (`onnx.checker` lets the last two through);
- on every quantization op nativeq imports (QuantizeLinear, DequantizeLinear, QLinearMatMul,
  QLinearConv, MatMulInteger, ConvInteger, DynamicQuantizeLinear and the com.microsoft
  QLinearAdd/Mul/Sigmoid/LeakyRelu/Softmax/Concat/(Global)AveragePool and QGemm), with constant
  (initializer or Constant node) scales and zero points:
  - a scale that is not finite, not > 0, or outside the bounds below;
  - a zero point whose type is not the quantized tensor's (QuantizeLinear: not `output_dtype`),
    whose stored values lie outside its type, or that is not 0 for an int32 DequantizeLinear;
  - a scale and zero point of different shapes, per-axis lengths that differ from the axis
    dimension (when shape inference knows it), an axis out of range, a per-axis scale before
    opset 13, and blocked (`block_size`) scales whose shape does not tile the input;
  - granularities the op does not define or ONNX Runtime's kernels refuse (per-row `a` and
    `y` scales of QLinearMatMul, non-scalar activation parameters of QLinearConv,
    MatMulInteger and ConvInteger);
- a Gather or GatherElements whose constant indices fall outside the gathered dimension.

Scales and zero points computed at run time (graph inputs, DynamicQuantizeLinear outputs) are
not checked here.

Scale bounds. nativeq computes in float32 (float16/bfloat16 scales: in their own type) and
lowers each contraction to an int32 accumulator rescaled by one multiplier, so it refuses what
cannot be computed exactly in float32 rather than produce a result that differs from the
spec's formula:

- every scale s is a normal float (s >= 2**-126 in float32): 1/s and x/s are finite, and code
  compiled with flush-to-zero does not read s as 0;
- s * (qmax - qmin) is finite: every value of the quantized type dequantizes to a finite float
  (this bounds an int8 scale by 1.3e36 and an int32 bias scale by 7.9e28);
- at a contraction site (QLinearMatMul, QLinearConv, QGemm, and MatMul/Conv/Gemm between two
  DequantizeLinear), the accumulator multiplier m = sx * sw (per output channel) is a normal
  float32 and m * 2**31 is finite, so
  every int32 accumulator rescales to a finite float; when the result is requantized (the
  op's y_scale, or a QuantizeLinear reached through bias Add / Relu / Clip), the requantize
  multiplier m / sy is a normal float32 too.

Real models sit many orders of magnitude inside these bounds; only corrupted or degenerate
parameters (0, NaN, inf, 1e38, denormals) are refused.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nativeq._text import first_line
from nativeq.errors import NativeqError

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MS_DOMAIN = "com.microsoft"

# (smallest normal, largest finite) per float scale type.
_FLOAT_LIMITS = {
    TensorProto.FLOAT: (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)),
    TensorProto.FLOAT16: (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max)),
    TensorProto.BFLOAT16: (2.0 ** -126, float(np.finfo(np.float32).max)),
}
_FLOAT32_TINY, _FLOAT32_MAX = _FLOAT_LIMITS[TensorProto.FLOAT]
_INT32_SPAN = 2.0 ** 31

# (qmin, qmax) of the integer types a quantized tensor may have.
_INT_RANGES = {
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1),
}
_INT2_TYPES = {getattr(TensorProto, name): rng for name, rng in (("INT2", (-2, 1)), ("UINT2", (0, 3)))
               if hasattr(TensorProto, name)}
_INT_RANGES.update(_INT2_TYPES)

# Ops a contraction's float result may pass through before its requantizing QuantizeLinear.
_REQUANTIZE_PASSTHROUGH = {"Add", "Relu", "Clip", "Identity"}
_CONTRACTIONS = {"MatMul", "Conv", "Gemm"}


def validate_model(model: onnx.ModelProto) -> None:
    """Raise a one-line NativeqError for the first quantization parameter (or graph) the spec or nativeq refuses."""
    graph = model.graph
    if not graph.output:
        raise NativeqError(f"graph '{graph.name}' declares no outputs: there is nothing to compile")
    if not graph.node:
        raise NativeqError(f"graph '{graph.name}' has no nodes: there is nothing to compile")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS and opset.version > newest:
            raise NativeqError(f"model imports ONNX opset {opset.version}, newer than any this onnx {onnx.__version__} "
                               f"knows (up to {newest}): its operators' semantics are not defined here")
    _check_text(model)
    facts = _ModelFacts(model)
    for index, node in enumerate(graph.node):
        check = _NODE_CHECKS.get((_domain(node), node.op_type))
        if check is not None:
            check(facts, _Node(node, index))
    for index, node in enumerate(graph.node):
        if _domain(node) == "" and node.op_type in _CONTRACTIONS:
            _check_qdq_contraction(facts, _Node(node, index))


def _check_text(model: onnx.ModelProto) -> None:
    """Every name and symbolic dimension of the graph is UTF-8 text, as ONNX's protobuf strings must be.

    The protobuf reader hands invalid UTF-8 back as bytes, which `onnx.checker` accepts and the
    artifact's manifest (JSON) cannot hold.
    """
    graph = model.graph
    for kind, infos in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for info in infos:
            if isinstance(info.name, bytes):
                raise NativeqError(f"graph {kind} {info.name!r} has a name that is not UTF-8 text")
            for axis, dim in enumerate(info.type.tensor_type.shape.dim):
                if isinstance(dim.dim_param, bytes):
                    raise NativeqError(f"graph {kind} '{info.name}' names dimension {axis} {dim.dim_param!r}, "
                                       f"which is not UTF-8 text")
    for tensor in graph.initializer:
        if isinstance(tensor.name, bytes):
            raise NativeqError(f"initializer {tensor.name!r} has a name that is not UTF-8 text")
    for index, node in enumerate(graph.node):
        for field_name in ("name", "op_type", "domain"):
            if isinstance(getattr(node, field_name), bytes):
                raise NativeqError(f"node #{index} has a {field_name} that is not UTF-8 text "
                                   f"({getattr(node, field_name)!r})")
        for name in [*node.input, *node.output]:
            if isinstance(name, bytes):
                raise NativeqError(f"{_Node(node, index).label}: tensor name {name!r} is not UTF-8 text")


# ---------------------------------------------------------------------------------------------
# What is known about the model's tensors


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in _DEFAULT_DOMAINS else node.domain


class _ModelFacts:
    """Constant values, element types and (partially) static shapes of the main graph's tensors."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)
        runtime_inputs = {i.name for i in graph.input}
        # NOTE: an initializer that is also a graph input is only a default the caller may override.
        self.constants: dict[str, onnx.TensorProto] = {
            t.name: t for t in graph.initializer if t.name not in runtime_inputs}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producers[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and _domain(node) == "" and len(node.output) == 1:
                value = _attribute(node, "value")
                if isinstance(value, onnx.TensorProto):
                    self.constants[node.output[0]] = value
        self.graph_outputs = {o.name for o in graph.output}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
        except Exception:  # noqa: BLE001  (a model inference cannot type just leaves shapes unknown)
            inferred = graph
        for info in [*inferred.input, *inferred.value_info, *inferred.output]:
            tensor_type = info.type.tensor_type
            if tensor_type.elem_type:
                self.types.setdefault(info.name, tensor_type.elem_type)
            if tensor_type.HasField("shape"):
                self.shapes.setdefault(info.name, [d.dim_value if d.HasField("dim_value") else None
                                                   for d in tensor_type.shape.dim])
        for name, tensor in self.constants.items():
            self.types[name] = tensor.data_type
            self.shapes[name] = list(tensor.dims)

    def value(self, node: "_Node", role: str, name: str) -> np.ndarray | None:
        """The value of constant `name` (None when computed at run time); unreadable data is an error."""
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception as e:  # noqa: BLE001  (data that does not match dims or type)
            raise NativeqError(f"{node.label}: {role} '{name}' has unreadable data ({first_line(e)})") from None

    def dim(self, name: str, axis: int) -> int | None:
        """Static size of dimension `axis` of `name`, or None."""
        shape = self.shapes.get(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        size = shape[axis]
        return size if size else None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


class _Node:
    """A node and the label errors name it by: its name, or op type and index when unnamed."""

    def __init__(self, node: onnx.NodeProto, index: int):
        self.proto = node
        self.op_type = node.op_type
        self.label = f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node #{index} (unnamed)"

    def input(self, index: int) -> str:
        return self.proto.input[index] if index < len(self.proto.input) else ""

    def attr(self, name: str, default=None):
        return _attribute(self.proto, name, default)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


# ---------------------------------------------------------------------------------------------
# Scales and zero points


def _check_scale(facts: _ModelFacts, node: _Node, role: str, name: str, quant_type: int | None,
                 float_type: int | None = None) -> np.ndarray | None:
    """Check the values of constant scale `name`; return them as float64 (None when computed at run time).

    float_type: the float type the scale's products are computed in (default: the scale's own type).
    """
    value = facts.value(node, role, name)
    if value is None:
        return None
    elem_type = facts.constants[name].data_type
    limits = _FLOAT_LIMITS.get(float_type or elem_type)
    if elem_type not in _FLOAT_LIMITS or limits is None:
        return None  # float8 and other exotic scale types: no arithmetic bound to check
    values = np.asarray(value, np.float64).reshape(-1)
    if values.size == 0:
        raise NativeqError(f"{node.label}: {role} '{name}' is empty")
    tiny, largest = limits
    span = None
    if quant_type in _INT_RANGES:
        qmin, qmax = _INT_RANGES[quant_type]
        span = float(qmax - qmin)
    for i, s in enumerate(values):
        where = f"{role} '{name}'" + (f"[{i}]" if values.size > 1 else "")
        if not math.isfinite(s):
            # an infinite range: what a calibrator measures on a tensor holding -inf (an attention mask)
            hint = " (calibrated on a tensor holding an infinity, such as an attention mask: leave that tensor " \
                   "out of quantization)" if math.isinf(s) else ""
            raise NativeqError(f"{node.label}: {where} is {s}; a scale must be finite and > 0{hint}")
        if s <= 0:
            raise NativeqError(f"{node.label}: {where} is {s:g}; a scale must be finite and > 0")
        if s < tiny:
            raise NativeqError(f"{node.label}: {where} is {s:g}, below the smallest normal {_type_name(float_type or elem_type)} "
                               f"({tiny:g}): 1/scale is not representable")
        if span is not None and s * span > largest:
            raise NativeqError(f"{node.label}: {where} is {s:g}: {span:g} steps of it ({_type_name(quant_type)} range) "
                               f"overflow {_type_name(float_type or elem_type)} (largest usable scale {largest / span:g})")
    return values


def _check_zero_point(facts: _ModelFacts, node: _Node, role: str, name: str, quant_type: int | None,
                      quant_tensor: str | None) -> np.ndarray | None:
    """Check type (that of the quantized tensor) and stored range of zero point `name`; return its values."""
    zp_type = facts.types.get(name)
    if quant_type is not None and zp_type is not None and zp_type != quant_type:
        what = f"'{quant_tensor}'" if quant_tensor else "the quantized tensor"
        raise NativeqError(f"{node.label}: {role} '{name}' is {_type_name(zp_type)} but {what} is "
                           f"{_type_name(quant_type)}; they must have the same type")
    tensor = facts.constants.get(name)
    if tensor is None:
        return None
    if tensor.data_type in _INT_RANGES and tensor.int32_data:
        # NOTE: 8/16-bit integers stored in int32_data are not range-checked by protobuf or onnx.checker.
        qmin, qmax = _INT_RANGES[tensor.data_type]
        stored = np.asarray(tensor.int32_data, np.int64)
        if tensor.data_type not in (TensorProto.INT4, TensorProto.UINT4) and tensor.data_type not in _INT2_TYPES:
            outside = stored[(stored < qmin) | (stored > qmax)]
            if outside.size:
                raise NativeqError(f"{node.label}: {role} '{name}' holds {int(outside[0])}, outside the "
                                   f"{_type_name(tensor.data_type)} range [{qmin}, {qmax}]")
    return facts.value(node, role, name)


def _check_same_shape(facts: _ModelFacts, node: _Node, scale: str, zero_point: str) -> None:
    if not zero_point:
        return
    scale_shape, zp_shape = facts.shapes.get(scale), facts.shapes.get(zero_point)
    if scale_shape is None or zp_shape is None or None in scale_shape or None in zp_shape:
        return
    if _normal_shape(scale_shape) != _normal_shape(zp_shape):
        raise NativeqError(f"{node.label}: scale '{scale}' has shape {scale_shape} but zero point '{zero_point}' "
                           f"has shape {zp_shape}; they must have the same shape")


def _normal_shape(shape: list[int]) -> list[int]:
    """A one-element shape ([], [1]) counts as per-tensor."""
    return [] if math.prod(shape) == 1 and len(shape) <= 1 else list(shape)


def _per_tensor(facts: _ModelFacts, name: str) -> bool | None:
    """Whether `name` is a scalar or one-element 1-D tensor (None: its shape is unknown)."""
    shape = facts.shapes.get(name)
    if shape is None or None in shape:
        return None
    return len(shape) == 0 or (len(shape) == 1 and shape[0] == 1)


def _require_per_tensor(facts: _ModelFacts, node: _Node, role: str, name: str) -> None:
    if name and _per_tensor(facts, name) is False:
        raise NativeqError(f"{node.label}: {role} '{name}' has shape {facts.shapes[name]}; "
                           f"{node.op_type} takes a scalar (per-tensor) {role} here")


def _require_vector_of(facts: _ModelFacts, node: _Node, role: str, name: str, length: int | None, what: str) -> None:
    """`name` is per-tensor, or 1-D with `length` elements (the size of `what`), when both are known."""
    if not name or _per_tensor(facts, name) is not False:
        return
    shape = facts.shapes[name]
    if len(shape) != 1:
        raise NativeqError(f"{node.label}: {role} '{name}' has shape {shape}; it must be a scalar or 1-D ({what})")
    if length is not None and shape[0] != length:
        raise NativeqError(f"{node.label}: {role} '{name}' has {shape[0]} elements but {what} is {length}")


def _multiplier_check(node: _Node, what: str, multiplier: np.ndarray, need_span: bool) -> None:
    """`multiplier` (float32 values) must be normal, and with need_span also finite after scaling an int32 accumulator."""
    values = np.asarray(multiplier, np.float64).reshape(-1)
    for i, m in enumerate(values):
        where = what + (f"[{i}]" if values.size > 1 else "")
        if not math.isfinite(m) or not _FLOAT32_TINY <= m <= _FLOAT32_MAX:
            raise NativeqError(f"{node.label}: {where} = {m:g} is not a normal float32 "
                               f"(must lie in [{_FLOAT32_TINY:g}, {_FLOAT32_MAX:g}])")
        if need_span and m * _INT32_SPAN > _FLOAT32_MAX:
            raise NativeqError(f"{node.label}: {where} = {m:g} overflows float32 on a 32-bit accumulator "
                               f"(largest {_FLOAT32_MAX / _INT32_SPAN:g})")


def _check_requantize(node: _Node, in_scales: tuple[str, str], x_scale, w_scale, y_scale_name: str | None,
                      y_scale) -> None:
    """The accumulator multiplier sx * sw and the requantize multiplier sx * sw / sy of a contraction."""
    if x_scale is None or w_scale is None or (x_scale.size > 1 and w_scale.size > 1):
        return  # per-axis on both operands: no one multiplier per output channel (the int8 lowering keeps it float)
    # In float64, where none of this overflows: the bounds are those of float32, which nativeq computes in.
    product = np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)
    _multiplier_check(node, f"accumulator multiplier '{in_scales[0]}' * '{in_scales[1]}'", product, need_span=True)
    if y_scale is not None and (y_scale.size == 1 or product.size in (1, y_scale.size)):
        _multiplier_check(node, f"requantize multiplier '{in_scales[0]}' * '{in_scales[1]}' / '{y_scale_name}'",
                          product / np.asarray(y_scale, np.float64), need_span=False)


# ---------------------------------------------------------------------------------------------
# QuantizeLinear / DequantizeLinear


def _check_quantize_dequantize(facts: _ModelFacts, node: _Node) -> None:
    dequantize = node.op_type == "DequantizeLinear"
    data, scale, zero_point = node.input(0), node.input(1), node.input(2)
    output_dtype = node.attr("output_dtype", 0)
    if dequantize:
        quant_type = facts.types.get(data)
        float_type = output_dtype or None
    else:
        zp_type = facts.types.get(zero_point) if zero_point else None
        if output_dtype and zp_type and output_dtype != zp_type:
            raise NativeqError(f"{node.label}: output_dtype is {_type_name(output_dtype)} but zero point "
                               f"'{zero_point}' is {_type_name(zp_type)}; they must agree")
        quant_type = zp_type or output_dtype or TensorProto.UINT8
        float_type = None
    _check_granularity(facts, node, data, scale, zero_point)
    _check_scale(facts, node, "scale", scale, quant_type, float_type)
    if zero_point:
        zp = _check_zero_point(facts, node, "zero point", zero_point, quant_type if dequantize else None,
                               data if dequantize else None)
        if dequantize and quant_type == TensorProto.INT32 and zp is not None and np.any(zp != 0):
            raise NativeqError(f"{node.label}: zero point '{zero_point}' of the int32 input '{data}' must be 0")


def _check_granularity(facts: _ModelFacts, node: _Node, data: str, scale: str, zero_point: str) -> None:
    """Per-tensor, per-axis (1-D) or blocked: shapes, axis and block_size as the spec defines them."""
    _check_same_shape(facts, node, scale, zero_point)
    scale_shape = facts.shapes.get(scale)
    if scale_shape is None or None in scale_shape:
        return
    block_size = node.attr("block_size", 0)
    rank = facts.rank(data)
    axis = node.attr("axis", 1)
    if block_size < 0:
        raise NativeqError(f"{node.label}: block_size is {block_size}; it must be > 0 (or 0: not blocked)")
    # NOTE: per-tensor (scalar scale) ignores axis, as the spec says and ONNX Runtime does: ORT's own quantize_static
    # writes rank-1 bias DequantizeLinear nodes with the default axis 1.
    per_tensor = len(scale_shape) == 0 or (len(scale_shape) == 1 and scale_shape[0] == 1 and not block_size)
    if rank is not None and not per_tensor and not -rank <= axis < rank:
        raise NativeqError(f"{node.label}: axis {axis} is out of range for input '{data}' of rank {rank}")
    if block_size:
        _check_blocked(facts, node, data, scale, scale_shape, axis, block_size)
        return
    if _per_tensor(facts, scale):
        return
    if len(scale_shape) != 1:
        raise NativeqError(f"{node.label}: scale '{scale}' has shape {scale_shape}; without block_size it must be "
                           f"a scalar (per-tensor) or 1-D (per-axis)")
    if facts.opset < 13:
        raise NativeqError(f"{node.label}: scale '{scale}' is per-axis ({scale_shape[0]} elements), which needs "
                           f"opset >= 13 (the model imports opset {facts.opset})")
    size = facts.dim(data, axis)
    if size is not None and scale_shape[0] != size:
        raise NativeqError(f"{node.label}: scale '{scale}' has {scale_shape[0]} elements but axis {axis} of "
                           f"'{data}' has {size}")


def _check_blocked(facts: _ModelFacts, node: _Node, data: str, scale: str, scale_shape: list[int], axis: int,
                   block_size: int) -> None:
    data_shape = facts.shapes.get(data)
    if data_shape is None:
        return
    if len(scale_shape) != len(data_shape):
        raise NativeqError(f"{node.label}: blocked scale '{scale}' has rank {len(scale_shape)} but input '{data}' "
                           f"has rank {len(data_shape)}; they must be equal")
    axis %= len(data_shape)
    for d, (size, blocks) in enumerate(zip(data_shape, scale_shape)):
        if size is None:
            continue
        expected = -(-size // block_size) if d == axis else size
        if blocks != expected:
            raise NativeqError(f"{node.label}: blocked scale '{scale}' has shape {scale_shape} but input '{data}' "
                               f"{data_shape} with block_size {block_size} on axis {axis} needs {expected} on axis {d}")


# ---------------------------------------------------------------------------------------------
# The QOperator and integer ops


def _check_qlinear_matmul(facts: _ModelFacts, node: _Node) -> None:
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (node.input(i) for i in range(8))
    for role, name in (("a_scale", a_s), ("a_zero_point", a_zp), ("y_scale", y_s), ("y_zero_point", y_zp)):
        _require_per_tensor(facts, node, role, name)
    columns = facts.dim(b, -1)
    _require_vector_of(facts, node, "b_scale", b_s, columns, f"the number of columns of '{b}'")
    _require_vector_of(facts, node, "b_zero_point", b_zp, columns, f"the number of columns of '{b}'")
    _check_same_shape(facts, node, b_s, b_zp)
    y_type = facts.types.get(y_zp)
    a_scale = _check_scale(facts, node, "a_scale", a_s, facts.types.get(a))
    b_scale = _check_scale(facts, node, "b_scale", b_s, facts.types.get(b))
    y_scale = _check_scale(facts, node, "y_scale", y_s, y_type)
    _check_zero_point(facts, node, "a_zero_point", a_zp, facts.types.get(a), a)
    _check_zero_point(facts, node, "b_zero_point", b_zp, facts.types.get(b), b)
    _check_zero_point(facts, node, "y_zero_point", y_zp, None, None)
    _check_requantize(node, (a_s, b_s), a_scale, b_scale, y_s, y_scale)


def _check_qlinear_conv(facts: _ModelFacts, node: _Node) -> None:
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (node.input(i) for i in range(8))
    bias = node.input(8)
    for role, name in (("x_scale", x_s), ("x_zero_point", x_zp), ("y_scale", y_s), ("y_zero_point", y_zp)):
        _require_per_tensor(facts, node, role, name)
    out_channels = facts.dim(w, 0)
    what = f"the number of output channels of '{w}'"
    _require_vector_of(facts, node, "w_scale", w_s, out_channels, what)
    _require_vector_of(facts, node, "w_zero_point", w_zp, out_channels, what)
    x_scale = _check_scale(facts, node, "x_scale", x_s, facts.types.get(x))
    w_scale = _check_scale(facts, node, "w_scale", w_s, facts.types.get(w))
    y_scale = _check_scale(facts, node, "y_scale", y_s, facts.types.get(y_zp))
    _check_zero_point(facts, node, "x_zero_point", x_zp, facts.types.get(x), x)
    _check_zero_point(facts, node, "w_zero_point", w_zp, facts.types.get(w), w)
    _check_zero_point(facts, node, "y_zero_point", y_zp, None, None)
    if bias:
        bias_shape = facts.shapes.get(bias)
        if bias_shape is not None and None not in bias_shape and (
                len(bias_shape) != 1 or (out_channels is not None and bias_shape[0] != out_channels)):
            raise NativeqError(f"{node.label}: bias '{bias}' has shape {bias_shape} but {what} is {out_channels}")
    _check_requantize(node, (x_s, w_s), x_scale, w_scale, y_s, y_scale)


def _check_matmul_integer(facts: _ModelFacts, node: _Node) -> None:
    a, b, a_zp, b_zp = (node.input(i) for i in range(4))
    _require_per_tensor(facts, node, "a_zero_point", a_zp)
    _require_vector_of(facts, node, "b_zero_point", b_zp, facts.dim(b, -1), f"the number of columns of '{b}'")
    if a_zp:
        _check_zero_point(facts, node, "a_zero_point", a_zp, facts.types.get(a), a)
    if b_zp:
        _check_zero_point(facts, node, "b_zero_point", b_zp, facts.types.get(b), b)


def _check_conv_integer(facts: _ModelFacts, node: _Node) -> None:
    x, w, x_zp, w_zp = (node.input(i) for i in range(4))
    _require_per_tensor(facts, node, "x_zero_point", x_zp)
    _require_vector_of(facts, node, "w_zero_point", w_zp, facts.dim(w, 0), f"the number of output channels of '{w}'")
    if x_zp:
        _check_zero_point(facts, node, "x_zero_point", x_zp, facts.types.get(x), x)
    if w_zp:
        _check_zero_point(facts, node, "w_zero_point", w_zp, facts.types.get(w), w)


def _check_dynamic_quantize(facts: _ModelFacts, node: _Node) -> None:
    """DynamicQuantizeLinear computes its scale and zero point at run time; its input must be float32."""
    x_type = facts.types.get(node.input(0))
    if x_type is not None and x_type != TensorProto.FLOAT:
        raise NativeqError(f"{node.label}: input '{node.input(0)}' is {_type_name(x_type)}; it must be FLOAT")


# com.microsoft QOperator ops: the (tensor, scale, zero point) input positions and the output's (scale, zero point).
_MS_TRIPLETS = {
    "QLinearAdd": ([(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearMul": ([(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearSigmoid": ([(0, 1, 2)], (3, 4)),
    "QLinearLeakyRelu": ([(0, 1, 2)], (3, 4)),
    "QLinearSoftmax": ([(0, 1, 2)], (3, 4)),
    "QLinearGlobalAveragePool": ([(0, 1, 2)], (3, 4)),
    "QLinearAveragePool": ([(0, 1, 2)], (3, 4)),
}


def _check_ms_qlinear(facts: _ModelFacts, node: _Node) -> None:
    if node.op_type == "QLinearConcat":
        triplets = [(k, k + 1, k + 2) for k in range(2, len(node.proto.input), 3)]
        output = (0, 1)
    else:
        triplets, output = _MS_TRIPLETS[node.op_type]
    out_type = facts.types.get(node.proto.output[0])
    for x, s, zp in triplets:
        data, scale, zero_point = node.input(x), node.input(s), node.input(zp)
        _require_per_tensor(facts, node, "scale", scale)
        _require_per_tensor(facts, node, "zero point", zero_point)
        _check_scale(facts, node, "scale", scale, facts.types.get(data))
        if zero_point:
            _check_zero_point(facts, node, "zero point", zero_point, facts.types.get(data), data)
    scale, zero_point = node.input(output[0]), node.input(output[1])
    _require_per_tensor(facts, node, "y_scale", scale)
    _require_per_tensor(facts, node, "y_zero_point", zero_point)
    _check_scale(facts, node, "y_scale", scale, out_type)
    if zero_point:
        _check_zero_point(facts, node, "y_zero_point", zero_point, out_type, node.proto.output[0])


def _check_ms_qgemm(facts: _ModelFacts, node: _Node) -> None:
    a, a_s, a_zp, b, b_s, b_zp = (node.input(i) for i in range(6))
    y_s, y_zp = node.input(7), node.input(8)
    _require_per_tensor(facts, node, "a_scale", a_s)
    _require_per_tensor(facts, node, "a_zero_point", a_zp)
    _require_per_tensor(facts, node, "y_scale", y_s)
    columns = facts.dim(b, 0 if node.attr("transB", 0) else 1)
    _require_vector_of(facts, node, "b_scale", b_s, columns, f"the number of output columns of '{b}'")
    _require_vector_of(facts, node, "b_zero_point", b_zp, columns, f"the number of output columns of '{b}'")
    a_scale = _check_scale(facts, node, "a_scale", a_s, facts.types.get(a))
    b_scale = _check_scale(facts, node, "b_scale", b_s, facts.types.get(b))
    y_scale = _check_scale(facts, node, "y_scale", y_s, facts.types.get(y_zp)) if y_s else None
    for role, zp, tensor in (("a_zero_point", a_zp, a), ("b_zero_point", b_zp, b)):
        if zp:
            _check_zero_point(facts, node, role, zp, facts.types.get(tensor), tensor)
    _check_requantize(node, (a_s, b_s), a_scale, b_scale, y_s or None, y_scale)


# ---------------------------------------------------------------------------------------------
# QDQ contractions: MatMul / Conv / Gemm between two DequantizeLinear


def _constant_scale(facts: _ModelFacts, name: str) -> tuple[str, np.ndarray] | None:
    """(name, values as float64) of a constant float scale; None when computed at run time or unreadable."""
    tensor = facts.constants.get(name)
    if tensor is None or tensor.data_type not in _FLOAT_LIMITS:
        return None
    try:
        return name, numpy_helper.to_array(tensor).astype(np.float64).reshape(-1)
    except Exception:  # noqa: BLE001  (unreadable data is reported by the check of the node that owns it)
        return None


def _dequantize_scale(facts: _ModelFacts, name: str) -> tuple[str, np.ndarray] | None:
    """The constant scale of the DequantizeLinear producing `name`."""
    producer = facts.producers.get(name)
    if producer is None or _domain(producer) != "" or producer.op_type != "DequantizeLinear" or len(producer.input) < 2:
        return None
    return _constant_scale(facts, producer.input[1])


def _requantizing_scale(facts: _ModelFacts, name: str) -> tuple[str, np.ndarray] | None:
    """The constant scale of the QuantizeLinear that `name` reaches through bias Add / Relu / Clip / Identity."""
    for _ in range(4):
        consumers = facts.consumers.get(name, [])
        if len(consumers) != 1 or name in facts.graph_outputs or _domain(consumers[0]) != "":
            return None
        consumer = consumers[0]
        if consumer.op_type == "QuantizeLinear" and consumer.input[0] == name and len(consumer.input) > 1:
            return _constant_scale(facts, consumer.input[1])
        if consumer.op_type not in _REQUANTIZE_PASSTHROUGH:
            return None
        name = consumer.output[0]
    return None


def _check_qdq_contraction(facts: _ModelFacts, node: _Node) -> None:
    if len(node.proto.input) < 2 or not node.proto.output:
        return
    x, w = _dequantize_scale(facts, node.input(0)), _dequantize_scale(facts, node.input(1))
    if x is None or w is None:
        return
    # NOTE: the scales were checked finite and > 0 by their DequantizeLinear; only the products are left.
    y = _requantizing_scale(facts, node.proto.output[0])
    _check_requantize(node, (x[0], w[0]), x[1], w[1], y[0] if y else None, y[1] if y else None)


# ---------------------------------------------------------------------------------------------
# Gather indices


def _check_gather(facts: _ModelFacts, node: _Node) -> None:
    data, indices = node.input(0), node.input(1)
    values = facts.value(node, "indices", indices)
    if values is None or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return
    rank = facts.rank(data)
    axis = node.attr("axis", 0)
    if rank is None:
        return
    if not -rank <= axis < rank:
        raise NativeqError(f"{node.label}: axis {axis} is out of range for input '{data}' of rank {rank}")
    size = facts.dim(data, axis)
    if size is None:
        return
    outside = values[(values < -size) | (values >= size)]
    if outside.size:
        raise NativeqError(f"{node.label}: indices '{indices}' hold {int(outside.reshape(-1)[0])}, outside "
                           f"[{-size}, {size - 1}] for axis {axis} of '{data}' (size {size})")


_NODE_CHECKS = {
    ("", "QuantizeLinear"): _check_quantize_dequantize,
    ("", "DequantizeLinear"): _check_quantize_dequantize,
    (_MS_DOMAIN, "QuantizeLinear"): _check_quantize_dequantize,
    (_MS_DOMAIN, "DequantizeLinear"): _check_quantize_dequantize,
    ("", "QLinearMatMul"): _check_qlinear_matmul,
    ("", "QLinearConv"): _check_qlinear_conv,
    ("", "MatMulInteger"): _check_matmul_integer,
    ("", "ConvInteger"): _check_conv_integer,
    ("", "DynamicQuantizeLinear"): _check_dynamic_quantize,
    ("", "Gather"): _check_gather,
    ("", "GatherElements"): _check_gather,
    (_MS_DOMAIN, "QGemm"): _check_ms_qgemm,
    (_MS_DOMAIN, "QLinearConcat"): _check_ms_qlinear,
    **{(_MS_DOMAIN, op): _check_ms_qlinear for op in _MS_TRIPLETS},
}
