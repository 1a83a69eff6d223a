"""Fix or rename the symbolic input sizes of an ONNX model before import (`compile --dim`, `--input-shapes`), and
fix the values of inputs that select a mode (`--input-value sr=16000`).

The first step of `compile/`, on the ONNX model, before `onnx_import`: what ONNX Runtime's
`make_dynamic_shape_fixed` does, by dim name (`--dim B=1`) or by input (`--input-shapes
"feats:[1,T,80]"`, as TVMC takes it: an integer fixes that axis, a name renames its symbolic
dim). A fixed name is replaced everywhere the graph declares it (inputs, outputs, value_info), so
the artifact is specialized to it: its manifest lists the size, and the runtime refuses others.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nativeq.errors import NativeqError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_input_shapes(text: str) -> dict[str, tuple[int | str, ...]]:
    """`"feats:[1,T,80] mask:[1,T]"` -> {"feats": (1, "T", 80), "mask": (1, "T")}; one-line error if malformed."""
    shapes: dict[str, tuple[int | str, ...]] = {}
    for item in re.findall(r"[^\s\]]+\[[^\]]*\]|\S+", text.strip()):
        match = re.fullmatch(r"(.+?):\[([^\]]*)\]", item)
        if match is None:
            raise NativeqError(f"--input-shapes {item!r}: expected NAME:[d0,d1,...] (e.g. feats:[1,T,80])")
        name, body = match.group(1), match.group(2)
        dims: list[int | str] = []
        for part in (p.strip() for p in body.split(",") if p.strip()):
            if re.fullmatch(r"-?\d+", part):
                if int(part) < 1:
                    raise NativeqError(f"--input-shapes {name}: size {part} must be at least 1")
                dims.append(int(part))
            elif _NAME.match(part):
                dims.append(part)
            else:
                raise NativeqError(f"--input-shapes {name}: {part!r} is neither a size nor a dim name")
        if name in shapes:
            raise NativeqError(f"--input-shapes names input {name!r} twice")
        shapes[name] = tuple(dims)
    return shapes


def fix_input_shapes(model: onnx.ModelProto, dims: dict[str, int] | None = None,
                     input_shapes: dict[str, tuple[int | str, ...]] | None = None) -> onnx.ModelProto:
    """A copy of `model` with symbolic sizes fixed (`dims`: name -> size) and input shapes set (`input_shapes`).

    Refused with a one-line error: an unknown input or dim name, a rank or a fixed size that
    contradicts the model, a size below 1, one dim given two values.
    """
    dims, input_shapes = dict(dims or {}), dict(input_shapes or {})
    if not dims and not input_shapes:
        return model
    fixed, inputs = _copy_with_inputs(model)
    symbolic = sorted({d.dim_param for vi in inputs.values() for d in _dims(vi) if d.dim_param})
    for name, size in dims.items():
        if name not in symbolic:
            raise NativeqError(f"--dim {name}: the model has no symbolic dim {name!r} "
                               f"(its symbolic dims: {', '.join(symbolic) or 'none'})")
        if int(size) < 1:
            raise NativeqError(f"--dim {name}={size}: a size must be at least 1")

    renames: dict[str, str] = {}
    for input_name, shape in input_shapes.items():
        if input_name not in inputs:
            raise NativeqError(f"--input-shapes {input_name}: the model has no input {input_name!r} "
                               f"(its inputs: {', '.join(inputs)})")
        declared = _dims(inputs[input_name])
        if len(declared) != len(shape):
            raise NativeqError(f"--input-shapes {input_name}: {len(shape)} dims given, the model declares "
                               f"{len(declared)} ({_text(declared)})")
        for axis, (dim, want) in enumerate(zip(declared, shape)):
            if dim.HasField("dim_value"):
                if want != dim.dim_value:
                    raise NativeqError(f"--input-shapes {input_name}: dim {axis} is {dim.dim_value} in the model, "
                                       f"not {want}")
            elif isinstance(want, int):
                if dim.dim_param:
                    _bind(dims, dim.dim_param, want, input_name)
                else:
                    dim.dim_value = want  # an anonymous dynamic dim: only this one
            elif dim.dim_param and dim.dim_param != want:
                if renames.get(dim.dim_param, want) != want:
                    raise NativeqError(f"--input-shapes {input_name}: dim {dim.dim_param!r} renamed to both "
                                       f"{renames[dim.dim_param]!r} and {want!r}")
                renames[dim.dim_param] = want
            elif not dim.dim_param:
                dim.dim_param = want

    for value_info in [*fixed.graph.input, *fixed.graph.output, *fixed.graph.value_info]:
        for dim in _dims(value_info):
            if dim.dim_param in dims:
                dim.dim_value = int(dims[dim.dim_param])  # clears dim_param (a oneof)
            elif dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    return fixed


def _copy_with_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model`, and its run-time inputs (graph inputs that are not initializers) by name."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {init.name for init in fixed.graph.initializer}
    return fixed, {vi.name: vi for vi in fixed.graph.input if vi.name not in initializers}


def _bind(dims: dict[str, int], name: str, size: int, input_name: str) -> None:
    if dims.get(name, size) != size:
        raise NativeqError(f"--input-shapes {input_name}: dim {name!r} given as both {dims[name]} and {size}")
    dims[name] = size


def _dims(value_info: onnx.ValueInfoProto) -> list:
    tensor_type = value_info.type.tensor_type
    return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []


def _text(dims) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.dim_value) else "?" for d in dims) + "]"


def parse_input_values(items) -> dict[str, tuple[float, ...]]:
    """`["sr=16000", "mode=1,0"]` -> {"sr": (16000.0,), "mode": (1.0, 0.0)}; one-line error if malformed."""
    values: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            numbers = tuple(float(v) for v in text.split(","))
        except ValueError:
            numbers = ()
        if not sep or not name or not numbers:
            raise NativeqError(f"--input-value {item!r}: expected NAME=VALUE or NAME=V1,V2,... (e.g. sr=16000)")
        if name in values:
            raise NativeqError(f"--input-value names input {name!r} twice")
        values[name] = numbers
    return values


def fix_input_values(model: onnx.ModelProto, values: dict[str, tuple[float, ...]]) -> onnx.ModelProto:
    """A copy of `model` in which every node reads the constant `values[name]` instead of input `name` (a sample
    rate, a mode flag): If nodes on it are then decided at compile time. The input stays in the signature; the
    artifact's manifest records the value and the runtime refuses any other. Refused with a one-line error: an
    unknown input, a symbolic shape, a value count or type the input cannot hold."""
    if not values:
        return model
    fixed, inputs = _copy_with_inputs(model)
    graph = fixed.graph
    used = {o for node in graph.node for o in node.output} | {init.name for init in graph.initializer} | set(inputs)
    renamed, constants = {}, []
    for name, numbers in values.items():
        if name not in inputs:
            raise NativeqError(f"--input-value {name}: the model has no input {name!r} (its inputs: {', '.join(inputs)})")
        dims = _dims(inputs[name])
        if any(not d.HasField("dim_value") for d in dims):
            raise NativeqError(f"--input-value {name}: its shape {_text(dims)} is not static (fix it with --dim or "
                               "--input-shapes)")
        shape = [d.dim_value for d in dims]
        if int(np.prod(shape)) != len(numbers):
            raise NativeqError(f"--input-value {name}: {len(numbers)} value(s) given for shape {shape}")
        dtype = helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)
        array = np.asarray(numbers).astype(dtype)
        if not np.array_equal(array.astype(np.float64), np.asarray(numbers)):
            raise NativeqError(f"--input-value {name}: {', '.join(map(str, numbers))} is not a {dtype} value")
        constant, i = f"{name}__fixed", 0
        while constant in used:
            i += 1
            constant = f"{name}__fixed{i}"
        used.add(constant)
        renamed[name] = constant
        constants.append(helper.make_node("Constant", [], [renamed[name]], name=renamed[name],
                                          value=numpy_helper.from_array(array.reshape(shape))))
    _read_renamed(graph, renamed)
    for node in reversed(constants):
        graph.node.insert(0, node)
    return fixed


def _read_renamed(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                _read_renamed(g, renamed)
    for out in graph.output:  # an output that is the input itself: an Identity of the constant would be needed
        if out.name in renamed:
            raise NativeqError(f"--input-value {out.name}: the input is also a graph output")
