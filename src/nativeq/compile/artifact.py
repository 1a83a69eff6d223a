"""What `nativeq compile` writes: input/output specs read from the ONNX graph, and the manifest.

The manifest schema is documented (and read) in `nativeq/runtime/manifest.py`, because the
runtime side must read it without importing the compiler.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import nativeq
from nativeq._fs import sha256_file, write_json_atomic
from nativeq.runtime import tvm_ffi_version, tvm_version
from nativeq.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, TensorSpec, seal_manifest


def _np_dtype_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _shape(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:  # an anonymous dynamic dim: give it a stable name
            dims.append(f"{value_info.name}_dim{axis}")
    return tuple(dims)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of `graph`, by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _output_quant(graph: onnx.GraphProto, name: str, constants: dict[str, np.ndarray],
                  elem_types: dict[str, int]) -> dict | None:
    """{scale, zero_point, dtype, axis} if output `name` comes from a DequantizeLinear (via Identity)."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale_name = node.input[1]
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if scale_name not in constants or (zp_name is not None and zp_name not in constants):
        return None
    scale = constants[scale_name].astype(np.float64)
    if zp_name is not None:
        zero_point = constants[zp_name]
        qdtype = zero_point.dtype.name
    else:
        zero_point = np.zeros_like(scale, dtype=np.int64)
        qtype = elem_types.get(node.input[0])
        qdtype = _np_dtype_name(qtype) if qtype else "uint8"
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return {
        "scale": scale.tolist(),
        "zero_point": zero_point.astype(np.int64).tolist(),
        "dtype": qdtype,
        "axis": int(axis) if scale.ndim else None,
    }


def io_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's runtime inputs (graph inputs that are not initializers) and outputs, in ONNX order."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.value_info}
    except Exception:  # noqa: BLE001  (shape inference is best effort here; the checker passed)
        elem_types = {}
    elem_types.update({init.name: init.data_type for init in graph.initializer})
    constants = _constant_values(graph)
    inputs = [
        TensorSpec(vi.name, _np_dtype_name(vi.type.tensor_type.elem_type), _shape(vi) or ())
        for vi in graph.input
        if vi.name not in initializers
    ]
    outputs = [
        TensorSpec(vi.name, _np_dtype_name(vi.type.tensor_type.elem_type), _shape(vi),
                   _output_quant(graph, vi.name, constants, elem_types))
        for vi in graph.output
    ]
    return inputs, outputs


def build_manifest(*, out_dir: Path, library: str, target, model_path: Path, model: onnx.ModelProto,
                   build: dict, tuning: dict, int8_report: dict | None, compile_seconds: float,
                   kernels: list[dict] | None = None, kernel_dims: dict | None = None) -> dict:
    """The manifest of the artifact being written in `out_dir` (all other files already there).

    kernels: the kernel report (`compile/kernels.py`: one record per fused kernel), stored as
    "kernels" with the symbolic sizes its MAC counts assume as "kernel_dims"; None leaves both out.
    """
    inputs, outputs = io_specs(model)
    fixed = build.get("input_values") or {}
    inputs = [replace(spec, value=tuple(np.asarray(fixed[spec.name]).astype(spec.dtype).tolist()))
              if spec.name in fixed else spec for spec in inputs]
    files = {
        p.name: sha256_file(p)
        for p in sorted(out_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "schema": SCHEMA_VERSION,
        "nativeq_version": nativeq.__version__,
        "tvm_version": tvm_version(),
        "tvm_ffi_version": tvm_ffi_version(),
        "library": library,
        "entry": "main",
        "target": {
            "name": target.name,
            "tvm": target.tvm_dict(),
            "arch": target.arch,
            "int8": target.int8,
            "cpu_features": list(target.cpu_features),
            "qemu_cpu": target.qemu_cpu,
            "cross_compiler": target.cross_compiler,
        },
        "source": {"file": model_path.name, "sha256": sha256_file(model_path)},
        "files": files,
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "build": {**build, "host": f"{platform.system()} {platform.machine()}"},
        "tuning": tuning,
        "int8_report": int8_report,
        "compile_seconds": round(compile_seconds, 3),
    }
    if kernels is not None:
        manifest["kernels"] = kernels
        manifest["kernel_dims"] = dict(kernel_dims or {})
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Seal `manifest` (set its `manifest_sha256`, in place) and write it as `out_dir/manifest.json`.

    Call it last: the manifest lists every other file of `out_dir` with its sha256, and `nativeq.load`
    refuses a directory holding a file the manifest does not list.
    """
    write_json_atomic(out_dir / MANIFEST_NAME, seal_manifest(manifest))
