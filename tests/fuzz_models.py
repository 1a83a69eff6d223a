"""Seeded mutations of small valid quantized ONNX models, and what compiling each one gives.

`make_case(index, seed)` builds case `index` of a campaign: a category (round-robin over
`CATEGORIES`), a base model (round-robin over `BASES`) and one mutation drawn from
`random.Random(f"{seed}-{index}")`, so a case is the same bytes on every run. `run_case(case, workdir)`
compiles it with `nativeq.compile.compile_model` and sorts the result into one outcome:

- "error": a one-line NativeqError (the mutation made a model nativeq refuses);
- "verified": an artifact that agrees with ONNX Runtime (`nativeq.verify.verify_artifact`);
- "crash": any other exception from the compiler (or, in a campaign, the process dying);
- "traceback": an error message of more than one line, or a CLI run printing a traceback;
- "wrong": an artifact that disagrees with ONNX Runtime, or that compiled where ONNX Runtime refuses
  the model (unless the refusal is listed in `ORT_REFUSALS_ACCEPTED`).

A campaign runs in child processes (a crash in native code kills the child, not the campaign):

    .venv/bin/python tests/fuzz_models.py --cases 320 --seed 0 --out fuzz.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import qdq_models  # noqa: E402
from fuzz_runner import run_in_children  # noqa: E402

CATEGORIES = ("truncate", "byteflip", "scale", "zero_point", "dtype", "shape", "opset", "attribute", "structure")
BASES = ("qdq_matmul", "qlinear_conv", "dynamic_matmul")
OUTCOMES = ("error", "verified", "crash", "traceback", "wrong")

# ONNX Runtime refusals of spec-valid models that nativeq compiles, by a fragment of ORT's message, with
# the reason. Such an artifact is compared with the ONNX reference evaluator (`onnx.reference`) instead.
ORT_REFUSALS_ACCEPTED: dict[str, str] = {
    "Could not find an implementation for QLinearConv": (
        "ORT's CPU provider has QLinearConv kernels only for x and y of the same type; the spec allows "
        "any 8-bit combination (e.g. uint8 x, int8 y)"),
}


def base_model(name: str) -> onnx.ModelProto:
    """The three valid models mutations start from (each compiles in well under a second)."""
    if name == "qdq_matmul":  # QDQ: int8 activations, per-channel int8 weights, float bias Add
        return qdq_models.qdq_matmul(k=16, n=8)
    if name == "qlinear_conv":  # QOperator: uint8 QLinearConv 1-D, per-channel weights, int32 bias
        return qdq_models.qlinear_conv(c_in=4, c_out=6, kernel=(3,), spatial=(12,))
    if name == "dynamic_matmul":  # dynamic: DynamicQuantizeLinear -> MatMulInteger (per-column zero point) -> Cast -> Mul
        model = qdq_models.dynamic_quantize_matmul(k=16, n=8)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.int8), "fc_wzp"))
        next(n for n in model.graph.node if n.op_type == "MatMulInteger").input.append("fc_wzp")
        onnx.checker.check_model(model, full_check=True)
        return model
    raise ValueError(name)


_BASE_CACHE: dict[str, bytes] = {}


def _base_bytes(name: str) -> bytes:
    if name not in _BASE_CACHE:
        _BASE_CACHE[name] = base_model(name).SerializeToString()
    return _BASE_CACHE[name]


@dataclass
class FuzzCase:
    index: int
    category: str
    base: str
    mutation: str
    data: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.index:03d}-{self.category}-{self.base}"


def case_category(index: int) -> str:
    return CATEGORIES[index % len(CATEGORIES)]


def make_case(index: int, seed: int = 0) -> FuzzCase:
    category = case_category(index)
    base = BASES[(index // len(CATEGORIES)) % len(BASES)]
    rng = random.Random(f"{seed}-{index}")
    data = _base_bytes(base)
    if category == "truncate":
        cut = rng.randrange(0, len(data))
        return FuzzCase(index, category, base, f"cut at byte {cut} of {len(data)}", data[:cut])
    if category == "byteflip":
        flipped = bytearray(data)
        spots = []
        for _ in range(rng.choice((1, 2))):
            pos, mask = rng.randrange(len(data)), rng.randrange(1, 256)
            flipped[pos] ^= mask
            spots.append(f"{pos}^{mask:#04x}")
        return FuzzCase(index, category, base, "flip " + ", ".join(spots), bytes(flipped))
    model = onnx.ModelProto()
    model.ParseFromString(data)
    mutation = _SEMANTIC[category](model, rng)
    return FuzzCase(index, category, base, mutation, model.SerializeToString())


# ---------------------------------------------------------------------------------------------
# Semantic mutations: each edits `model` in place and returns a description


_SCALE_POSITIONS = {"QuantizeLinear": (1,), "DequantizeLinear": (1,), "QLinearMatMul": (1, 4, 6),
                    "QLinearConv": (1, 4, 6)}
_ZERO_POINT_POSITIONS = {"QuantizeLinear": (2,), "DequantizeLinear": (2,), "QLinearMatMul": (2, 5, 7),
                         "QLinearConv": (2, 5, 7), "MatMulInteger": (2, 3), "ConvInteger": (2, 3)}
_SPECIAL_SCALES = (0.0, -0.05, math.nan, math.inf, -math.inf, 1e38, 3e36, 1e-39, 1e-45, 1e-30, 1e30, 1e-12, 1e12,
                   1.0)
_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.UINT8,
          TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL)


def _initializer(model, name):
    for k, t in enumerate(model.graph.initializer):
        if t.name == name:
            return k, t
    return None, None


def _set_initializer(model, name, value: np.ndarray) -> None:
    k, _ = _initializer(model, name)
    model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.asarray(value), name))


def _param_names(model, positions: dict) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        for p in positions.get(node.op_type, ()):
            if p < len(node.input) and node.input[p] in inits and node.input[p] not in names:
                names.append(node.input[p])
    return names


def _scale_names(model) -> list[str]:
    names = _param_names(model, _SCALE_POSITIONS)
    # the dynamic model's only constant scale is the weight scale its Mul applies
    return names or [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and "scale" in t.name]


def mutate_scale(model, rng) -> str:
    name = rng.choice(_scale_names(model))
    value = numpy_helper.to_array(_initializer(model, name)[1]).astype(np.float32)
    kind = rng.choices(("value", "shape", "dtype"), weights=(7, 2, 1))[0]
    if kind == "value":
        special = rng.choice(_SPECIAL_SCALES + ("double", "half", "random"))
        flat = value.reshape(-1).copy()
        j = rng.randrange(flat.size)
        if special == "double":
            flat[j] *= 2
        elif special == "half":
            flat[j] /= 2
        elif special == "random":
            flat[j] = 10 ** rng.uniform(-4, 0)
        else:
            flat[j] = special
        _set_initializer(model, name, flat.reshape(value.shape).astype(np.float32))
        return f"scale {name}[{j}] = {float(flat[j])!r}" if value.size > 1 else f"scale {name} = {float(flat[j])!r}"
    if kind == "shape":
        flat = value.reshape(-1)
        new = rng.choice(("grow", "shrink", "rank2", "as_vector"))
        if new == "grow":
            changed = np.concatenate([flat, flat[:1]])
        elif new == "shrink" and flat.size > 1:
            changed = flat[:-1]
        elif new == "rank2":
            changed = flat.reshape(1, -1)
        else:
            changed = np.repeat(flat[:1], 3)
        _set_initializer(model, name, changed.astype(np.float32))
        return f"scale {name} shape {list(value.shape)} -> {list(changed.shape)}"
    dtype = rng.choice((np.float16, np.float64, np.int32))
    _set_initializer(model, name, value.astype(dtype))
    return f"scale {name} dtype -> {np.dtype(dtype).name}"


def mutate_zero_point(model, rng) -> str:
    names = _param_names(model, _ZERO_POINT_POSITIONS)
    name = rng.choice(names)
    _, tensor = _initializer(model, name)
    value = numpy_helper.to_array(tensor)
    kind = rng.choice(("value", "out_of_range", "dtype", "shape", "remove"))
    if kind == "value":
        info = np.iinfo(value.dtype)
        flat = value.reshape(-1).copy()
        j = rng.randrange(flat.size)
        flat[j] = rng.choice((info.min, info.max, rng.randint(info.min, info.max)))
        _set_initializer(model, name, flat.reshape(value.shape))
        return f"zero point {name}[{j}] = {int(flat[j])}"
    if kind == "out_of_range":
        k, _ = _initializer(model, name)
        bad = rng.choice((300, -200, 1000, 256, -129))
        stored = onnx.TensorProto(name=name, data_type=tensor.data_type, dims=list(tensor.dims))
        stored.int32_data.extend([bad] * max(1, value.size))
        model.graph.initializer[k].CopyFrom(stored)
        return f"zero point {name} stores {bad} in int32_data"
    if kind == "dtype":
        dtype = rng.choice((np.int8, np.uint8, np.int16, np.uint16, np.int32))
        _set_initializer(model, name, value.astype(dtype))
        return f"zero point {name} dtype {value.dtype.name} -> {np.dtype(dtype).name}"
    if kind == "shape":
        flat = value.reshape(-1)
        changed = np.concatenate([flat, flat[:1]]) if rng.random() < 0.5 or flat.size == 1 else flat[:-1]
        _set_initializer(model, name, changed.astype(value.dtype))
        return f"zero point {name} shape {list(value.shape)} -> {list(changed.shape)}"
    for node in model.graph.node:
        for p, inp in enumerate(node.input):
            if inp == name:
                node.input[p] = ""
    while True:  # trailing empty inputs are dropped, as exporters write them
        trimmed = False
        for node in model.graph.node:
            if node.input and node.input[-1] == "":
                del node.input[-1]
                trimmed = True
        if not trimmed:
            break
    return f"zero point {name} removed from its nodes"


def mutate_dtype(model, rng) -> str:
    g = model.graph
    kind = rng.choice(("input", "output", "weight", "int4_weight", "output_dtype", "cast"))
    if kind == "input" or (kind == "cast" and not any(n.op_type == "Cast" for n in g.node)):
        new = rng.choice(_TYPES)
        g.input[0].type.tensor_type.elem_type = new
        return f"graph input {g.input[0].name} type -> {TensorProto.DataType.Name(new)}"
    if kind == "output":
        new = rng.choice(_TYPES)
        g.output[0].type.tensor_type.elem_type = new
        return f"graph output {g.output[0].name} type -> {TensorProto.DataType.Name(new)}"
    if kind == "weight":
        weights = [t for t in g.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2]
        t = rng.choice(weights)
        value = numpy_helper.to_array(t)
        dtype = rng.choice((np.uint8, np.int8, np.int32, np.float32))
        _set_initializer(model, t.name, value.astype(dtype))
        return f"weight {t.name} dtype {value.dtype.name} -> {np.dtype(dtype).name}"
    if kind == "int4_weight":
        weights = [t for t in g.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
        t = rng.choice(weights)
        narrowed = np.clip(numpy_helper.to_array(t), -8, 7)
        k, _ = _initializer(model, t.name)
        model.graph.initializer[k].CopyFrom(helper.make_tensor(t.name, TensorProto.INT4, narrowed.shape,
                                                               narrowed.reshape(-1).tolist()))
        for node in g.node:  # its zero point follows, so a DequantizeLinear stays type-consistent
            if t.name in node.input and node.op_type == "DequantizeLinear" and len(node.input) > 2:
                zp = numpy_helper.to_array(_initializer(model, node.input[2])[1])
                k, _ = _initializer(model, node.input[2])
                model.graph.initializer[k].CopyFrom(helper.make_tensor(node.input[2], TensorProto.INT4, zp.shape,
                                                                       np.clip(zp, -8, 7).reshape(-1).tolist()))
        return f"weight {t.name} -> INT4 (clipped to [-8, 7]), its DequantizeLinear zero point too"
    if kind == "output_dtype":
        quantizers = [n for n in g.node if n.op_type == "QuantizeLinear"] or list(g.node)
        node = rng.choice(quantizers)
        new = rng.choice((TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.FLOAT))
        _replace_attribute(node, helper.make_attribute("output_dtype", new))
        return f"{node.op_type} {node.name} output_dtype = {TensorProto.DataType.Name(new)}"
    node = next(n for n in g.node if n.op_type == "Cast")
    new = rng.choice(_TYPES)
    _replace_attribute(node, helper.make_attribute("to", new))
    return f"Cast {node.name} to = {TensorProto.DataType.Name(new)}"


def _replace_attribute(node, attribute) -> None:
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend(kept + [attribute])


def mutate_shape(model, rng) -> str:
    g = model.graph
    kind = rng.choice(("input_dim", "input_rank", "output_dim", "weight", "weight_rows"))
    if kind in ("input_dim", "output_dim"):
        info = g.input[0] if kind == "input_dim" else g.output[0]
        dims = info.type.tensor_type.shape.dim
        axis = rng.randrange(len(dims))
        size = rng.choice((1, 2, 3, 5, 17, 64))
        dims[axis].Clear()
        dims[axis].dim_value = size
        return f"{info.name} dim {axis} -> {size}"
    if kind == "input_rank":
        dims = g.input[0].type.tensor_type.shape.dim
        if len(dims) > 1 and rng.random() < 0.5:
            del dims[0]
            return f"{g.input[0].name} rank -1"
        dims.add().dim_value = 1
        return f"{g.input[0].name} rank +1"
    weights = [t for t in g.initializer if len(t.dims) >= 2]
    t = rng.choice(weights)
    value = numpy_helper.to_array(t)
    if kind == "weight":
        changed = np.swapaxes(value, 0, 1).copy() if value.shape[0] != value.shape[1] else value[:-1]
    else:
        changed = value[:-1] if rng.random() < 0.5 else np.concatenate([value, value[:1]])
    _set_initializer(model, t.name, changed)
    return f"weight {t.name} shape {list(value.shape)} -> {list(changed.shape)}"


def mutate_opset(model, rng) -> str:
    kind = rng.choices(("version", "ir_version", "extra_domain", "none"), weights=(6, 2, 1, 1))[0]
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if kind == "version":
        default.version = rng.choice((1, 7, 9, 10, 11, 12, 13, 15, 17, 18, 19, 20, 21, 22, 23, 24, 25, 40))
        return f"opset -> {default.version}"
    if kind == "ir_version":
        model.ir_version = rng.choice((1, 3, 4, 6, 7, 8, 9, 11, 12, 13, 99))
        return f"ir_version -> {model.ir_version}"
    if kind == "extra_domain":
        model.opset_import.append(helper.make_opsetid(rng.choice(("com.microsoft", "ai.onnx.ml", "")), 1))
        return f"extra opset import {model.opset_import[-1].domain!r}"
    del model.opset_import[:]
    return "no opset_import"


def mutate_attribute(model, rng) -> str:
    node = rng.choice(list(model.graph.node))
    choices = ["axis", "unknown", "drop"]
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        choices += ["block_size", "block_size", "saturate"]
    if node.op_type in ("QLinearConv", "Conv", "ConvInteger"):
        choices += ["kernel_shape", "pads", "strides", "dilations", "group", "auto_pad"]
    weight_dequantizers = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                           and _initializer(model, n.input[0])[1] is not None and len(_initializer(model, n.input[0])[1].dims) == 2]
    if weight_dequantizers:
        choices += ["blocked_weight"] * 2
    kind = rng.choice(choices)
    if kind == "blocked_weight":
        return _block_weight(model, rng.choice(weight_dequantizers), rng)
    if kind == "axis":
        value = rng.randint(-4, 3)
        _replace_attribute(node, helper.make_attribute("axis", value))
        return f"{node.name} axis = {value}"
    if kind == "unknown":
        _replace_attribute(node, helper.make_attribute("frobnicate", 1))
        return f"{node.name} unknown attribute"
    if kind == "drop":
        if not node.attribute:
            _replace_attribute(node, helper.make_attribute("axis", 0))
            return f"{node.name} axis = 0 (had no attribute to drop)"
        name = rng.choice([a.name for a in node.attribute])
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
        return f"{node.name} attribute {name} dropped"
    if kind == "block_size":
        value = rng.choice((-1, 1, 2, 3, 4, 16))
        _replace_attribute(node, helper.make_attribute("block_size", value))
        return f"{node.name} block_size = {value}"
    if kind == "saturate":
        _replace_attribute(node, helper.make_attribute("saturate", 0))
        return f"{node.name} saturate = 0"
    if kind == "kernel_shape":
        value = [rng.choice((1, 2, 3, 5))]
        _replace_attribute(node, helper.make_attribute("kernel_shape", value))
        return f"{node.name} kernel_shape = {value}"
    if kind == "pads":
        value = [rng.randint(0, 3), rng.randint(0, 3)]
        _replace_attribute(node, helper.make_attribute("pads", value))
        return f"{node.name} pads = {value}"
    if kind in ("strides", "dilations"):
        value = [rng.choice((1, 2, 3))]
        _replace_attribute(node, helper.make_attribute(kind, value))
        return f"{node.name} {kind} = {value}"
    if kind == "group":
        value = rng.choice((2, 3, 4))
        _replace_attribute(node, helper.make_attribute("group", value))
        return f"{node.name} group = {value}"
    value = rng.choice(("SAME_UPPER", "VALID", "NOTSET", "BOGUS"))
    _replace_attribute(node, helper.make_attribute("auto_pad", value))
    return f"{node.name} auto_pad = {value}"


def _block_weight(model, node, rng) -> str:
    """Per-channel weight DequantizeLinear -> blocked along the other axis (a valid opset-21 rewrite when
    block_size tiles the weight; an invalid one when the scale is tiled for another block size)."""
    weight = numpy_helper.to_array(_initializer(model, node.input[0])[1])
    channel_axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % 2
    block_axis = 1 - channel_axis
    block_size = rng.choice((1, 4, 5, 8, weight.shape[block_axis]))
    tiled_for = block_size if rng.random() < 0.8 else block_size + 1
    blocks = -(-weight.shape[block_axis] // tiled_for)
    for name in node.input[1:3]:
        if not name:
            continue
        value = numpy_helper.to_array(_initializer(model, name)[1]).reshape(-1)
        tiled = np.repeat(np.expand_dims(value, block_axis), blocks, axis=block_axis)
        _set_initializer(model, name, tiled)
    _replace_attribute(node, helper.make_attribute("axis", block_axis))
    _replace_attribute(node, helper.make_attribute("block_size", block_size))
    return f"{node.name} blocked: block_size {block_size} on axis {block_axis}, scale tiled for {tiled_for}"


def _scale_to_constant_node(model, rng) -> str:
    name = rng.choice(_scale_names(model))
    k, tensor = _initializer(model, name)
    value = numpy_helper.to_array(tensor).copy()
    poisoned = rng.random() < 0.5
    if poisoned:
        value.reshape(-1)[0] = rng.choice((0.0, math.nan, -1.0, 1e38))
    del model.graph.initializer[k]
    model.graph.node.insert(0, helper.make_node("Constant", [], [name], name=f"{name}_const",
                                                value=numpy_helper.from_array(value, name)))
    return f"scale {name} as a Constant node" + (f" holding {float(value.reshape(-1)[0])!r}" if poisoned else "")


def mutate_structure(model, rng) -> str:
    g = model.graph
    nodes = list(g.node)
    kind = rng.choice(("drop", "duplicate", "duplicate_renamed", "dangling", "cycle", "rename_output",
                       "output_to_intermediate", "no_nodes", "no_outputs", "reverse", "gather", "gather",
                       "swap_inputs", "initializer_as_input", "constant_node"))
    if kind == "constant_node":
        return _scale_to_constant_node(model, rng)
    if kind == "drop":
        k = rng.randrange(len(nodes))
        del g.node[k]
        return f"node {nodes[k].name} dropped"
    if kind in ("duplicate", "duplicate_renamed"):
        k = rng.randrange(len(nodes))
        copy = onnx.NodeProto()
        copy.CopyFrom(nodes[k])
        if kind == "duplicate_renamed":
            copy.name += "_copy"
            for j, out in enumerate(copy.output):
                copy.output[j] = out + "_copy"
        g.node.insert(k + 1, copy)
        return f"node {nodes[k].name} duplicated" + (" with renamed outputs" if kind == "duplicate_renamed" else "")
    if kind == "dangling":
        node = rng.choice([n for n in g.node if n.input])
        p = rng.randrange(len(node.input))
        node.input[p] = "no_such_tensor"
        return f"{node.name} input {p} -> undefined tensor"
    if kind == "cycle":
        i = rng.randrange(len(nodes))
        j = rng.randrange(i, len(nodes))
        g.node[i].input[0] = nodes[j].output[0]
        return f"{nodes[i].name} input 0 <- {nodes[j].name} output (cycle)"
    if kind == "rename_output":
        old = g.output[0].name
        g.output[0].name = "renamed_y"
        return f"graph output {old} renamed (no producer)"
    if kind == "output_to_intermediate":
        node = rng.choice(nodes[:-1])
        g.output[0].name = node.output[0]
        g.output[0].type.tensor_type.ClearField("shape")
        return f"graph output -> intermediate {node.output[0]}"
    if kind == "no_nodes":
        del g.node[:]
        return "all nodes removed"
    if kind == "no_outputs":
        del g.output[:]
        return "all graph outputs removed"
    if kind == "reverse":
        reordered = list(reversed(nodes))
        del g.node[:]
        g.node.extend(reordered)
        return "node order reversed"
    if kind == "gather":
        out = g.output[0]
        rank = len(out.type.tensor_type.shape.dim)
        last = out.type.tensor_type.shape.dim[rank - 1].dim_value
        index = rng.choice((0, last - 1, -1, -last, last, -last - 1, 1000, -1000))
        for node in g.node:
            for j, name in enumerate(node.output):
                if name == out.name:
                    node.output[j] = out.name + "_pre_gather"
        g.initializer.append(numpy_helper.from_array(np.array([index], np.int64), "gather_index"))
        g.node.append(helper.make_node("Gather", [out.name + "_pre_gather", "gather_index"], [out.name],
                                       name="fuzz_gather", axis=rank - 1))
        out.type.tensor_type.shape.dim[rank - 1].dim_value = 1
        return f"Gather index {index} on axis {rank - 1} (size {last}) of the output"
    if kind == "swap_inputs":
        node = rng.choice([n for n in g.node if len(n.input) >= 2])
        a, b = rng.sample(range(len(node.input)), 2)
        node.input[a], node.input[b] = node.input[b], node.input[a]
        return f"{node.name} inputs {a} and {b} swapped"
    init = rng.choice(list(g.initializer))
    g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return f"initializer {init.name} also a graph input (overridable)"


_SEMANTIC = {
    "scale": mutate_scale,
    "zero_point": mutate_zero_point,
    "dtype": mutate_dtype,
    "shape": mutate_shape,
    "opset": mutate_opset,
    "attribute": mutate_attribute,
    "structure": mutate_structure,
}


# ---------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class Outcome:
    outcome: str  # one of OUTCOMES
    detail: str
    ort_runs: bool | None = None  # for errors: whether ONNX Runtime loads and runs the model


def ort_runs_model(path: Path) -> bool:
    """Whether ONNX Runtime (optimizations off) loads `path` and runs it on random inputs."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 4
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else 8 for d in i.shape]
            feeds[i.name] = rng.normal(0, 1, shape).astype(_ORT_NUMPY.get(i.type, "float32"))
        session.run(None, feeds)
        return True
    except Exception:  # noqa: BLE001
        return False


_ORT_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


def run_case(case: FuzzCase, workdir: Path) -> Outcome:
    """Compile `case` for host; verify the artifact against ONNX Runtime when it compiles."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.errors import NativeqError
    from nativeq.verify import VerifyConfig, verify_artifact

    workdir.mkdir(parents=True, exist_ok=True)
    path, out = workdir / f"{case.id}.onnx", workdir / f"{case.id}.artifact"
    path.write_bytes(case.data)
    try:
        compile_model(path, out, CompileConfig(target="host", use_tuning=False), force=True)
    except NativeqError as e:
        message = str(e)
        kind = "error" if message.strip() and "\n" not in message.strip() else "traceback"
        return Outcome(kind, message, ort_runs=ort_runs_model(path))
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    try:
        report = verify_artifact(out, path, VerifyConfig())
    except NativeqError as e:
        accepted = next((why for key, why in ORT_REFUSALS_ACCEPTED.items() if key in str(e)), None)
        if accepted is None:
            return Outcome("wrong", f"compiled, but verify: {e}")
        problem = compare_with_reference_evaluator(out, path)
        if problem:
            return Outcome("wrong", f"ONNX Runtime refuses it ({accepted}); vs the ONNX reference evaluator: {problem}")
        return Outcome("verified", f"agrees with the ONNX reference evaluator (ONNX Runtime refuses it: {accepted})")
    except Exception as e:  # noqa: BLE001
        return Outcome("wrong", f"compiled, but verify crashed: {type(e).__name__}: {e}")
    if not report.passed:
        worst = max(report.outputs, key=lambda o: o.max_abs)
        return Outcome("wrong", f"differs from ONNX Runtime: {worst.name} max|diff| {worst.max_abs:.4g} "
                                f"({worst.max_steps} steps) {worst.problem or ''}".strip())
    return Outcome("verified", "agrees with ONNX Runtime")


def _reference_qlinear_conv():
    from onnx.reference.ops.op_conv import _conv_implementation
    from onnx.reference.ops.op_qlinear_conv import QLinearConv as OnnxQLinearConv

    class QLinearConv(OnnxQLinearConv):  # NOTE: the class name is the op type it replaces
        """The spec's QLinearConv (onnx.reference's own broadcasts a per-channel w_scale for 2-D convs only)."""

        def _run(self, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None,
                 auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None, strides=None):
            channel = (-1,) + (1,) * (w.ndim - 1)
            centered_x = x.astype(np.int64) - (0 if x_zero_point is None else x_zero_point.astype(np.int64))
            centered_w = w.astype(np.int64) - (0 if w_zero_point is None else
                                               np.reshape(w_zero_point, channel if np.size(w_zero_point) > 1 else ()))
            acc = _conv_implementation(centered_x.astype(np.float64), centered_w.astype(np.float64), B,
                                       auto_pad or self.auto_pad, dilations or self.dilations, group or self.group,
                                       kernel_shape or self.kernel_shape, pads or self.pads, strides or self.strides)
            multiplier = np.float32(x_scale) * np.reshape(w_scale, (1, -1) + (1,) * (w.ndim - 2)).astype(np.float32) / np.float32(y_scale)
            y = np.rint(acc * multiplier) + (0 if y_zero_point is None else y_zero_point.astype(np.int64))
            dtype = np.uint8 if y_zero_point is None else y_zero_point.dtype
            return (np.clip(y, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype),)

    return QLinearConv


def compare_with_reference_evaluator(artifact: Path, onnx_path: Path) -> str | None:
    """Run the artifact and `onnx.reference.ReferenceEvaluator` on verify's inputs; the first disagreement, or None."""
    from onnx.reference import ReferenceEvaluator

    import nativeq
    from nativeq.verify.inputs import random_inputs
    from nativeq.verify.report import OutputComparison, accumulate

    compiled = nativeq.load(artifact)
    model = onnx.load(str(onnx_path))
    inputs = random_inputs(compiled.inputs, model, {}, 0)
    got = compiled.run(inputs)
    expected = ReferenceEvaluator(model, new_ops=[_reference_qlinear_conv()]).run(None, inputs)
    for spec, ref in zip(compiled.outputs, expected):
        comparison = OutputComparison(name=spec.name, dtype=spec.dtype)
        accumulate(comparison, np.asarray(got[spec.name]), np.asarray(ref), spec.quant, 1.0, 1e-3)
        if not comparison.passed:
            return (f"{spec.name} max|diff| {comparison.max_abs:.4g} ({comparison.max_steps} steps) "
                    f"{comparison.problem or ''}").strip()
    return None


def run_cli(case: FuzzCase, workdir: Path) -> dict:
    """`nativeq compile` on `case` as a user runs it: exit code and stderr."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{case.id}.onnx"
    path.write_bytes(case.data)
    exe = Path(sys.executable).with_name("nativeq")
    res = subprocess.run([str(exe), "compile", str(path), "--target", "host", "--no-tuning", "-o",
                          str(workdir / f"{case.id}.cli"), "--force"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"})
    return {"returncode": res.returncode, "stderr": res.stderr}


def cli_problem(result: dict) -> str | None:
    """Why a CLI run of a refused model is not one clean `error:` line (None when it is)."""
    stderr = result["stderr"]
    if result["returncode"] == 0:
        return "exit 0"
    if "Traceback" in stderr:
        return "traceback on stderr"
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("warning: ")]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"stderr is not one error line: {stderr[:300]!r}"
    if lines[0].startswith("error: internal error"):
        return "internal error"
    return None


# ---------------------------------------------------------------------------------------------
# A campaign: child processes write one JSON line per case; a child that dies is a crash


def _worker(indices: list[int], seed: int, workdir: Path, out: Path, cli_every: int) -> None:
    import shutil
    import warnings

    warnings.simplefilter("ignore")
    with out.open("a") as f:
        for index in indices:
            case = make_case(index, seed)
            started = time.perf_counter()
            f.write(json.dumps({"index": index, "started": True}) + "\n")
            f.flush()
            result = asdict(run_case(case, workdir))
            if cli_every and index % cli_every == 0 and result["outcome"] in ("error", "traceback"):
                cli = run_cli(case, workdir)
                result["cli"] = cli_problem(cli) or "ok"
                if result["cli"] != "ok":
                    result["outcome"] = "traceback"
                    result["detail"] += f" | CLI: {result['cli']}"
            record = {"index": index, "id": case.id, "category": case.category, "base": case.base,
                      "mutation": case.mutation, "seconds": round(time.perf_counter() - started, 2), **result}
            f.write(json.dumps(record) + "\n")
            f.flush()
            for leftover in workdir.glob(f"{case.id}*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()


def run_campaign(count: int, seed: int, out: Path, workdir: Path, cli_every: int = 10,
                 case_timeout: float = 300.0) -> list[dict]:
    """Run cases 0..count-1 in child processes; return one record per case (dead children give crashes)."""
    def crash(index: int, returncode: int | None) -> dict:
        case = make_case(index, seed)
        return {"index": index, "id": case.id, "category": case.category, "base": case.base,
                "mutation": case.mutation, "outcome": "crash", "detail": f"process died (exit {returncode}) or hung"}

    worker = [sys.executable, __file__, "--worker", "--seed", str(seed), "--out", str(out), "--workdir", str(workdir),
              "--cli-every", str(cli_every)]
    return run_in_children(worker, count, out, workdir, crash, case_timeout)


REFUSAL_STAGES = ("parse", "onnx.checker", "validate", "import")
_VALIDATE_MESSAGE = re.compile(r"^\S+ node ('[^']*'|#\d+ \(unnamed\)): |^graph '[^']*' (has no nodes|declares no outputs)"
                               r"|^model imports ONNX opset |not UTF-8 text")


def refusal_stage(message: str) -> str:
    """Which stage of `compile_model` refused a model, from its error message ("import": legalize or TVM)."""
    if "is not an ONNX model" in message:
        return "parse"
    if "fails onnx.checker" in message:
        return "onnx.checker"
    if _VALIDATE_MESSAGE.search(message):
        return "validate"
    return "import"


def stage_table(records: list[dict]) -> str:
    """Clean errors per category by the stage that refused them."""
    header = ("category", *REFUSAL_STAGES)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for category in (*CATEGORIES, "total"):
        errors = [r for r in records if r["outcome"] == "error" and category in ("total", r["category"])]
        counts = [sum(refusal_stage(r["detail"]) == stage for r in errors) for stage in REFUSAL_STAGES]
        lines.append("| " + " | ".join(str(c) for c in (category, *counts)) + " |")
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """Tried / per-outcome counts per category, and the refusals ONNX Runtime would have run."""
    rows = []
    for category in (*CATEGORIES, "total"):
        rs = [r for r in records if category == "total" or r["category"] == category]
        counts = [sum(r["outcome"] == o for r in rs) for o in OUTCOMES]
        ort_ran = sum(bool(r.get("ort_runs")) for r in rs if r["outcome"] == "error")
        rows.append((category, len(rs), *counts, ort_ran))
    header = ("category", "tried", "clean error", "verified", "crash", "traceback", "wrong", "refused, ORT runs it")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz.jsonl"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cli-every", type=int, default=10, help="run every Nth refused case through the CLI too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--indices", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker([int(i) for i in args.indices.split(",") if i], args.seed, args.workdir, args.out, args.cli_every)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nativeq-fuzz-") as tmp:
        records = run_campaign(args.cases, args.seed, args.out, args.workdir or Path(tmp), args.cli_every)
    print(summary_table(records))
    print()
    print(stage_table(records))
    for r in records:
        if r["outcome"] not in ("error", "verified"):
            print(f"{r['outcome']}: {r['id']} ({r['mutation']}): {r['detail']}")
    return 0 if all(r["outcome"] in ("error", "verified") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
