"""The artifact directory's `manifest.json`: its schema, reading it, and checking it.

Written by `nativeq.compile` (see `compile/artifact.py`), read by `nativeq.load`, by
`nativeq verify`, and by the C++ runner on the device. Stdlib only.

Schema (version 1)::

    {
      "schema": 1,
      "manifest_sha256": "<sha256>",    # of the canonical JSON of every other field (see `manifest_digest`)
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
      "shape_checks": [{"node", "op", "lhs", "rhs"}],  # size conditions checked before a run (runtime/shape_checks.py)
      "memory": null | {"method", "bytes": [{"coef", "dims": {"T": 2}}]},  # bound of a call's memory (runtime/memory.py)
      "sizes": {"weight_bytes", "code_bytes", "library_bytes", "debug_bytes", "stripped",
                "arena_bytes", "arena_expr", "arena_dims": {"T": 64}},  # what the artifact costs (compile/sizes.py)
      "kernels": [{"name", "kind", "schedule", "rule", "macs", "calls", "share", "weight_bytes",
                   "onnx_nodes": [{"op", "name"}]}],
      "kernel_dims": {"T": 64},         # the symbolic sizes the kernel report (and arena_bytes) assume
      "build": {...}, "tuning": {...}, "int8_report": {...} | null, "compile_seconds": 1.2
    }

Symbolic dims stay strings (their ONNX names); static dims are ints. `quant` is set for
outputs produced by a DequantizeLinear (possibly through Identity) so a verifier can count
quantization steps.

`sizes` (absent in artifacts built before it; any of its numbers may be null when the compiler
could not read that part): `weight_bytes` the constants the library stores, as stored (after
weight packing, each distinct content once; each kernel record has those its calls read);
`code_bytes` the `.text` section of the library; `library_bytes` its file size; `debug_bytes` its
debug sections (0 unless compiled with `--debug`; `stripped` says so); `arena_bytes` the
activation storage the VM's static memory plan allocates per call (outputs not included),
evaluated at `arena_dims` when it depends on symbolic sizes (`arena_expr` is then the formula
in the ONNX dim names, e.g. "64*T"; null when static).

The artifact is sealed: `read_manifest` refuses a manifest whose `manifest_sha256` does not
match its content, and checks the type of every field the runtime, `verify` and the bundler
read; `check_files` refuses a directory holding any file the manifest does not list, or a
listed file that is missing or whose sha256 differs. The seal detects corruption and edits;
it is not a signature (anyone who can write the directory can recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from nativeq._fs import sha256_file
from nativeq.errors import NativeqError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SEAL_FIELD = "manifest_sha256"

# numpy dtype names a manifest may give an input or output (what `compile/artifact.io_specs` writes)
DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "bfloat16", "int4", "uint4",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
})
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape (int = static, str = symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None  # None: the ONNX graph does not declare it
    quant: dict | None = None
    value: tuple | None = None  # an input fixed at compile time (`--input-value`): its only accepted value, flat

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=None if d.get("shape") is None else tuple(d["shape"]),
                   quant=d.get("quant"), value=None if d.get("value") is None else tuple(d["value"]))

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}
        if self.quant is not None:
            d["quant"] = self.quant
        if self.value is not None:
            d["value"] = list(self.value)
        return d

    def __str__(self) -> str:
        name = _shown(self.name)
        if self.shape is None:
            return f"{name}: {self.dtype}[?]"
        dims = ", ".join(str(d) for d in self.shape)
        fixed = "" if self.value is None else " = " + ", ".join(str(v) for v in self.value)
        return f"{name}: {self.dtype}[{dims}]{fixed}"


# ----------------------------------------------------------------------------- the seal
def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, ASCII) of `manifest` without its seal field."""
    body = {k: v for k, v in manifest.items() if k != SEAL_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """Set `manifest[SEAL_FIELD]` to the digest of the rest of it (as it reads back from JSON); returns it."""
    manifest.pop(SEAL_FIELD, None)
    manifest[SEAL_FIELD] = manifest_digest(json.loads(json.dumps(manifest)))
    return manifest


# ----------------------------------------------------------------------------- reading
def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise NativeqError(f"repeats key {key!r}")
        seen[key] = value
    return seen


class _Fields:
    """Type checks for the fields of one manifest; every failure names the field, what it must be and what it is."""

    def __init__(self, artifact_dir: Path):
        self.where = f"artifact {artifact_dir}: manifest field"

    def fail(self, field: str, must: str, value) -> NativeqError:
        shown = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else _type_name(value)
        return NativeqError(f"{self.where} {field!r} must be {must}, got {shown}")

    def get(self, obj: dict, key: str, prefix: str = ""):
        if key not in obj:
            raise NativeqError(f"{self.where} {prefix + key!r} is missing")
        return obj[key]

    def text(self, obj: dict, key: str, prefix: str = "", optional: bool = False) -> str | None:
        value = obj.get(key) if optional else self.get(obj, key, prefix)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(prefix + key, "a non-empty string" + (" or null" if optional else ""), value)
        return value

    def mapping(self, obj: dict, key: str, prefix: str = "") -> dict:
        value = self.get(obj, key, prefix)
        if not isinstance(value, dict):
            raise self.fail(prefix + key, "an object", value)
        return value

    def array(self, obj: dict, key: str, prefix: str = "") -> list:
        value = self.get(obj, key, prefix)
        if not isinstance(value, list):
            raise self.fail(prefix + key, "a list", value)
        return value

    def tensor(self, d, field: str, output: bool) -> None:
        if not isinstance(d, dict):
            raise self.fail(field, "an object {name, dtype, shape}", d)
        self.text(d, "name", f"{field}.")
        dtype = self.text(d, "dtype", f"{field}.")
        if dtype not in DTYPES:
            raise self.fail(f"{field}.dtype", "a numpy dtype name (e.g. float32, int8)", dtype)
        shape = self.get(d, "shape", f"{field}.")
        if shape is None and output:
            pass
        elif not isinstance(shape, list):
            raise self.fail(f"{field}.shape", "a list of dims" + (" or null" if output else ""), shape)
        else:
            for axis, dim in enumerate(shape):
                if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 0 or isinstance(dim, str) and dim):
                    raise self.fail(f"{field}.shape[{axis}]", "an int ≥ 0 or a dim name", dim)
        quant = d.get("quant")
        if quant is None:
            return
        if not output or not isinstance(quant, dict):
            raise self.fail(f"{field}.quant", "an object {scale, zero_point, dtype, axis} or null" if output else
                            "absent (inputs carry no quant)", quant)
        numbers = (int, float)
        for key, kinds in (("scale", numbers), ("zero_point", (int,))):
            value = self.get(quant, key, f"{field}.quant.")
            items = value if isinstance(value, list) else [value]
            if not items or any(isinstance(v, bool) or not isinstance(v, kinds) for v in items):
                raise self.fail(f"{field}.quant.{key}", "a number or a non-empty list of numbers", value)
        self.text(quant, "dtype", f"{field}.quant.")
        axis = quant.get("axis")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise self.fail(f"{field}.quant.axis", "an int or null", axis)


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and name.isprintable() and name != MANIFEST_NAME


def _shown(name: str) -> str:
    """A file name for a one-line message: as it is, or quoted with escapes if it holds a line break or another
    unprintable character."""
    return name if name.isprintable() else repr(name)


def _check_fields(artifact_dir: Path, manifest: dict) -> None:
    f = _Fields(artifact_dir)
    for key in ("nativeq_version", "tvm_version", "tvm_ffi_version", "entry"):
        f.text(manifest, key)

    target = f.mapping(manifest, "target")
    for key in ("name", "arch", "int8"):
        f.text(target, key, "target.")
    f.mapping(target, "tvm", "target.")
    features = f.array(target, "cpu_features", "target.")
    if any(not isinstance(x, str) or not x for x in features):
        raise f.fail("target.cpu_features", "a list of feature names", features)
    for key in ("qemu_cpu", "cross_compiler"):
        f.text(target, key, "target.", optional=True)

    source = f.mapping(manifest, "source")
    f.text(source, "file", "source.")
    if not isinstance(source.get("sha256"), str) or not _SHA256.fullmatch(source["sha256"]):
        raise f.fail("source.sha256", "a sha256 (64 lowercase hex digits)", source.get("sha256"))

    files = f.mapping(manifest, "files")
    for name, digest in files.items():
        if not _plain_name(name):
            raise NativeqError(f"{f.where} 'files' lists {name!r}; entries must be file names inside the artifact")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise f.fail(f"files.{name}", "a sha256 (64 lowercase hex digits)", digest)
    library = f.get(manifest, "library")
    if not _plain_name(library):
        raise NativeqError(f"{f.where} 'library' must name a file inside the artifact, got {library!r}")
    if library not in files:
        raise NativeqError(f"{f.where} 'files' records no sha256 for the library {library}")

    for key, output in (("inputs", False), ("outputs", True)):
        specs = f.array(manifest, key)
        if output and not specs:
            raise f.fail(key, "a non-empty list", specs)
        for i, spec in enumerate(specs):
            f.tensor(spec, f"{key}[{i}]", output)
        names = [spec["name"] for spec in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise NativeqError(f"{f.where} {key!r} names {repeated[0]!r} more than once")

    checks = manifest.get("shape_checks")  # absent in artifacts without conditions
    if checks is not None and not isinstance(checks, list):
        raise f.fail("shape_checks", "a list of conditions or null", checks)
    for i, check in enumerate(checks or []):
        if not isinstance(check, dict):
            raise f.fail(f"shape_checks[{i}]", "an object {node, op, lhs, rhs}", check)
        for key in ("node", "op", "lhs", "rhs"):
            f.text(check, key, f"shape_checks[{i}].")
    _check_memory(f, manifest.get("memory"))
    _check_sizes(f, manifest.get("sizes"))


def _check_sizes(f: _Fields, sizes) -> None:
    if sizes is None:  # absent in artifacts built before it
        return
    if not isinstance(sizes, dict):
        raise f.fail("sizes", "an object {weight_bytes, code_bytes, library_bytes, arena_bytes, ...}", sizes)
    for key in ("weight_bytes", "code_bytes", "library_bytes", "debug_bytes", "arena_bytes"):
        value = sizes.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise f.fail(f"sizes.{key}", "an int ≥ 0 or null", value)
    dims = sizes.get("arena_dims", {})
    if not isinstance(dims, dict) or any(isinstance(v, bool) or not isinstance(v, int) for v in dims.values()):
        raise f.fail("sizes.arena_dims", "an object dim name -> int", dims)


def _check_memory(f: _Fields, memory) -> None:
    if memory is None:  # absent in artifacts built before it, or when the bound is not a polynomial
        return
    if not isinstance(memory, dict):
        raise f.fail("memory", "an object {method, bytes} or null", memory)
    terms = f.array(memory, "bytes", "memory.")
    for i, term in enumerate(terms):
        coef = term.get("coef") if isinstance(term, dict) else None
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 or coef == float("inf"):
            raise f.fail(f"memory.bytes[{i}].coef", "a finite number ≥ 0", coef)
        dims = term.get("dims", {})
        if not isinstance(dims, dict) or any(not isinstance(k, str) or not k or isinstance(v, bool)
                                             or not isinstance(v, int) or v < 1 for k, v in dims.items()):
            raise f.fail(f"memory.bytes[{i}].dims", "an object dim name -> power (int ≥ 1)", dims)


def read_manifest(artifact_dir: str | Path) -> dict:
    """Parse and validate `artifact_dir/manifest.json`; a one-line NativeqError naming the problem otherwise.

    Checks, in order: the directory and file exist, the file a regular one (not a symlink, FIFO or device);
    it is a JSON object without repeated keys;
    `schema` is this nativeq's; `manifest_sha256` matches the rest of the manifest; every field the
    runtime, `verify` and the bundler read has its type (see the module docstring). The files themselves
    are checked by `check_files`.
    """
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.exists():
        raise NativeqError(f"artifact {artifact_dir} does not exist")
    if not artifact_dir.is_dir():
        raise NativeqError(f"artifact {artifact_dir} is not a directory (expected the output of `nativeq compile`)")
    path = artifact_dir / MANIFEST_NAME
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise NativeqError(f"{artifact_dir} is not a nativeq artifact (no {MANIFEST_NAME})") from None
    except OSError as e:
        raise NativeqError(f"{path} cannot be read: {e.strerror or e}") from None
    # NOTE: checked before any open: opening a FIFO blocks, and a symlink to /dev/zero reads without end.
    if not stat.S_ISREG(mode):
        raise NativeqError(f"{path} is not a regular file (a symlink, directory, FIFO or device)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except NativeqError as e:
        raise NativeqError(f"{path} {e}") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8, a number of 4300+ digits
        raise NativeqError(f"{path} is not valid JSON: {str(e) or type(e).__name__}") from None
    if not isinstance(manifest, dict):
        raise NativeqError(f"{path} is not a nativeq manifest (a JSON {_type_name(manifest)}, not an object)")
    schema = manifest.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise NativeqError(f"{path}: manifest schema {schema!r} is not supported (this nativeq reads schema {SCHEMA_VERSION})")
    seal = manifest.get(SEAL_FIELD)
    if not isinstance(seal, str):
        raise NativeqError(f"{path} has no {SEAL_FIELD} (written by an older nativeq or by hand): recompile it")
    if seal != manifest_digest(manifest):
        raise NativeqError(f"{path} was modified ({SEAL_FIELD} mismatch)")
    _check_fields(artifact_dir, manifest)
    return manifest


def check_files(artifact_dir: str | Path, manifest: dict, *, skip: tuple[str, ...] = ()) -> None:
    """The directory holds exactly the files `manifest` lists (plus manifest.json), each with its sha256.

    `skip`: listed names whose content the caller checks itself (`load` hashes the library bytes it loads).
    """
    artifact_dir = Path(artifact_dir)
    files = manifest["files"]
    with os.scandir(artifact_dir) as entries:
        present = {e.name: e for e in entries}
    for name, entry in sorted(present.items()):
        if name == MANIFEST_NAME:
            continue
        if name not in files:
            raise NativeqError(f"artifact {artifact_dir} contains {_shown(name)}, which its manifest does not list")
        if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            raise NativeqError(f"artifact file {artifact_dir / name} is not a regular file")
    for name, digest in files.items():
        path = artifact_dir / name
        if name not in present:
            raise NativeqError(f"artifact file {path} is missing")
        if name not in skip and sha256_file(path) != digest:
            raise NativeqError(f"artifact file {path} was modified (sha256 mismatch)")


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")  # nodes a kernel computes "on the side"


def kernel_onnx_nodes(record: dict, compute_only: bool = False) -> tuple[str, ...]:
    """The names of the ONNX nodes a kernel record of the manifest says its calls compute (none if it does not say);
    compute_only: leave out the quantize/dequantize nodes."""
    nodes = record.get("onnx_nodes")
    if not isinstance(nodes, list):
        return ()
    return tuple(n["name"] for n in nodes if isinstance(n, dict) and isinstance(n.get("name"), str)
                 and not (compute_only and n.get("op") in QDQ_OPS))


def kernel_onnx_op(record: dict) -> str | None:
    """The op of the first ONNX node a kernel record names (its main computation: compute nodes come first)."""
    nodes = record.get("onnx_nodes")
    first = nodes[0] if isinstance(nodes, list) and nodes else None
    return first.get("op") if isinstance(first, dict) and isinstance(first.get("op"), str) else None


def by_onnx_op(costs) -> dict[str, float]:
    """(op or None, cost) pairs summed per op ("-" for kernels that name none), largest first."""
    totals: dict[str, float] = {}
    for op, cost in costs:
        totals[op or "-"] = totals.get(op or "-", 0) + cost
    return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))


def by_onnx_op_line(totals: dict[str, float], unit: str, shown: int = 6) -> str | None:
    """One summary line of `by_onnx_op` totals as shares, or None when no kernel names an op."""
    whole = sum(totals.values())
    if not whole or set(totals) == {"-"}:
        return None
    parts = [f"{op} {100 * cost / whole:.1f}%" for op, cost in list(totals.items())[:shown]]
    more = f", ... {len(totals) - shown} more" if len(totals) > shown else ""
    return f"{unit} by ONNX op (each kernel under its first node's op): {', '.join(parts)}{more}"


def input_specs(manifest: dict) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d) for d in manifest["inputs"])


def output_specs(manifest: dict) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d) for d in manifest["outputs"])
