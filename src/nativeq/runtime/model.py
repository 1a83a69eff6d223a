"""`CompiledModel`: a loaded artifact you call with numpy arrays by input name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError
from nativeq.runtime.manifest import TensorSpec, input_specs, output_specs


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, object]) -> list[np.ndarray]:
    """Validate `inputs` against `specs`; return the arrays in spec order.

    A wrong or missing name, a dtype other than the declared one (no silent casts), a wrong
    rank, a static dim of another size, or one symbolic dim bound to two sizes raises a
    NativeqError naming the input, what was expected and what was given.
    """
    by_name = {s.name: s for s in specs}
    for name in inputs:
        if name not in by_name:
            listing = "; ".join(str(s) for s in specs)
            raise NativeqError(f"unknown input {name!r}; the model's inputs are: {listing}")
    arrays: list[np.ndarray] = []
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise NativeqError(f"missing input {spec.name!r} ({spec})")
        value = inputs[spec.name]
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.dtype != np.dtype(spec.dtype):
            raise NativeqError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype}")
        if array.ndim != len(spec.shape):
            raise NativeqError(
                f"input {spec.name!r}: expected shape {_shape_text(spec.shape)} (rank {len(spec.shape)}), "
                f"got {tuple(array.shape)} (rank {array.ndim})"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int):
                if want != got:
                    raise NativeqError(
                        f"input {spec.name!r}: dim {axis} must be {want}, got {got} "
                        f"(expected {_shape_text(spec.shape)}, got {tuple(array.shape)})"
                    )
            elif want in bound and bound[want][0] != got:
                size, where = bound[want]
                raise NativeqError(
                    f"input {spec.name!r}: dim {axis} ({want}) is {got} but {want}={size} from input {where!r}"
                )
            else:
                bound[str(want)] = (got, spec.name)
        arrays.append(np.ascontiguousarray(array))
    return arrays


ALIGNMENT = 64  # bytes: what TVM's kernels assume of every tensor they are given


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` if it is C-contiguous at a 64-byte aligned address, else such a copy of it."""
    if array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0:
        return array
    buffer = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    offset = -buffer.ctypes.data % ALIGNMENT
    copy = buffer[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


class CompiledModel:
    """A compiled artifact loaded into a Relax VM on this CPU.

    `model(x=feats)` or `model.run({"x": feats})` returns a dict name -> np.ndarray in the
    ONNX output order. `.inputs` / `.outputs` are `TensorSpec`s.
    """

    def __init__(self, path: Path, manifest: dict, vm, device):
        self.path = Path(path)
        self.manifest = manifest
        self.inputs: tuple[TensorSpec, ...] = input_specs(manifest)
        self.outputs: tuple[TensorSpec, ...] = output_specs(manifest)
        self.target: str = manifest["target"]["name"]
        self._vm = vm
        self._device = device
        self._entry = vm[manifest.get("entry", "main")]

    def run(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        from tvm import runtime

        arrays = [aligned(a) for a in check_inputs(self.inputs, inputs)]
        # NOTE: zero-copy both ways (DLPack): a tensor copy costs ~30 us a call, more than a small model's
        # kernels. The kernels read the caller's arrays in place and never write them; every call's outputs
        # are fresh VM allocations, so the returned arrays own their memory (through the DLPack capsule).
        result = self._entry(*(runtime.from_dlpack(a) for a in arrays))
        values = [result] if isinstance(result, runtime.Tensor) else list(result)
        if len(values) != len(self.outputs):
            raise NativeqError(
                f"artifact {self.path} returned {len(values)} outputs, its manifest lists {len(self.outputs)}"
            )
        return {spec.name: np.from_dlpack(value) for spec, value in zip(self.outputs, values)}

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"CompiledModel({str(self.path)!r}, target={self.target!r}, inputs=({ins}), outputs=({outs}))"
