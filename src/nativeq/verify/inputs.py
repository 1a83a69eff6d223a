"""Seeded random inputs that respect each input's dtype and shape, and exercise quantizers.

Rules (general, not tied to any model):
- symbolic dims take the size given by `--dim NAME=SIZE`, else `DEFAULT_DIM` (64);
- a float input consumed by a QuantizeLinear (directly or through Identity) with constant
  scale s and zero point z of dtype [qmin, qmax] is drawn uniformly from
  [(qmin - z)·s, (qmax - z)·s] widened by 5 % of its width on each side, so every quantization level
  and the saturation on both ends are exercised;
- other float inputs: standard normal;
- int8/uint8/int16/uint16 inputs: uniform over the dtype's full range; wider integer inputs
  (often indices or lengths): uniform in [0, 16); bool: fair coin.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from nativeq.errors import NativeqError
from nativeq.runtime.manifest import TensorSpec

DEFAULT_DIM = 64
_QUANT_WIDEN = 0.10
_WIDE_INT_HIGH = 16


def resolve_shape(spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else int(dims.get(d, DEFAULT_DIM)) for d in spec.shape)


def check_dims(specs, dims: dict[str, int], fixed: dict | None = None) -> dict[str, int]:
    """Every `--dim` names a symbolic dim of some input, or a dim the artifact was compiled for (`compile --dim`,
    its manifest's `build.dims`) at that same size; returns the `--dim`s of the symbolic dims."""
    symbolic = sorted({d for s in specs for d in s.shape if isinstance(d, str)})
    fixed = fixed or {}
    for name, size in dims.items():
        if name in symbolic:
            continue
        if name in fixed:
            if int(fixed[name]) != int(size):
                raise NativeqError(f"--dim {name}={size}: the artifact was compiled for {name}={fixed[name]} "
                                   f"(compile --dim) and runs that size only")
            continue
        known = ", ".join(symbolic) if symbolic else "none"
        raise NativeqError(f"--dim {name}: the model has no symbolic dim {name!r} (its symbolic dims: {known})")
    return {name: size for name, size in dims.items() if name in symbolic}


def quantizer_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Graph input name -> float range its QuantizeLinear can represent (scalar scale/zp only)."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    aliases = {vi.name: vi.name for vi in graph.input}
    for node in graph.node:  # follow Identity chains from the inputs
        if node.op_type == "Identity" and node.input[0] in aliases:
            aliases[node.output[0]] = aliases[node.input[0]]
    ranges: dict[str, tuple[float, float]] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in aliases:
            continue
        scale = constants.get(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zero_point = constants.get(zp_name) if zp_name else np.array(0, np.uint8)
        if scale is None or zero_point is None:
            continue
        info = np.iinfo(zero_point.dtype) if np.issubdtype(zero_point.dtype, np.integer) else None
        if info is None:
            continue
        s = float(np.max(scale))
        z = float(np.mean(zero_point))
        low, high = (info.min - z) * s, (info.max - z) * s
        widen = _QUANT_WIDEN * (high - low)
        ranges[aliases[node.input[0]]] = (low - widen / 2, high + widen / 2)
    return ranges


def random_inputs(specs, model: onnx.ModelProto, dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranges = quantizer_ranges(model)
    inputs = {}
    for spec in specs:
        shape = resolve_shape(spec, dims)
        dtype = np.dtype(spec.dtype)
        if spec.value is not None:  # fixed at compile time: its only value
            inputs[spec.name] = np.asarray(spec.value, dtype).reshape(shape)
            continue
        if dtype.kind == "f":
            if spec.name in ranges:
                low, high = ranges[spec.name]
                value = rng.uniform(low, high, shape)
            else:
                value = rng.standard_normal(shape)
        elif dtype.kind in "iu":
            if dtype.itemsize <= 2:
                info = np.iinfo(dtype)
                value = rng.integers(info.min, int(info.max) + 1, shape)
            else:
                value = rng.integers(0, _WIDE_INT_HIGH, shape)
        elif dtype.kind == "b":
            value = rng.integers(0, 2, shape)
        else:
            raise NativeqError(f"input {spec.name!r}: cannot make random {dtype} inputs; pass --inputs FILE.npz")
        inputs[spec.name] = value.astype(dtype)
    return inputs
