"""The artifact directory's `manifest.json`: its schema, reading it, and checking it.

Written by `nativeq.compile` (see `compile/artifact.py`), read by `nativeq.load`, by
`nativeq verify`, and by the C++ runner on the device. Stdlib only.

Schema (version 1)::

    {
      "schema": 1,
      "nativeq_version": "0.1.0", "tvm_version": "0.27.0", "tvm_ffi_version": "0.1.14.post1",
      "library": "model.so",            # the exported Relax VM executable
      "entry": "main",                  # Relax function to call
      "target": {"name", "tvm" (TVM target dict), "arch", "int8", "cpu_features",
                 "qemu_cpu", "cross_compiler"},
      "source": {"file": "model.onnx", "sha256": "..."},
      "files": {"model.so": "<sha256>"},   # every file of the directory except manifest.json
      "inputs":  [{"name", "dtype", "shape": [1, "T", 80]}],           # VM argument order
      "outputs": [{"name", "dtype", "shape", "quant": null | {"scale", "zero_point",
                   "dtype", "axis"}}],                                  # ONNX output order
      "build": {...}, "tuning": {...}, "int8_report": {...} | null, "compile_seconds": 1.2
    }

Symbolic dims stay strings (their ONNX names); static dims are ints. `quant` is set for
outputs produced by a DequantizeLinear (possibly through Identity) so a verifier can count
quantization steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nativeq._fs import sha256_file
from nativeq.errors import NativeqError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape (int = static, str = symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None  # None: the ONNX graph does not declare it
    quant: dict | None = None

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=None if d.get("shape") is None else tuple(d["shape"]),
                   quant=d.get("quant"))

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}
        if self.quant is not None:
            d["quant"] = self.quant
        return d

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype}[?]"
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def read_manifest(artifact_dir: str | Path) -> dict:
    """Parse `artifact_dir/manifest.json`; one-line NativeqError if it is not a nativeq artifact."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.exists():
        raise NativeqError(f"artifact {artifact_dir} does not exist")
    if not artifact_dir.is_dir():
        raise NativeqError(f"artifact {artifact_dir} is not a directory (expected the output of `nativeq compile`)")
    path = artifact_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise NativeqError(f"{artifact_dir} is not a nativeq artifact (no {MANIFEST_NAME})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NativeqError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        got = manifest.get("schema") if isinstance(manifest, dict) else None
        raise NativeqError(f"{path}: manifest schema {got!r} is not supported (this nativeq reads schema {SCHEMA_VERSION})")
    for key in ("library", "files", "inputs", "outputs", "target"):
        if key not in manifest:
            raise NativeqError(f"{path}: manifest lacks {key!r}")
    return manifest


def check_files(artifact_dir: str | Path, manifest: dict) -> None:
    """Every file listed in the manifest exists and has its recorded sha256."""
    artifact_dir = Path(artifact_dir)
    for name, digest in manifest["files"].items():
        path = artifact_dir / name
        if not path.is_file():
            raise NativeqError(f"artifact file {path} is missing")
        if sha256_file(path) != digest:
            raise NativeqError(f"artifact file {path} was modified (sha256 mismatch)")


def input_specs(manifest: dict) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d) for d in manifest["inputs"])


def output_specs(manifest: dict) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d) for d in manifest["outputs"])
