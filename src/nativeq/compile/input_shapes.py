"""Fix or rename the symbolic input sizes of an ONNX model before import (`compile --dim`, `--input-shapes`).

The first step of `compile/`, on the ONNX model, before `onnx_import`: what ONNX Runtime's
`make_dynamic_shape_fixed` does, by dim name (`--dim B=1`) or by input (`--input-shapes
"feats:[1,T,80]"`, as TVMC takes it: an integer fixes that axis, a name renames its symbolic
dim). A fixed name is replaced everywhere the graph declares it (inputs, outputs, value_info), so
the artifact is specialized to it: its manifest lists the size, and the runtime refuses others.
"""

from __future__ import annotations

import re

import onnx

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
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    initializers = {init.name for init in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in initializers}
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


def _bind(dims: dict[str, int], name: str, size: int, input_name: str) -> None:
    if dims.get(name, size) != size:
        raise NativeqError(f"--input-shapes {input_name}: dim {name!r} given as both {dims[name]} and {size}")
    dims[name] = size


def _dims(value_info: onnx.ValueInfoProto) -> list:
    tensor_type = value_info.type.tensor_type
    return list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []


def _text(dims) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.dim_value) else "?" for d in dims) + "]"
