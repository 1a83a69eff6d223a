"""Seeded mutations of run-time inputs, compiled artifacts and audio files, and what nativeq makes of each.

Three generators in the style of `fuzz_models.py`, one per `KIND`:

- "runtime": feeds for `nativeq.load(path).run(feeds)` on small compiled artifacts (`RUNTIME_BASES`):
  wrong, missing or extra names; other containers; every numpy dtype; other ranks and sizes;
  strided, reversed, Fortran-order, unaligned, broadcast and read-only views; NaN, inf and extreme
  values; lists, scalars, None, strings and other non-arrays.
- "manifest": tampered copies of a compiled artifact (`MANIFEST_BASES`): JSON fields deleted,
  retyped or edited (re-sealed or not), the JSON text broken, reformatted, duplicated or huge,
  the `library` field pointed elsewhere, bytes of any file flipped, cut or extended, files
  removed, added, renamed, replaced by symlinks, directories or FIFOs.
- "audio": mutated WAV and FLAC files (`AUDIO_BASES`) through `nativeq.models.audio.read_audio`
  (what `nativeq transcribe` reads): header fields, chunk sizes, truncation, byte flips, extra
  and reordered chunks, garbage, FLAC streams cut, flipped and extended.

`make_case(kind, index, seed)` builds case `index` of a campaign: a category (round-robin over
`CATEGORIES[kind]`), a base (round-robin over `BASES[kind]`) and one mutation drawn from
`random.Random(f"{kind}-{seed}-{index}")`, so a case is the same on every run (a tampering draws from its
own stream when it is applied to the copied artifact, so that it picks among the fields and files there).
`run_case(case, bases, workdir)` runs it in this process and sorts the result into one outcome (`OUTCOMES`):

- "error": a one-line NativeqError (an audio one names the file);
- "warning" (audio only): one one-line `AudioTruncatedWarning` naming the file, and exactly the
  samples the file holds;
- "verified": runs and gives the reference: for run-time inputs, the artifact's own output on the
  canonical contiguous equivalent of the feeds (bit for bit) and ONNX Runtime's on the source model
  (within `verify`'s tolerance: 1 quantization step, rtol 1e-3); for a tampered artifact, exactly
  the untampered artifact's outputs; for audio, exactly the samples the file holds (decoded by
  `reference_wav`, an independent RIFF reader, or the original FLAC's samples);
- "crash": any other exception (or, in a campaign, the process dying or hanging);
- "traceback": an error or warning message of more than one line, or an audio one not naming the file;
- "wrong": a run that differs from its reference, runs where ONNX Runtime refuses the input or where
  the documented contract refuses it (NaN, a broadcast of terabytes), refuses an input the contract
  accepts (a strided view, a memoryview), a tampered artifact that runs with other code or outputs
  (or returns outputs its manifest does not declare), audio read silently but differing from what
  the file holds (or cut short without a warning).

A campaign runs in child processes (a crash in native code kills the child, not the campaign):

    .venv/bin/python tests/fuzz_inputs.py --kind runtime --cases 360 --seed 0 --out runtime.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import qdq_models  # noqa: E402
from fuzz_runner import run_in_children  # noqa: E402

KINDS = ("runtime", "manifest", "audio")
OUTCOMES = ("error", "warning", "verified", "crash", "traceback", "wrong")
CATEGORIES = {
    "runtime": ("names", "container", "dtype", "rank", "size", "layout", "values", "non_array"),
    "manifest": ("delete", "retype", "edit", "unsealed", "json", "library", "bytes", "files"),
    "audio": ("header", "sizes", "truncate", "byteflip", "chunks", "garbage", "flac"),
}
RUNTIME_BASES = ("matmul", "two_io", "uint8_in", "traced")
MANIFEST_BASES = ("matmul", "two_io")
AUDIO_BASES = ("wav16_mono", "wav16_stereo", "wav24_mono", "float32_22k")
BASES = {"runtime": RUNTIME_BASES, "manifest": MANIFEST_BASES, "audio": AUDIO_BASES}

# Every loaded model gets this call limit, so the memory check does not depend on the machine's free memory.
MAX_MEMORY = "1GB"
TRACED_LENGTH = 50  # the length the `traced` base's Reshape was "traced" at: ONNX Runtime refuses any other
ORT_TOL_STEPS, ORT_RTOL = 1.0, 1e-3  # what `nativeq verify` allows by default


@dataclass
class FuzzCase:
    kind: str
    index: int
    category: str
    base: str
    mutation: str
    payload: dict = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return f"{self.index:03d}-{self.category}-{self.base}"


@dataclass
class Outcome:
    outcome: str  # one of OUTCOMES
    detail: str
    reference_accepts: bool | None = None  # for errors: whether the reference (ORT, the RIFF reader) takes it


def case_category(kind: str, index: int) -> str:
    return CATEGORIES[kind][index % len(CATEGORIES[kind])]


def case_base(kind: str, index: int) -> str:
    if kind == "audio" and case_category(kind, index) == "flac":
        return "flac16_mono"
    bases = BASES[kind]
    return bases[(index // len(CATEGORIES[kind])) % len(bases)]


def make_case(kind: str, index: int, seed: int = 0) -> FuzzCase:
    """Case `index` of the `kind` campaign of `seed`: the same category, base and mutation on every run."""
    category, base = case_category(kind, index), case_base(kind, index)
    rng = random.Random(f"{kind}-{seed}-{index}")
    maker = {"runtime": _make_runtime, "manifest": _make_manifest, "audio": _make_audio}[kind]
    mutation, payload = maker(category, base, rng)
    return FuzzCase(kind, index, category, base, mutation, payload)


def _message_outcome(message: str) -> str:
    message = message.strip()
    return "error" if message and "\n" not in message else "traceback"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# =============================================================================================
# Base models and artifacts


def _uint8_in_model():
    """x uint8[T, 16] -> DequantizeLinear -> MatMul(DQ(W)) -> QuantizeLinear -> y uint8[T, 8] (integer in and out)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    nodes, inits = [], []
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
              numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
              numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"),
              numpy_helper.from_array(np.array(128, np.uint8), "y_zp")]
    nodes.append(helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"))
    w = qdq_models._weight_dq(nodes, inits, "fc", rng.normal(0, 0.2, (16, 8)).astype(np.float32), axis=1)
    nodes.append(helper.make_node("MatMul", ["x_dq", w], ["mm"], name="mm"))
    nodes.append(helper.make_node("QuantizeLinear", ["mm", "y_scale", "y_zp"], ["y"], name="y_Q"))
    return qdq_models._finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.UINT8, ["T", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["T", 8])], "uint8_in")


def _traced_model():
    """x[1, T, 8] -> Reshape to a constant [50, 8] (the length traced at export) -> Relu -> Reshape [1, -1, 8]."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Reshape", ["x", "traced"], ["flat"], name="traced_reshape"),
             helper.make_node("Relu", ["flat"], ["relu"], name="relu"),
             helper.make_node("Reshape", ["relu", "back"], ["y"], name="back_reshape")]
    inits = [helper.make_tensor("traced", TensorProto.INT64, [2], [TRACED_LENGTH, 8]),
             helper.make_tensor("back", TensorProto.INT64, [3], [1, -1, 8])]
    return qdq_models._finish(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 8])], "traced", opset=17)


def base_model(name: str):
    """The ONNX source of a compiled base (each compiles in a few seconds)."""
    if name == "matmul":  # the conftest `matmul_artifact`: x float32[1, T, 64] -> y float32[1, T, 48], int8 QDQ
        return qdq_models.qdq_matmul()
    if name == "two_io":
        return qdq_models.two_io(k=16, n=8)
    if name == "uint8_in":
        return _uint8_in_model()
    if name == "traced":
        return _traced_model()
    raise ValueError(name)


# (name, dtype, shape) of each base's inputs, "T" the symbolic length they share
BASE_INPUTS = {
    "matmul": (("x", "float32", (1, "T", 64)),),
    "two_io": (("x", "float32", (1, "T", 16)), ("z", "float32", (1, "T", 8))),
    "uint8_in": (("x", "uint8", ("T", 16)),),
    "traced": (("x", "float32", (1, "T", 8)),),
}


class Bases:
    """The compiled bases of a campaign under `root` (compiled on first use), loaded once per process.

    `prebuilt` maps a base name to an (onnx_path, artifact_dir) compiled elsewhere (the conftest fixture).
    """

    def __init__(self, root: Path, prebuilt: dict | None = None):
        self.root = Path(root)
        self.prebuilt = dict(prebuilt or {})
        self._models: dict = {}
        self._sessions: dict = {}
        self._outputs: dict = {}

    def paths(self, name: str) -> tuple[Path, Path]:
        if name in self.prebuilt:
            return tuple(Path(p) for p in self.prebuilt[name])
        import onnx

        onnx_path, artifact = self.root / name / "model.onnx", self.root / name / "artifact"
        if not (artifact / "manifest.json").exists():
            from nativeq.compile import CompileConfig, compile_model

            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(base_model(name), onnx_path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the traced base's Reshape warning
                compile_model(onnx_path, artifact, CompileConfig(target="host", use_tuning=False), force=True)
        return onnx_path, artifact

    def model(self, name: str):
        import nativeq

        if name not in self._models:
            self._models[name] = nativeq.load(self.paths(name)[1], max_memory=MAX_MEMORY)
        return self._models[name]

    def session(self, name: str):
        import onnxruntime as ort

        if name not in self._sessions:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.log_severity_level = 4
            self._sessions[name] = ort.InferenceSession(str(self.paths(name)[0]), options,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[name]

    @staticmethod
    def reference_length(name: str) -> int:
        return TRACED_LENGTH if name == "traced" else 7

    def reference_feeds(self, name: str) -> dict[str, np.ndarray]:
        """The fixed valid feeds a tampered artifact of base `name` is run on."""
        return valid_feeds(name, np.random.default_rng(1234), self.reference_length(name))

    def reference_outputs(self, name: str) -> list[np.ndarray]:
        """The untampered artifact's outputs on `reference_feeds`, in output order."""
        if name not in self._outputs:
            self._outputs[name] = list(self.model(name).run(self.reference_feeds(name)).values())
        return self._outputs[name]


def valid_feeds(base: str, gen: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    feeds = {}
    for name, dtype, shape in BASE_INPUTS[base]:
        dims = [length if d == "T" else d for d in shape]
        if dtype == "uint8":
            feeds[name] = gen.integers(0, 256, dims).astype(np.uint8)
        else:
            feeds[name] = gen.uniform(-6, 6, dims).astype(np.float32)
    return feeds


# =============================================================================================
# Run-time inputs
#
# A case's payload: "feeds" (what `run` is given), "call" ("run" or "kwargs": `model(**feeds)`) and
# "expect": "run" (the contract accepts it: a refusal is wrong), "refuse" (the contract refuses it:
# running is wrong) or None (either, judged against ONNX Runtime).


def _length(rng: random.Random, base: str) -> int:
    return TRACED_LENGTH if base == "traced" else rng.choice((1, 2, 3, 7, 16, 33, 100))


def _pick_input(rng: random.Random, base: str) -> tuple[str, str, tuple]:
    return rng.choice(BASE_INPUTS[base])


def _gen(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.randrange(2**32))


class _KeyLike(str):
    """A str subclass (equal to and hashing like the plain name)."""


class _ReadOnlyMapping(Mapping):
    """A Mapping that is not a dict."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


class _ArrayLike:
    """An object numpy converts through `__array__`."""

    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class _InterfaceOnly:
    """An object numpy converts through `__array_interface__` (no `__array__`)."""

    def __init__(self, array):
        self._array = array
        self.__array_interface__ = array.__array_interface__


def mutate_names(rng, base, feeds):
    name = _pick_input(rng, base)[0]
    kind = rng.choice(("missing", "extra", "renamed", "non_str_key", "str_like_key", "empty", "case"))
    if kind == "missing":
        del feeds[name]
        return f"input {name!r} missing", feeds, "refuse"
    if kind == "extra":
        extra = rng.choice(("y", "feats", "x ", "", "x\0", "ẋ", "__class__", name + "_2"))
        feeds[extra] = feeds[name].copy()
        return f"extra key {extra!r}", feeds, "refuse"
    if kind == "renamed":
        new = rng.choice((name.upper(), f" {name}", f"{name}:0", "input", "X_" + name))
        feeds[new] = feeds.pop(name)
        return f"input {name!r} given as {new!r}", feeds, "refuse"
    if kind == "non_str_key":
        key = rng.choice((0, None, b"x", ("x",), 1.5, True, frozenset({"x"})))
        feeds[key] = feeds[name]
        return f"extra non-str key {key!r}", feeds, "refuse"
    if kind == "str_like_key":
        key = rng.choice((np.str_(name), _KeyLike(name)))
        feeds[key] = feeds.pop(name)
        return f"key {name!r} as {type(key).__name__}", feeds, "run"
    if kind == "empty":
        return "empty dict", {}, "refuse"
    feeds[name.upper() if name.islower() else name.lower()] = feeds.pop(name)
    return f"input {name!r} in other case", feeds, "refuse"


def mutate_container(rng, base, feeds):
    kind = rng.choice(("ndarray", "list", "tuple_pairs", "none", "string", "number", "ordered_dict",
                       "mapping_proxy", "mapping", "kwargs", "generator", "set_of_names", "nested_dict"))
    first = next(iter(feeds.values()))
    if kind == "ndarray":
        return "a bare ndarray instead of a dict", first, "refuse"
    if kind == "list":
        return "a list of the arrays", list(feeds.values()), "refuse"
    if kind == "tuple_pairs":
        return "a tuple of (name, array) pairs", tuple(feeds.items()), "refuse"
    if kind == "none":
        return "None", None, "refuse"
    if kind == "string":
        return "a string", "x", "refuse"
    if kind == "number":
        return "a number", 1.0, "refuse"
    if kind == "ordered_dict":
        return "an OrderedDict", collections.OrderedDict(reversed(list(feeds.items()))), "run"
    if kind == "mapping_proxy":
        return "a MappingProxyType", types.MappingProxyType(feeds), "run"
    if kind == "mapping":
        return "a Mapping that is not a dict", _ReadOnlyMapping(feeds), "run"
    if kind == "kwargs":
        return "model(**feeds)", feeds, "run"
    if kind == "generator":
        return "a generator of (name, array) pairs", (pair for pair in feeds.items()), "refuse"
    if kind == "set_of_names":
        return "a set of the names", set(feeds), "refuse"
    return "a dict nested in a dict", {"inputs": feeds}, "refuse"


_DTYPES = ("float16", "float32", "float64", "longdouble", "int8", "uint8", "int16", "uint16", "int32", "uint32",
           "int64", "uint64", "bool", "complex64", "complex128", "object", "U8", "S8", "datetime64[ns]",
           "timedelta64[s]", ">f4", "<f4", ">u2", ">u1", "V4", "record", "bfloat16", "float8_e4m3fn", "int4")


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "record":
        out = np.zeros(array.shape, [("a", "f4")])
        out["a"] = array
        return out
    if dtype in ("bfloat16", "float8_e4m3fn", "int4"):
        import ml_dtypes

        return array.astype(getattr(ml_dtypes, dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return array.astype(dtype)
    except (TypeError, ValueError):
        return np.zeros(array.shape, dtype)


def mutate_dtype(rng, base, feeds):
    name, dtype, _ = _pick_input(rng, base)
    new = rng.choice(_DTYPES)
    feeds[name] = _as_dtype(feeds[name], new)
    same = feeds[name].dtype == np.dtype(dtype)
    return f"input {name!r} as {feeds[name].dtype.str if new[0] in '<>' else new}", feeds, "run" if same else "refuse"


def mutate_rank(rng, base, feeds):
    name = _pick_input(rng, base)[0]
    array = feeds[name]
    kind = rng.choice(("leading", "trailing", "drop", "zero_d", "flat", "many"))
    if kind == "leading":
        feeds[name] = array[None]
    elif kind == "trailing":
        feeds[name] = array[..., None]
    elif kind == "drop":
        feeds[name] = np.take(array, 0, axis=rng.randrange(array.ndim))
    elif kind == "zero_d":
        feeds[name] = np.asarray(array.reshape(-1)[0])
    elif kind == "flat":
        feeds[name] = array.reshape(-1)
    else:
        feeds[name] = array.reshape((1,) * rng.randrange(4, 30) + array.shape)
    return f"input {name!r} shape {array.shape} -> {feeds[name].shape}", feeds, "refuse"


def mutate_size(rng, base, feeds):
    name, _, shape = _pick_input(rng, base)
    gen = _gen(rng)
    length_axis = shape.index("T")
    kind = rng.choice(("zero_length", "one", "random_length", "long", "huge_broadcast", "static_dim",
                       "static_zero", "disagree"))
    if kind in ("one", "random_length", "long"):
        length = {"one": 1, "random_length": rng.randrange(2, 400),
                  "long": rng.choice((1000, 4096, 20000, 65536))}[kind]
        out = valid_feeds(base, gen, length)
        # NOTE: `traced` fixes T at TRACED_LENGTH: any other length is refused (as ONNX Runtime does).
        expect = "run" if base != "traced" or length == TRACED_LENGTH else "refuse"
        return f"T = {length}", out, expect
    if kind == "zero_length":
        out = {n: np.zeros([0 if d == "T" else d for d in s], dt) for n, dt, s in BASE_INPUTS[base]}
        return "T = 0", out, "refuse"
    if kind == "huge_broadcast":
        length = rng.choice((10**8, 3 * 10**9, 10**12))
        row = feeds[name].take([0], axis=length_axis)
        target = list(feeds[name].shape)
        target[length_axis] = length
        feeds[name] = np.broadcast_to(row, target)  # no memory: every row is the same one
        return f"input {name!r} a zero-stride broadcast to T = {length}", feeds, "refuse"
    if kind in ("static_dim", "static_zero"):
        axes = [i for i, d in enumerate(shape) if isinstance(d, int)]
        axis = rng.choice(axes)
        size = 0 if kind == "static_zero" else rng.choice((shape[axis] - 1, shape[axis] + 1, 2 * shape[axis], 1, 3))
        size = size if size != shape[axis] else size + 1
        dims = list(feeds[name].shape)
        dims[axis] = size
        feeds[name] = gen.uniform(-6, 6, dims).astype(feeds[name].dtype)
        return f"input {name!r} static dim {axis} = {size} (declared {shape[axis]})", feeds, "refuse"
    if len(feeds) > 1:
        other = valid_feeds(base, gen, feeds[name].shape[length_axis] + rng.choice((1, 2, 5)))
        feeds[name] = other[name]
        return f"input {name!r} with another T than the others", feeds, "refuse"
    return mutate_size(rng, base, feeds)


def _unaligned_copy(array: np.ndarray, offset: int) -> np.ndarray:
    buffer = np.zeros(array.nbytes + 128, np.uint8)
    start = -buffer.ctypes.data % 64 + offset
    view = np.frombuffer(buffer.data, dtype=array.dtype, count=array.size, offset=start).reshape(array.shape)
    view[...] = array
    return view


def mutate_layout(rng, base, feeds):
    name = _pick_input(rng, base)[0]
    array = feeds[name]
    kind = rng.choice(("fortran", "reversed", "every_other", "transposed", "unaligned", "broadcast", "read_only",
                       "size1_strides", "masked", "offset_slice"))
    if kind == "fortran":
        view = np.asfortranarray(array)
    elif kind == "reversed":
        axis = rng.randrange(array.ndim)
        view = np.flip(np.flip(array, axis).copy(), axis)
    elif kind == "every_other":
        axis = rng.randrange(array.ndim)
        wide = np.repeat(array, 2, axis=axis)
        view = wide[tuple(slice(None, None, 2) if a == axis else slice(None) for a in range(array.ndim))]
    elif kind == "transposed":
        order = list(range(array.ndim))
        rng.shuffle(order)
        view = np.ascontiguousarray(array.transpose(order)).transpose(np.argsort(order))
    elif kind == "unaligned":
        view = _unaligned_copy(array, rng.choice((1, 2, 3, 4, 8, 17, 32, 63)))
    elif kind == "broadcast":
        axis = rng.randrange(array.ndim)
        view = np.broadcast_to(array.take([0], axis=axis), array.shape)
        array = np.ascontiguousarray(view)
    elif kind == "read_only":
        view = array.copy()
        view.setflags(write=False)
    elif kind == "size1_strides":  # strides of size-1 dims are arbitrary, even not a multiple of the item size
        strides = [rng.choice((0, 3, 12345, -7)) if n == 1 else s for n, s in zip(array.shape, array.strides)]
        view = np.lib.stride_tricks.as_strided(array, array.shape, strides)
    elif kind == "masked":
        view = np.ma.masked_array(array, mask=np.zeros(array.shape, bool))
    else:
        axis = rng.randrange(array.ndim)
        padded = np.concatenate([array.take([0], axis=axis), array], axis=axis)
        view = padded[tuple(slice(1, None) if a == axis else slice(None) for a in range(array.ndim))]
    assert np.array_equal(np.asarray(view), array)
    feeds[name] = view
    return f"input {name!r} as a view: {kind} (strides {np.asarray(view).strides})", feeds, "run"


def mutate_values(rng, base, feeds):
    name, dtype, _ = _pick_input(rng, base)
    array = feeds[name].copy()
    flat = array.reshape(-1)
    gen = _gen(rng)
    count = rng.choice((1, 1, 2, 5, flat.size))
    spots = gen.choice(flat.size, size=min(count, flat.size), replace=False)
    if dtype == "uint8":
        value = rng.choice((0, 255, 128, 1, 254))
        flat[spots] = value
        feeds[name] = array
        return f"input {name!r}: {len(spots)} values = {value}", feeds, "run"
    value = rng.choice(("nan", "inf", "-inf", "max", "-max", "tiny", "denormal", "-0", "1e6", "-1e6", "6.35",
                        "nan_payload"))
    finite = value not in ("nan", "inf", "-inf", "nan_payload")
    if value == "nan_payload":
        flat.view(np.uint32)[spots] = 0x7FC0_1234
    else:
        flat[spots] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "max": np.finfo(np.float32).max,
                       "-max": -np.finfo(np.float32).max, "tiny": np.finfo(np.float32).tiny, "denormal": 1e-45,
                       "-0": -0.0, "1e6": 1e6, "-1e6": -1e6, "6.35": 6.35}[value]
    feeds[name] = array
    return f"input {name!r}: {len(spots)} values = {value}", feeds, "run" if finite else "refuse"


def mutate_non_array(rng, base, feeds):
    name, dtype, shape = _pick_input(rng, base)
    array = feeds[name]
    kind = rng.choice(("nested_list", "list_of_arrays", "ragged", "scalar", "numpy_scalar", "none", "string",
                       "bytes", "dict", "set", "memoryview", "array_like", "interface_only", "list_with_none",
                       "numeric_strings", "deep_list", "tuple_of_arrays"))
    if kind == "nested_list":
        value, expect = array.tolist(), "refuse"  # Python floats/ints become float64/int64: no silent cast
    elif kind == "list_of_arrays":
        value, expect = list(array), "run"  # numpy stacks same-dtype arrays: a float32 array
    elif kind == "tuple_of_arrays":
        value, expect = tuple(array), "run"
    elif kind == "ragged":
        rows = array.reshape(-1, array.shape[-1]).tolist()
        rows[-1] = rows[-1][:-1]
        value, expect = rows, "refuse"
    elif kind == "scalar":
        value, expect = rng.choice((1.5, 0, -3)), "refuse"
    elif kind == "numpy_scalar":
        value, expect = array.reshape(-1)[0], "refuse"
    elif kind == "none":
        value, expect = None, "refuse"
    elif kind == "string":
        value, expect = rng.choice(("x", "1.0", "")), "refuse"
    elif kind == "bytes":
        value, expect = array.tobytes(), "refuse"
    elif kind == "dict":
        value, expect = {"data": array}, "refuse"
    elif kind == "set":
        value, expect = {1.0, 2.0}, "refuse"
    elif kind == "memoryview":
        value, expect = memoryview(array), "run"
    elif kind == "array_like":
        value, expect = _ArrayLike(array), "run"
    elif kind == "interface_only":
        value, expect = _InterfaceOnly(array), "run"
    elif kind == "list_with_none":
        value = array.tolist()
        leaf = value
        while isinstance(leaf[0], list):
            leaf = leaf[0]
        leaf[0] = None
        expect = "refuse"
    elif kind == "numeric_strings":
        value, expect = np.vectorize(str)(array).tolist(), "refuse"
    else:
        value = 1.0
        for _ in range(rng.choice((40, 70, 200))):
            value = [value]
        expect = "refuse"
    feeds[name] = value
    return f"input {name!r} as {kind} ({type(value).__name__})", feeds, expect


_RUNTIME_MUTATIONS = {
    "names": mutate_names, "container": mutate_container, "dtype": mutate_dtype, "rank": mutate_rank,
    "size": mutate_size, "layout": mutate_layout, "values": mutate_values, "non_array": mutate_non_array,
}


def _make_runtime(category, base, rng):
    feeds = valid_feeds(base, _gen(rng), _length(rng, base))
    mutation, feeds, expect = _RUNTIME_MUTATIONS[category](rng, base, feeds)
    call = "kwargs" if mutation == "model(**feeds)" else "run"
    return mutation, {"feeds": feeds, "expect": expect, "call": call}


def canonical_feeds(feeds) -> dict[str, np.ndarray] | None:
    """The plain C-contiguous arrays `feeds` stands for (None when it is not a mapping of array-likes)."""
    if not isinstance(feeds, Mapping):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in feeds.items() if isinstance(k, str)}
    except (ValueError, TypeError, MemoryError):
        return None


_ORT_CHECK_BYTES = 256 << 20  # larger feeds are not given to ONNX Runtime for the refusal column


def _ort_runs(session, feeds) -> bool | None:
    """Whether ONNX Runtime runs the canonical equivalent of `feeds` (None: not an array dict, or too large)."""
    if not isinstance(feeds, Mapping):
        return False
    if any(getattr(v, "nbytes", 0) > _ORT_CHECK_BYTES for v in feeds.values()):
        return None
    canonical = canonical_feeds(feeds)
    if canonical is None or len(canonical) != len(feeds):
        return False
    try:
        session.run(None, canonical)
        return True
    except Exception:  # noqa: BLE001
        return False


def compare_with_ort(model, outputs: dict, session, feeds: dict) -> str | None:
    """The first output beyond `verify`'s tolerance against ONNX Runtime on `feeds` (None: all agree)."""
    from nativeq.verify.report import OutputComparison, accumulate

    expected = session.run(None, feeds)
    for spec, ref in zip(model.outputs, expected):
        comparison = OutputComparison(name=spec.name, dtype=spec.dtype)
        accumulate(comparison, np.asarray(outputs[spec.name]), np.asarray(ref), spec.quant, ORT_TOL_STEPS, ORT_RTOL)
        if not comparison.passed:
            return (f"{spec.name} max|diff| {comparison.max_abs:.4g} ({comparison.max_steps} steps) "
                    f"{comparison.problem or ''}").strip()
    return None


def run_runtime_case(case: FuzzCase, bases: Bases) -> Outcome:
    from nativeq.errors import NativeqError

    model, session = bases.model(case.base), bases.session(case.base)
    feeds, expect = case.payload["feeds"], case.payload["expect"]
    try:
        got = model(**feeds) if case.payload["call"] == "kwargs" else model.run(feeds)
    except NativeqError as e:
        kind = _message_outcome(str(e))
        if kind == "error" and expect == "run":
            return Outcome("wrong", f"refused an input the contract accepts: {e}")
        return Outcome(kind, str(e), reference_accepts=_ort_runs(session, feeds))
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", _first_line(e))
    if expect == "refuse":
        return Outcome("wrong", "ran an input the contract refuses")
    canonical = canonical_feeds(feeds)
    if canonical is None or set(canonical) != {s.name for s in model.inputs}:
        return Outcome("wrong", "ran, but the feeds are not a dict of the model's inputs")
    try:
        again = model.run(canonical)
    except Exception as e:  # noqa: BLE001
        return Outcome("wrong", f"ran, but its contiguous equivalent does not: {_first_line(e)}")
    for spec in model.outputs:
        if got[spec.name].dtype != again[spec.name].dtype or not np.array_equal(got[spec.name], again[spec.name]):
            return Outcome("wrong", f"output {spec.name} differs from the run on the contiguous equivalent")
    try:
        problem = compare_with_ort(model, got, session, canonical)
    except Exception as e:  # noqa: BLE001
        return Outcome("wrong", f"ran where ONNX Runtime refuses: {_first_line(e)}")
    if problem:
        return Outcome("wrong", f"differs from ONNX Runtime: {problem}")
    return Outcome("verified", "equals its contiguous equivalent and agrees with ONNX Runtime")


# =============================================================================================
# Manifest and artifact tampering
#
# A case's payload: "key" (the random stream `tamper` draws from, given the copied artifact, so
# mutations can pick among the fields and files that are actually there).

_PAYLOAD_FILE = "vocab.json"  # a second listed file, added to the copy by some mutations


def _make_manifest(category, base, rng):
    return f"{category} (drawn at run time)", {"key": f"{category}-{rng.random()!r}"}


def _read(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write(art: Path, manifest: dict, seal: bool) -> None:
    from nativeq.runtime.manifest import seal_manifest

    if seal:
        seal_manifest(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _record(art: Path, name: str, manifest: dict | None = None) -> dict:
    """Record `name`'s current sha256 in the manifest's `files` (returns the manifest, not yet written)."""
    from nativeq._fs import sha256_file

    manifest = _read(art) if manifest is None else manifest
    manifest["files"][name] = sha256_file(art / name)
    return manifest


def _add_listed_file(art: Path) -> None:
    (art / _PAYLOAD_FILE).write_text('["a", "b", "c"]')
    _write(art, _record(art, _PAYLOAD_FILE), seal=True)


def _random_path(rng: random.Random, manifest: dict) -> list:
    """A random field: a top-level key, then deeper with probability 0.6 a level."""
    path, node = [], manifest
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys or (path and rng.random() < 0.4):
            return path
        key = rng.choice(keys)
        path.append(key)
        node = node[key]


def _get(manifest, path):
    for key in path:
        manifest = manifest[key]
    return manifest


def _set(manifest, path, value) -> None:
    _get(manifest, path[:-1])[path[-1]] = value


def _path_text(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(path)) or "(root)"


_TYPE_VALUES = ("str", "", 0, 1, -1, 2**64, -(2**63), 1.5, math.nan, math.inf, -math.inf, True, False, None, [],
                ["x"], [1, 2], {}, {"a": 1}, "model.so", "T", "0" * 64)


def tamper_delete(rng, art):
    manifest = _read(art)
    path = _random_path(rng, manifest)
    parent = _get(manifest, path[:-1])
    del parent[path[-1]]
    seal = rng.random() < 0.8 and path != ["manifest_sha256"]  # resealing would put the seal back
    _write(art, manifest, seal)
    return f"delete {_path_text(path)}" + ("" if seal else ", not resealed")


def tamper_retype(rng, art):
    manifest = _read(art)
    path = _random_path(rng, manifest)
    value = rng.choice(_TYPE_VALUES)
    _set(manifest, path, value)
    seal = rng.random() < 0.85
    _write(art, manifest, seal)
    return f"{_path_text(path)} = {value!r}" + ("" if seal else ", not resealed")


_DTYPE_NAMES = ("bool", "int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64",
                "bfloat16", "int4", "uint4", "float8_e4m3fn")


def _semantic_edit(rng, manifest) -> str:
    """One resealable edit of what a field means (a dtype, a dim, a name, an order, a version, a formula)."""
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    kind = rng.choice(("dtype", "static_dim", "symbolic_dim", "rename", "swap_names", "reorder", "duplicate",
                       "drop_io", "entry", "arch", "cpu_features", "versions", "source", "quant", "memory_coef",
                       "memory_power", "shape_check", "shape_check_bad", "target_name", "sizes", "kernels"))
    specs = rng.choice((inputs, outputs))
    which = "inputs" if specs is inputs else "outputs"
    i = rng.randrange(len(specs))
    spec = specs[i]
    if kind == "dtype":
        spec["dtype"] = rng.choice([d for d in _DTYPE_NAMES if d != spec["dtype"]])
        return f"{which}[{i}].dtype = {spec['dtype']}"
    if kind == "static_dim":
        axes = [a for a, d in enumerate(spec["shape"]) if isinstance(d, int)]
        axis = rng.choice(axes)
        spec["shape"][axis] = rng.choice((0, 1, spec["shape"][axis] - 1, spec["shape"][axis] + 1, "K"))
        return f"{which}[{i}].shape[{axis}] = {spec['shape'][axis]!r}"
    if kind == "symbolic_dim":
        axis = spec["shape"].index("T")
        spec["shape"][axis] = rng.choice((1, 7, 50, "S", "T_out"))
        return f"{which}[{i}].shape[{axis}] = {spec['shape'][axis]!r}"
    if kind == "rename":
        spec["name"] = rng.choice(("renamed", spec["name"].upper(), spec["name"] + "\n", "ẋ", "x y"))
        return f"{which}[{i}].name = {spec['name']!r}"
    if kind == "swap_names" and len(specs) > 1:
        specs[0]["name"], specs[1]["name"] = specs[1]["name"], specs[0]["name"]
        return f"{which} names swapped"
    if kind == "reorder" and len(specs) > 1:
        specs.reverse()
        return f"{which} order reversed"
    if kind == "duplicate":
        copy = json.loads(json.dumps(spec))
        copy["name"] = spec["name"] + "_copy"
        specs.append(copy)
        return f"{which}[{i}] duplicated as {copy['name']!r}"
    if kind == "drop_io":
        del specs[i]
        return f"{which}[{i}] removed"
    if kind == "entry":
        manifest["entry"] = rng.choice(("main_", "Main", "vm_load_executable", "__init__", "main\0", "relax.main"))
        return f"entry = {manifest['entry']!r}"
    if kind == "arch":
        manifest["target"]["arch"] = rng.choice(("aarch64", "x86", "riscv64", "X86_64"))
        return f"target.arch = {manifest['target']['arch']!r}"
    if kind == "cpu_features":
        features = manifest["target"]["cpu_features"]
        change = rng.choice(("none", "unknown", "sse2"))
        manifest["target"]["cpu_features"] = [] if change == "none" else features + (
            ["no_such_feature"] if change == "unknown" else ["sse2"])
        return f"target.cpu_features {change}"
    if kind == "versions":
        key = rng.choice(("nativeq_version", "tvm_version", "tvm_ffi_version"))
        manifest[key] = rng.choice(("0.0.1", "99.0", "", "x", manifest[key] + ".1", manifest[key] + "-dev"))
        return f"{key} = {manifest[key]!r}"
    if kind == "source":
        manifest["source"]["sha256"] = "%064x" % rng.getrandbits(256)
        return "source.sha256 changed"
    if kind == "quant" and outputs[0].get("quant"):
        outputs[0]["quant"]["scale"] = rng.choice((0.2, 1e-30, -1.0, 0))
        return f"outputs[0].quant.scale = {outputs[0]['quant']['scale']}"
    if kind in ("memory_coef", "memory_power") and manifest.get("memory"):
        term = rng.choice(manifest["memory"]["bytes"])
        if kind == "memory_coef":
            term["coef"] = rng.choice((0.0, 1e-300, 1e15, 1e300, 1.7e308))
            return f"memory term coef = {term['coef']!r}"
        term["dims"] = {"T": rng.choice((2, 5, 40, 400, 10**6))}
        return f"memory term dims = {term['dims']}"
    if kind == "shape_check":
        holds = rng.random() < 0.5
        manifest["shape_checks"] = (manifest.get("shape_checks") or []) + [
            {"node": "n", "op": rng.choice(("Reshape", "Add")), "lhs": "T * 2", "rhs": "T + T" if holds else "T + 1"}]
        return "shape_checks + a condition that " + ("holds" if holds else "fails")
    if kind == "shape_check_bad":
        lhs = rng.choice(("T ** 2", "__import__('os')", "S + 1", "1.5", "-" * 5000 + "T", "(" * 150 + "T" + ")" * 150,
                          "T // 0", "T" + " * T" * 3000, "", "min(T)"))
        manifest["shape_checks"] = [{"node": "n", "op": "Reshape", "lhs": lhs, "rhs": "T"}]
        return f"shape_checks lhs = {lhs[:40]!r}" + ("..." if len(lhs) > 40 else "")
    if kind == "target_name":
        manifest["target"]["name"] = rng.choice(("rpi4", "x", "host "))
        return f"target.name = {manifest['target']['name']!r}"
    if kind == "sizes":
        manifest["sizes"] = {"weight_bytes": rng.choice((0, 10**12)), "arena_dims": {"T": 1}}
        return f"sizes = {manifest['sizes']}"
    manifest["kernels"] = []
    return "kernels = []"


def tamper_edit(rng, art):
    manifest = _read(art)
    what = _semantic_edit(rng, manifest)
    _write(art, manifest, seal=True)
    return what


def tamper_unsealed(rng, art):
    manifest = _read(art)
    kind = rng.choice(("edit", "retype", "seal_value", "seal_case", "seal_type", "seal_short"))
    if kind == "edit":
        what = _semantic_edit(rng, manifest)
    elif kind == "retype":
        path = _random_path(rng, manifest)
        value = rng.choice(_TYPE_VALUES)
        _set(manifest, path, value)
        what = f"{_path_text(path)} = {value!r}"
    elif kind == "seal_value":
        manifest["manifest_sha256"] = "%064x" % rng.getrandbits(256)
        what = "manifest_sha256 another digest"
    elif kind == "seal_case":
        manifest["manifest_sha256"] = manifest["manifest_sha256"].upper()
        what = "manifest_sha256 in upper case"
    elif kind == "seal_type":
        manifest["manifest_sha256"] = rng.choice((None, 0, [manifest["manifest_sha256"]], True))
        what = f"manifest_sha256 = {manifest['manifest_sha256']!r}"
    else:
        manifest["manifest_sha256"] = manifest["manifest_sha256"][:-1]
        what = "manifest_sha256 one digit short"
    _write(art, manifest, seal=False)
    return what + ", not resealed"


def _nested_lists_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def tamper_json(rng, art):
    path = art / "manifest.json"
    text = path.read_text()
    manifest = json.loads(text)
    kind = rng.choice(("reformat", "escapes", "bom", "utf16", "truncate", "trailing", "duplicate_key",
                       "nan_literal", "huge_int", "deep_nesting", "huge_padding", "many_keys", "empty", "scalar",
                       "comment", "control_char", "single_quotes"))
    if kind == "reformat":
        items = list(manifest.items())
        rng.shuffle(items)
        path.write_text(json.dumps(dict(items), indent=rng.choice((None, 0, 2, 7)), ensure_ascii=rng.random() < 0.5,
                                   separators=rng.choice(((",", ":"), (", ", ": "), (" ,", " : ")))) + "\n" * 3)
        return "reformatted (key order, indent, separators, escapes)"
    if kind == "escapes":
        path.write_text(text.replace('"library": "model.so"', '"\\u006cibrary": "\\u006dodel.so"'))
        return "library written with \\u escapes"
    if kind == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        return "UTF-8 byte order mark"
    if kind == "utf16":
        path.write_bytes(text.encode("utf-16"))
        return "UTF-16 encoded"
    if kind == "truncate":
        cut = rng.randrange(len(text))
        path.write_text(text[:cut])
        return f"text cut at character {cut} of {len(text)}"
    if kind == "trailing":
        junk = rng.choice(("}", "x", "{}", "\0", " null"))
        path.write_text(text + junk)
        return f"trailing {junk!r}"
    if kind == "duplicate_key":
        key = rng.choice(("library", "entry", "schema", "files", "name"))
        pattern = f'"{key}": '
        at = text.find(pattern)
        path.write_text(text[:at] + f'"{key}": {json.dumps(rng.choice(("x.so", 1, None)))}, ' + text[at:])
        return f"key {key!r} repeated"
    if kind == "nan_literal":
        path.write_text(text.replace('"schema": 1', '"schema": NaN', 1))
        return "schema NaN literal"
    if kind == "huge_int":
        where = rng.choice(("schema", "compile_seconds"))
        path.write_text(text.replace(f'"{where}": ', f'"{where}": {"9" * 5000}, "_was": ', 1))
        return f"{where} a 5000-digit integer"
    if kind == "deep_nesting":
        depth = rng.choice((500, 5000, 100000))
        path.write_text(text.replace('"schema": 1', f'"pad": {_nested_lists_text(depth)}, "schema": 1', 1))
        return f"a list nested {depth} deep"
    if kind == "huge_padding":
        manifest["padding"] = "x" * rng.choice((10**6, 2 * 10**7))
        seal = rng.random() < 0.7
        _write(art, manifest, seal)
        return f"a {len(manifest['padding'])}-character field" + (", resealed" if seal else ", not resealed")
    if kind == "many_keys":
        manifest["many"] = {f"k{i}": i for i in range(200000)}
        _write(art, manifest, seal=True)
        return "a field of 200000 keys, resealed"
    if kind == "empty":
        path.write_text(rng.choice(("", " ", "\n")))
        return "empty"
    if kind == "scalar":
        value = rng.choice(("null", "[]", '"x"', "1e999", "true"))
        path.write_text(value)
        return f"the JSON {value}"
    if kind == "comment":
        path.write_text("// nativeq\n" + text)
        return "a // comment line"
    if kind == "control_char":
        path.write_text(text.replace('"main"', '"ma\x01in"', 1))
        return "a raw control character in a string"
    path.write_text(text.replace('"', "'"))
    return "single quotes"


def tamper_library(rng, art):
    manifest = _read(art)
    kind = rng.choice(("parent", "absolute", "subdir", "odd_name", "listed_other", "renamed_both", "renamed_library",
                       "renamed_files", "copy_listed", "manifest"))
    so = art / "model.so"
    if kind == "parent":
        shutil.copy(so, art.parent / "model.so")
        manifest["library"] = "../model.so"
        manifest["files"]["../model.so"] = manifest["files"]["model.so"]
        what = "library ../model.so (a copy there, listed)"
    elif kind == "absolute":
        shutil.copy(so, art.parent / "elsewhere.so")
        manifest["library"] = str(art.parent / "elsewhere.so")
        what = "library an absolute path to a copy"
    elif kind == "subdir":
        (art / "sub").mkdir()
        shutil.move(so, art / "sub" / "model.so")
        manifest["library"] = "sub/model.so"
        manifest["files"]["sub/model.so"] = manifest["files"].pop("model.so")
        what = "library sub/model.so (moved there, listed)"
    elif kind == "odd_name":
        manifest["library"] = rng.choice(("model.so/", ".", "..", "", " model.so", "MODEL.SO", "model.so\0", "./model.so",
                                          "model.so\n", "\\model.so"))
        what = f"library {manifest['library']!r}"
    elif kind == "listed_other":
        (art / _PAYLOAD_FILE).write_text('["a"]')
        _record(art, _PAYLOAD_FILE, manifest)
        manifest["library"] = _PAYLOAD_FILE
        what = f"library the listed {_PAYLOAD_FILE}"
    elif kind in ("renamed_both", "renamed_library", "renamed_files"):
        new = rng.choice(("lib.so", "model.dylib", "model", "m.so.1"))
        so.rename(art / new)
        if kind != "renamed_files":
            manifest["library"] = new
        if kind != "renamed_library":
            manifest["files"][new] = manifest["files"].pop("model.so")
        what = f"model.so renamed {new}, " + {"renamed_both": "library and files updated",
                                              "renamed_library": "only library updated",
                                              "renamed_files": "only files updated"}[kind]
    elif kind == "copy_listed":
        shutil.copy(so, art / "copy.so")
        _record(art, "copy.so", manifest)
        manifest["library"] = "copy.so"
        what = "library a listed copy of model.so"
    else:
        manifest["library"] = "manifest.json"
        what = "library manifest.json"
    _write(art, manifest, seal=True)
    return what + ", resealed"


def _flip(data: bytearray, rng, count: int) -> list[str]:
    spots = []
    for _ in range(count):
        pos, mask = rng.randrange(len(data)), rng.randrange(1, 256)
        data[pos] ^= mask
        spots.append(f"{pos}^{mask:#04x}")
    return spots


def tamper_bytes(rng, art):
    target = rng.choice(("model.so", "model.so", "manifest.json", _PAYLOAD_FILE))
    if target == _PAYLOAD_FILE:
        _add_listed_file(art)
    path = art / target
    data = bytearray(path.read_bytes())
    op = rng.choice(("flip", "truncate", "extend", "empty", "random"))
    if op == "flip":
        what = "flip " + ", ".join(_flip(data, rng, rng.choice((1, 2, 8))))
    elif op == "truncate":
        cut = rng.randrange(len(data))
        del data[cut:]
        what = f"cut at byte {cut}"
    elif op == "extend":
        extra = rng.choice((1, 7, 4096, 1 << 20))
        data += bytes(rng.randrange(256) for _ in range(min(extra, 4096))) * max(1, extra // 4096)
        what = f"{extra} bytes appended"
    elif op == "empty":
        data = bytearray()
        what = "emptied"
    else:
        data = bytearray(rng.randbytes(len(data)))
        what = "replaced by random bytes of the same size"
    path.write_bytes(bytes(data))
    # NOTE: a library with other bytes *and* its new sha256 recorded and resealed is other code by design (the
    # seal is not a signature): only cutting and appending, which a loader must detect or ignore, are re-recorded.
    recordable = target == _PAYLOAD_FILE or (target == "model.so" and op in ("truncate", "extend", "empty"))
    if recordable and rng.random() < 0.5:
        _write(art, _record(art, target), seal=True)
        what += ", its sha256 re-recorded and resealed"
    return f"{target}: {what}"


def tamper_files(rng, art):
    kind = rng.choice(("remove_library", "remove_manifest", "remove_listed", "add_file", "add_dir", "add_fifo",
                       "add_symlink", "library_symlink", "library_hardlink", "library_dir", "library_fifo",
                       "manifest_symlink_copy", "manifest_to_device", "manifest_fifo", "manifest_dir",
                       "manifest_dangling", "manifest_loop", "artifact_symlink", "artifact_file", "add_odd_name"))
    so, mf = art / "model.so", art / "manifest.json"
    outside = art.parent / "outside"
    outside.mkdir(exist_ok=True)
    if kind == "remove_library":
        so.unlink()
    elif kind == "remove_manifest":
        mf.unlink()
    elif kind == "remove_listed":
        _add_listed_file(art)
        (art / _PAYLOAD_FILE).unlink()
    elif kind == "add_file":
        name = rng.choice(("notes.txt", ".hidden", "model.so.bak", "MANIFEST.JSON", "manifest.json~", "ẋ.so"))
        (art / name).write_text("hi")
        return f"file {name!r} added"
    elif kind == "add_odd_name":
        name = rng.choice(("line\nbreak", "tab\there", "\x1b[31mred", "back\\slash", " "))
        (art / name).write_text("hi")
        return f"file {name!r} added"
    elif kind == "add_dir":
        (art / "sub").mkdir()
        if rng.random() < 0.5:
            (art / "sub" / "model.so").write_bytes(so.read_bytes())
    elif kind == "add_fifo":
        os.mkfifo(art / "pipe")
    elif kind == "add_symlink":
        target = rng.choice((so, Path("/nonexistent"), outside, Path("/etc/hostname")))
        (art / "link").symlink_to(target)
        return f"symlink 'link' -> {target} added"
    elif kind == "library_symlink":
        shutil.move(so, outside / "model.so")
        so.symlink_to(outside / "model.so")
    elif kind == "library_hardlink":
        shutil.copy(so, outside / "model.so")
        so.unlink()
        os.link(outside / "model.so", so)
    elif kind == "library_dir":
        so.unlink()
        so.mkdir()
    elif kind == "library_fifo":
        so.unlink()
        os.mkfifo(so)
    elif kind == "manifest_symlink_copy":
        shutil.move(mf, outside / "manifest.json")
        mf.symlink_to(outside / "manifest.json")
    elif kind == "manifest_to_device":
        device = rng.choice(("/dev/zero", "/dev/null", "/dev/urandom"))
        mf.unlink()
        mf.symlink_to(device)
        return f"manifest.json a symlink to {device}"
    elif kind == "manifest_fifo":
        mf.unlink()
        os.mkfifo(mf)
    elif kind == "manifest_dir":
        mf.unlink()
        mf.mkdir()
    elif kind == "manifest_dangling":
        mf.unlink()
        mf.symlink_to(outside / "nowhere.json")
    elif kind == "manifest_loop":
        mf.unlink()
        mf.symlink_to(mf)
    elif kind == "artifact_symlink":
        moved = art.parent / "real-artifact"
        shutil.move(art, moved)
        art.symlink_to(moved)
    else:
        shutil.rmtree(art)
        art.write_text("not a directory")
    return kind.replace("_", " ")


_TAMPERINGS = {
    "delete": tamper_delete, "retype": tamper_retype, "edit": tamper_edit, "unsealed": tamper_unsealed,
    "json": tamper_json, "library": tamper_library, "bytes": tamper_bytes, "files": tamper_files,
}


def _declared_feeds(model, reference: dict[str, np.ndarray], length: int) -> dict | None:
    """Feeds shaped and typed as the loaded manifest declares its inputs, symbolic dims `length` (None: they are
    the reference feeds)."""
    by_position = list(reference.values())
    feeds, differs = {}, False
    gen = np.random.default_rng(5)
    for i, spec in enumerate(model.inputs):
        shape = [length if isinstance(d, str) else d for d in spec.shape]
        original = by_position[i] if i < len(by_position) else None
        if original is not None and list(original.shape) == shape:
            value = original
        else:
            value, differs = gen.uniform(-6, 6, shape), True
        try:
            cast = np.asarray(value).astype(np.dtype(spec.dtype))
        except (TypeError, ValueError):
            return None
        differs = differs or cast.dtype != np.asarray(value).dtype
        feeds[spec.name] = cast
    return feeds if differs else None


def _as_declared(spec, value: np.ndarray) -> bool:
    """Whether an output array is of the dtype, rank and static sizes its (loaded) manifest declares."""
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError:
        import ml_dtypes

        dtype = np.dtype(getattr(ml_dtypes, spec.dtype))
    if value.dtype != dtype:
        return False
    return spec.shape is None or (value.ndim == len(spec.shape) and all(
        not isinstance(want, int) or want == got for want, got in zip(spec.shape, value.shape)))


def run_manifest_case(case: FuzzCase, bases: Bases, workdir: Path) -> tuple[Outcome, str]:
    """Tamper a copy of the base artifact; load it; run it on the base's reference feeds (renamed to the loaded
    input names, by position) and on feeds as its manifest declares them. Returns the outcome and the mutation."""
    import nativeq
    from nativeq.errors import NativeqError

    reference_feeds, reference = bases.reference_feeds(case.base), bases.reference_outputs(case.base)
    root = workdir / case.id
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    art = root / "artifact"
    shutil.copytree(bases.paths(case.base)[1], art)
    rng = random.Random(case.payload["key"])
    mutation = _TAMPERINGS[case.category](rng, art)
    try:
        model = nativeq.load(art, max_memory=MAX_MEMORY)
    except NativeqError as e:
        return Outcome(_message_outcome(str(e)), f"load: {e}"), mutation
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", f"load: {_first_line(e)}"), mutation
    feeds = {spec.name: value for spec, value in zip(model.inputs, reference_feeds.values())}
    outcome = None
    try:
        got = model.run(feeds)
    except NativeqError as e:
        outcome = Outcome(_message_outcome(str(e)), f"run: {e}")
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", f"run: {_first_line(e)}"), mutation
    declared = _declared_feeds(model, reference_feeds, bases.reference_length(case.base))
    if declared is not None:
        try:
            tampered = list(model.run(declared).values())
        except NativeqError as e:
            if _message_outcome(str(e)) != "error":
                return Outcome("traceback", f"run as declared: {e}"), mutation
        except Exception as e:  # noqa: BLE001
            return Outcome("crash", f"run as declared: {_first_line(e)}"), mutation
        else:  # the untampered artifact is the reference for these feeds too
            untampered_model = bases.model(case.base)
            try:
                untampered = list(untampered_model.run(
                    {spec.name: value for spec, value in zip(untampered_model.inputs, declared.values())}).values())
            except NativeqError:
                return Outcome("wrong", "ran inputs (as its manifest declares them) that its library refuses"), mutation
            if len(tampered) != len(untampered) or any(
                    a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b)
                    for a, b in zip(tampered, untampered)):
                return Outcome("wrong", "inputs as its manifest declares them give other outputs"), mutation
    if outcome is not None:
        return outcome, mutation
    values = list(got.values())
    if list(got) != [spec.name for spec in model.outputs] or len(values) != len(reference):
        return Outcome("wrong", f"outputs {list(got)} do not match the manifest or the untampered artifact"), mutation
    for spec, value in zip(model.outputs, values):
        if not _as_declared(spec, value):
            return Outcome("wrong", f"returns {spec.name!r} as {value.dtype}{list(value.shape)}, its manifest "
                                    f"declares {spec}"), mutation
    for value, expected in zip(values, reference):
        if value.dtype != expected.dtype or value.shape != expected.shape or not np.array_equal(value, expected):
            return Outcome("wrong", "loads and runs, but its outputs differ from the untampered artifact's"), mutation
    return Outcome("verified", "loads and gives the untampered artifact's outputs"), mutation


# =============================================================================================
# Audio files

AUDIO_RATE = 16000


def _signal(frames: int, seed: int) -> np.ndarray:
    """A speech-band test signal in [-0.6, 0.6]: a glide, a tone and noise."""
    t = np.arange(frames) / AUDIO_RATE
    noise = np.random.default_rng(seed).normal(0, 0.03, frames)
    return 0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.15 * np.sin(2 * np.pi * 1234 * t) + noise


def riff_wav(data: bytes, *, rate: int, channels: int, bits: int, tag: int = 1, extra_fmt: bytes = b"") -> bytes:
    """A plain RIFF/WAVE file: a `fmt ` chunk (16 bytes + `extra_fmt`) and a `data` chunk."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + extra_fmt
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    if len(data) % 2:
        body += b"\0"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def base_audio(name: str) -> tuple[str, bytes]:
    """(file suffix, bytes) of a valid audio file: 0.25 s of the test signal."""
    frames = AUDIO_RATE // 4
    mono = _signal(frames, 0)
    if name == "wav16_mono":
        return ".wav", riff_wav(np.round(mono * 32767).astype("<i2").tobytes(), rate=AUDIO_RATE, channels=1, bits=16)
    if name == "wav16_stereo":
        stereo = np.stack([mono, _signal(frames, 1)], axis=1)
        return ".wav", riff_wav(np.round(stereo * 32767).astype("<i2").tobytes(), rate=AUDIO_RATE, channels=2, bits=16)
    if name == "wav24_mono":
        ints = np.round(mono * (2**23 - 1)).astype("<i4")
        packed = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        return ".wav", riff_wav(packed, rate=AUDIO_RATE, channels=1, bits=24)
    if name == "float32_22k":
        t = np.arange(22050 // 4) / 22050
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2000 * t)
        return ".wav", riff_wav(x.astype("<f4").tobytes(), rate=22050, channels=1, bits=32, tag=3,
                                extra_fmt=struct.pack("<H", 0))
    if name == "flac16_mono":
        import io

        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, np.round(mono * 32767).astype(np.int16), AUDIO_RATE, format="FLAC", subtype="PCM_16")
        return ".flac", buffer.getvalue()
    raise ValueError(name)


_AUDIO_CACHE: dict[str, tuple[str, bytes]] = {}


def _audio(name: str) -> tuple[str, bytes]:
    if name not in _AUDIO_CACHE:
        _AUDIO_CACHE[name] = base_audio(name)
    return _AUDIO_CACHE[name]


@dataclass
class _Chunk:
    cid: bytes
    body: bytes
    size: int | None = None  # the size field, when it lies

    def encode(self) -> bytes:
        size = len(self.body) if self.size is None else self.size
        return self.cid + struct.pack("<I", size & 0xFFFFFFFF) + self.body + (b"\0" if len(self.body) % 2 else b"")


def _chunks(data: bytes) -> list[_Chunk]:
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunks.append(_Chunk(cid, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def _assemble(chunks: list[_Chunk], riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(c.encode() for c in chunks)
    return b"RIFF" + struct.pack("<I", (len(body) if riff_size is None else riff_size) & 0xFFFFFFFF) + body


_FMT_FIELDS = {"tag": (0, "H"), "channels": (2, "H"), "rate": (4, "I"), "byte_rate": (8, "I"), "block_align": (12, "H"),
               "bits": (14, "H")}


def _special(rng, field_name: str, current: int) -> int:
    pools = {
        "tag": (0, 1, 2, 3, 6, 7, 0x11, 0x55, 0xFFFE, 0xFFFF, rng.randrange(65536)),
        "channels": (0, 1, 2, 3, 8, 255, 1024, 65535),
        "rate": (0, 1, 999, 1000, 8000, 22050, 44100, 48000, 96000, 1_000_000, 1_000_001, 2**31, 2**32 - 1),
        "byte_rate": (0, 1, current * 2, 2**32 - 1),
        "block_align": (0, 1, 3, current * 2, 65535),
        "bits": (0, 1, 7, 8, 12, 16, 20, 24, 32, 33, 64, 65535),
    }
    return rng.choice([v for v in pools[field_name] if v != current] or [current + 1])


def mutate_header(rng, data):
    chunks = _chunks(data)
    fmt = next(c for c in chunks if c.cid == b"fmt ")
    body = bytearray(fmt.body)
    edits = []
    for name in rng.sample(list(_FMT_FIELDS), rng.choice((1, 1, 2))):
        offset, code = _FMT_FIELDS[name]
        current = struct.unpack_from("<" + code, body, offset)[0]
        value = _special(rng, name, current)
        struct.pack_into("<" + code, body, offset, value & (0xFFFF if code == "H" else 0xFFFFFFFF))
        edits.append(f"{name} {current} -> {value}")
    fmt.body = bytes(body)
    return "fmt " + ", ".join(edits), _assemble(chunks)


def mutate_sizes(rng, data):
    chunks = _chunks(data)
    which = rng.choice(("riff", "fmt", "data", "data", "fmt_body"))
    if which == "riff":
        size = rng.choice((0, 4, len(data) - 9, len(data) + 1, 2**31, 2**32 - 1))
        return f"RIFF size = {size}", _assemble(chunks, riff_size=size)
    chunk = next(c for c in chunks if c.cid == (b"data" if which == "data" else b"fmt "))
    if which == "fmt_body":
        cut = rng.choice((0, 2, 14, 15, 17, 18, 40))
        chunk.body = (chunk.body + b"\0" * 40)[:cut]
        return f"fmt chunk body {cut} bytes (size field agrees)", _assemble(chunks)
    true = len(chunk.body)
    size = rng.choice((0, 1, true - 1, true + 1, true // 2, true * 2, 2**31, 2**32 - 1, 2**32 - 2, 15, 17))
    chunk.size = size
    return f"{which} chunk size {true} -> {size}", _assemble(chunks)


def mutate_truncate(rng, data):
    cut = rng.choice((rng.randrange(0, 48), rng.randrange(len(data))))
    return f"cut at byte {cut} of {len(data)}", data[:cut]


def mutate_byteflip(rng, data):
    flipped = bytearray(data)
    region = rng.choice(("header", "data", "anywhere"))
    spots = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        pos = rng.randrange(44) if region == "header" else rng.randrange(44, len(data)) if region == "data" else \
            rng.randrange(len(data))
        mask = rng.randrange(1, 256)
        flipped[pos] ^= mask
        spots.append(f"{pos}^{mask:#04x}")
    return f"flip ({region}) " + ", ".join(spots), bytes(flipped)


def mutate_chunks(rng, data):
    chunks = _chunks(data)
    kind = rng.choice(("junk_after", "list_before", "odd_before", "fmt_twice", "data_twice", "data_first",
                       "junk_lying_size", "junk_huge_size", "no_fmt", "no_data", "trailing_bytes", "empty_chunk_id"))
    fmt = next(c for c in chunks if c.cid == b"fmt ")
    data_chunk = next(c for c in chunks if c.cid == b"data")
    if kind == "junk_after":
        chunks.append(_Chunk(rng.choice((b"JUNK", b"LIST", b"id3 ", b"cue ")), rng.randbytes(rng.randrange(1, 300))))
    elif kind == "list_before":
        chunks.insert(1, _Chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 6) + b"sox\0\0\0"))
    elif kind == "odd_before":
        chunks.insert(1, _Chunk(b"JUNK", rng.randbytes(rng.choice((1, 3, 7)))))
    elif kind == "fmt_twice":
        other = bytearray(fmt.body)
        struct.pack_into("<I", other, 4, 8000)
        chunks.insert(1, _Chunk(b"fmt ", bytes(other)))
    elif kind == "data_twice":
        chunks.append(_Chunk(b"data", rng.randbytes(200)))
    elif kind == "data_first":
        chunks.remove(data_chunk)
        chunks.insert(0, data_chunk)
    elif kind == "junk_lying_size":
        chunks.insert(1, _Chunk(b"JUNK", b"\0" * 16, size=rng.choice((8, 24, 1000))))
    elif kind == "junk_huge_size":
        chunks.insert(1, _Chunk(b"JUNK", b"\0" * 16, size=2**32 - 1))
    elif kind == "no_fmt":
        chunks.remove(fmt)
    elif kind == "no_data":
        chunks.remove(data_chunk)
    elif kind == "trailing_bytes":
        return "bytes after the last chunk", _assemble(chunks) + rng.randbytes(rng.choice((1, 3, 8)))
    else:
        chunks.insert(1, _Chunk(b"\0\0\0\0", b""))
    return kind.replace("_", " "), _assemble(chunks)


def mutate_garbage(rng, data):
    kind = rng.choice(("empty", "random", "text", "riff_avi", "riff_only", "flac_magic", "ogg_magic", "id3_magic",
                       "zeros", "one_byte", "wave_no_chunks", "html"))
    if kind == "empty":
        return "empty file", b""
    if kind == "random":
        n = rng.choice((1, 10, 44, 1000, 8000))
        return f"{n} random bytes", rng.randbytes(n)
    if kind == "text":
        return "text", b"meeting notes, not audio\n" * rng.choice((1, 100))
    if kind == "riff_avi":
        return "a RIFF AVI header", b"RIFF" + struct.pack("<I", 100) + b"AVI " + rng.randbytes(100)
    if kind == "riff_only":
        return "RIFF and nothing else", b"RIFF"
    if kind == "flac_magic":
        return "fLaC and random bytes", b"fLaC" + rng.randbytes(rng.choice((0, 30, 500)))
    if kind == "ogg_magic":
        return "OggS and random bytes", b"OggS" + rng.randbytes(rng.choice((0, 30, 500)))
    if kind == "id3_magic":
        return "ID3 and random bytes", b"ID3\x03\x00\x00\x00\x00\x00\x10" + rng.randbytes(200)
    if kind == "zeros":
        return "zeros", b"\0" * rng.choice((44, 4096))
    if kind == "one_byte":
        return "one byte", bytes([rng.randrange(256)])
    if kind == "wave_no_chunks":
        return "RIFF WAVE with no chunks", b"RIFF" + struct.pack("<I", 4) + b"WAVE"
    return "an HTML page", b"<!DOCTYPE html><html><body>404</body></html>\n"


def mutate_flac(rng, data):
    kind = rng.choice(("truncate", "flip_frames", "flip_anywhere", "append", "total_samples", "md5"))
    frames_start = _flac_frames_start(data)
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return f"cut at byte {cut} of {len(data)} (frames start at {frames_start})", data[:cut]
    if kind in ("flip_frames", "flip_anywhere"):
        flipped = bytearray(data)
        low = frames_start if kind == "flip_frames" else 0
        spots = []
        for _ in range(rng.choice((1, 2))):
            pos, mask = rng.randrange(low, len(data)), rng.randrange(1, 256)
            flipped[pos] ^= mask
            spots.append(f"{pos}^{mask:#04x}")
        return f"flip ({'frames' if low else 'anywhere'}) " + ", ".join(spots), bytes(flipped)
    if kind == "append":
        junk = rng.choice((b"\0" * 100, rng.randbytes(100), b"ID3" + rng.randbytes(60), data[frames_start:frames_start + 50]))
        return f"{len(junk)} bytes appended", data + junk
    edited = bytearray(data)
    info = 8  # STREAMINFO body starts after "fLaC" and its 4-byte block header
    if kind == "total_samples":
        total = rng.choice((0, 1, 100, AUDIO_RATE // 4 - 1, AUDIO_RATE // 4 + 1, AUDIO_RATE, 2**36 - 1))
        word = int.from_bytes(edited[info + 13:info + 18], "big")
        word = (word & ~(2**36 - 1)) | total
        edited[info + 13:info + 18] = word.to_bytes(5, "big")
        return f"STREAMINFO total samples = {total}", bytes(edited)
    edited[info + 18:info + 34] = rng.randbytes(16)
    return "STREAMINFO MD5 changed", bytes(edited)


def _flac_total_samples(data: bytes) -> int | None:
    """STREAMINFO's total samples of a FLAC stream (0: unknown; None: no STREAMINFO)."""
    if len(data) < 26 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        return None
    return int.from_bytes(data[21:26], "big") & (2**36 - 1)


def _flac_frames_start(data: bytes) -> int:
    pos = 4
    while True:
        header = data[pos]
        size = int.from_bytes(data[pos + 1:pos + 4], "big")
        pos += 4 + size
        if header & 0x80:
            return pos


_AUDIO_MUTATIONS = {
    "header": mutate_header, "sizes": mutate_sizes, "truncate": mutate_truncate, "byteflip": mutate_byteflip,
    "chunks": mutate_chunks, "garbage": mutate_garbage, "flac": mutate_flac,
}


def _make_audio(category, base, rng):
    suffix, data = _audio(base)
    mutation, mutated = _AUDIO_MUTATIONS[category](rng, data)
    if category == "garbage":
        suffix = rng.choice((".wav", ".flac", ".ogg", ".mp3", ".wav", ""))
    return mutation, {"data": mutated, "suffix": suffix}


@dataclass
class ReferenceAudio:
    """What a WAV file holds by its header, decoded independently of libsndfile."""

    samples: np.ndarray | None  # float32 [frames, channels], full scale ±1; None: not decidable here
    rate: int
    truncated: bool  # the data chunk promises more whole frames than the file holds
    problem: str | None = None  # why the file is not valid audio (then `samples` is None)


_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def reference_wav(data: bytes) -> ReferenceAudio | None:
    """The samples of a RIFF/WAVE file by the letter of its header (None: not a RIFF/WAVE file).

    Follows the chunks (odd sizes padded); the first `fmt ` and the first `data` chunk count; a data size
    of 0xFFFFFFFF means "to the end of the file". Decodes PCM of 8 (unsigned), 16, 24 and 32 bits and IEEE
    float of 32 and 64 bits, also as WAVE_FORMAT_EXTENSIBLE; anything else is undecidable here.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt, found = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt " and fmt is None:
            fmt = data[pos + 8:pos + 8 + size]
        if cid == b"data":
            found = (pos + 8, size)
            break
        pos += 8 + size + (size & 1)
    if fmt is None or found is None:
        return ReferenceAudio(None, 0, False, "no fmt chunk before a data chunk")
    if len(fmt) < 16:
        return ReferenceAudio(None, 0, False, "fmt chunk shorter than 16 bytes")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 40 and fmt[26:40] == _GUID_TAIL:
        tag = struct.unpack("<H", fmt[24:26])[0]
    start, claimed = found
    present = len(data) - start
    if claimed == 0xFFFFFFFF:
        claimed = present
    if channels == 0 or rate == 0:
        return ReferenceAudio(None, rate, False, "0 channels or 0 Hz")
    if tag in (6, 7):  # G.711 A-law / mu-law: one byte a sample whatever `bits` says
        width = 1
    elif tag == 1 and 1 <= bits <= 32:  # integer PCM in whole-byte containers (12 bits in 2 bytes, ...)
        width = (bits + 7) // 8
    elif tag == 3 and bits in (32, 64):
        width = bits // 8
    else:
        return ReferenceAudio(None, rate, False, f"format {tag:#x} with {bits} bits is not decoded here")
    frame = channels * width
    frames_claimed, frames_present = claimed // frame, min(claimed, present) // frame
    raw = np.frombuffer(data[start:start + frames_present * frame], np.uint8)
    if tag in (6, 7):
        values = _g711(raw, alaw=tag == 6) / 32768.0
    elif tag == 3:
        values = np.frombuffer(raw.tobytes(), "<f4" if width == 4 else "<f8").astype(np.float64)
    elif width == 1:
        values = (raw.astype(np.float64) - 128) / 128
    else:
        ints = np.zeros(len(raw) // width, np.int64)
        for k in range(width):  # little-endian, the top byte signed
            ints |= raw[k::width].astype(np.int64) << (8 * k)
        ints = np.where(ints >= 2 ** (8 * width - 1), ints - 2 ** (8 * width), ints)
        values = ints.astype(np.float64) / 2 ** (8 * width - 1)
    samples = values.astype(np.float32).reshape(-1, channels)
    return ReferenceAudio(samples, rate, frames_present < frames_claimed)


def _g711(raw: np.ndarray, alaw: bool) -> np.ndarray:
    """16-bit linear values of G.711 A-law or mu-law bytes (ITU-T G.711)."""
    if alaw:
        byte = raw.astype(np.int64) ^ 0x55
        exponent, mantissa = (byte >> 4) & 7, byte & 0x0F
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
        return np.where(byte & 0x80, magnitude, -magnitude).astype(np.float64)
    byte = ~raw.astype(np.int64) & 0xFF
    exponent, mantissa = (byte >> 4) & 7, byte & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(byte & 0x80, -magnitude, magnitude).astype(np.float64)


def _expected_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """What `read_audio` makes of these samples: channels averaged, resampled to 16 kHz."""
    from nativeq.models.audio import SAMPLE_RATE, resample

    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else mono


_FLAC_ORIGINAL: dict[str, np.ndarray] = {}


def _flac_original() -> np.ndarray:
    if "x" not in _FLAC_ORIGINAL:
        import io

        import soundfile as sf

        samples, rate = sf.read(io.BytesIO(_audio("flac16_mono")[1]), dtype="float32", always_2d=True)
        assert rate == AUDIO_RATE
        _FLAC_ORIGINAL["x"] = samples[:, 0]
    return _FLAC_ORIGINAL["x"]


def run_audio_case(case: FuzzCase, workdir: Path) -> Outcome:
    from nativeq.errors import NativeqError
    from nativeq.models.audio import AudioTruncatedWarning, read_audio

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{case.id}{case.payload['suffix']}"
    data = case.payload["data"]
    path.write_bytes(data)
    reference = reference_wav(data) if case.base != "flac16_mono" else None
    readable = reference is not None and reference.samples is not None and len(reference.samples) > 0 \
        and bool(np.isfinite(reference.samples).all())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = read_audio(path)
    except NativeqError as e:
        message = str(e)
        if _message_outcome(message) != "error":
            return Outcome("traceback", message)
        if str(path) not in message:
            return Outcome("traceback", f"does not name the file: {message}")
        return Outcome("error", message, reference_accepts=readable)
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", _first_line(e))
    finally:
        path.unlink(missing_ok=True)
    warned = [w for w in caught if issubclass(w.category, AudioTruncatedWarning)]
    others = [w for w in caught if not issubclass(w.category, AudioTruncatedWarning)]
    if others:
        return Outcome("traceback", f"unexpected {others[0].category.__name__}: {others[0].message}")
    for w in warned:
        text = str(w.message)
        if "\n" in text.strip() or str(path) not in text:
            return Outcome("traceback", f"warning not one line naming the file: {text}")
    if len(warned) > 1:
        return Outcome("traceback", f"{len(warned)} warnings")
    if case.base == "flac16_mono":
        original = _flac_original()
        total = _flac_total_samples(data)
        if total:  # the letter of the header, as for a WAV data size: no more than STREAMINFO's total
            original = original[:total]
        # The original's samples are all a FLAC stream can hold; a shorter read is a prefix, with a warning.
        if len(got) > len(original) or not np.array_equal(got, original[:len(got)]):
            return Outcome("wrong", f"read {len(got)} samples that are not the original's")
        if len(got) < len(original) and not warned:
            return Outcome("wrong", f"read {len(got)} of {len(original)} samples without a warning")
        if warned:
            return Outcome("warning", str(warned[0].message))
        return Outcome("verified", "the original samples")
    if reference is None or reference.samples is None:
        return Outcome("wrong", "read, but it is not a WAV file this reader can decide"
                       + (f" ({reference.problem})" if reference else ""))
    expected = _expected_mono(reference.samples, reference.rate)
    if got.shape != expected.shape or not np.array_equal(got, expected):
        diff = f"{len(got)} samples vs {len(expected)}" if got.shape != expected.shape else \
            f"max |diff| {float(np.abs(got - expected).max()):.3g}"
        return Outcome("wrong", f"samples differ from what the file holds ({diff})")
    if reference.truncated and not warned:
        return Outcome("wrong", "the file is cut short and no warning says so")
    if warned:
        if not reference.truncated:
            return Outcome("wrong", f"warns of truncation, the file is whole: {warned[0].message}")
        return Outcome("warning", str(warned[0].message))
    return Outcome("verified", "the samples the file holds")


# =============================================================================================
# Running cases, and a campaign: child processes write one JSON line per case; a child that dies is a crash


def run_case(case: FuzzCase, bases: Bases | None, workdir: Path) -> tuple[Outcome, str]:
    """Run `case` in this process: its outcome and the mutation as applied (manifest tamperings are drawn then)."""
    if case.kind == "runtime":
        return run_runtime_case(case, bases), case.mutation
    if case.kind == "manifest":
        return run_manifest_case(case, bases, workdir)
    return run_audio_case(case, workdir), case.mutation


def _limit_memory() -> None:
    """Cap this (child) process's address space, so a mutation that makes nativeq read without end fails here."""
    import resource

    limit = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker(kind: str, indices: list[int], seed: int, workdir: Path, out: Path) -> None:
    warnings.simplefilter("ignore")
    _limit_memory()
    bases = Bases(workdir / "bases") if kind != "audio" else None
    with out.open("a") as f:
        for index in indices:
            case = make_case(kind, index, seed)
            started = time.perf_counter()
            f.write(json.dumps({"index": index, "started": True}) + "\n")
            f.flush()
            outcome, mutation = run_case(case, bases, workdir / "cases")
            record = {"index": index, "id": case.id, "category": case.category, "base": case.base,
                      "mutation": mutation, "seconds": round(time.perf_counter() - started, 3), **asdict(outcome)}
            f.write(json.dumps(record) + "\n")
            f.flush()
            shutil.rmtree(workdir / "cases" / case.id, ignore_errors=True)


def describe_case(case: FuzzCase, workdir: Path) -> str:
    """The mutation of `case` (a tampering is drawn on a scratch copy of its base artifact: files only, no load)."""
    if case.kind != "manifest":
        return case.mutation
    scratch = workdir / "describe" / case.id
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        shutil.copytree(Bases(workdir / "bases").paths(case.base)[1], scratch / "artifact")
        return _TAMPERINGS[case.category](random.Random(case.payload["key"]), scratch / "artifact")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_bases(kind: str, workdir: Path) -> None:
    """Compile the bases a campaign of `kind` needs once, before its child processes start."""
    if kind == "audio":
        return
    bases = Bases(workdir / "bases")
    for name in BASES[kind]:
        bases.paths(name)


def run_campaign(kind: str, count: int, seed: int, out: Path, workdir: Path, case_timeout: float = 60.0) -> list[dict]:
    """Run cases 0..count-1 of `kind` in child processes; one record per case (dead or hung children give crashes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_bases(kind, workdir)

    def crash(index: int, returncode: int | None) -> dict:
        case = make_case(kind, index, seed)
        return {"index": index, "id": case.id, "category": case.category, "base": case.base,
                "mutation": describe_case(case, workdir), "outcome": "crash",
                "detail": f"process died (exit {returncode}) or hung"}

    worker = [sys.executable, __file__, "--worker", "--kind", kind, "--seed", str(seed), "--out", str(out),
              "--workdir", str(workdir)]
    return run_in_children(worker, count, out, workdir, crash, case_timeout, poll_seconds=0.2)


def summary_table(kind: str, records: list[dict]) -> str:
    """Tried / per-outcome counts per category, and the refusals the reference accepts (ORT runs, the RIFF reader reads)."""
    reference = {"runtime": ("refused, ORT runs it",), "manifest": (), "audio": ("refused, readable",)}[kind]
    rows = []
    for category in (*CATEGORIES[kind], "total"):
        rs = [r for r in records if category == "total" or r["category"] == category]
        counts = [sum(r["outcome"] == o for r in rs) for o in OUTCOMES]
        accepted = sum(bool(r.get("reference_accepts")) for r in rs if r["outcome"] == "error")
        rows.append((category, len(rs), *counts, *((accepted,) if reference else ())))
    header = ("category", "tried", "clean error", "warning", "verified", "crash", "traceback", "wrong", *reference)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--cases", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines, one per case (default: KIND.jsonl)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--indices", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or Path(f"{args.kind}.jsonl")
    if args.worker:
        _worker(args.kind, [int(i) for i in args.indices.split(",") if i], args.seed, args.workdir, out)
        return 0
    with tempfile.TemporaryDirectory(prefix=f"nativeq-fuzz-{args.kind}-") as tmp:
        records = run_campaign(args.kind, args.cases, args.seed, out, args.workdir or Path(tmp))
    print(summary_table(args.kind, records))
    for r in records:
        if r["outcome"] not in ("error", "warning", "verified"):
            print(f"{r['outcome']}: {r['id']} ({r['mutation']}): {r['detail']}")
    return 0 if all(r["outcome"] in ("error", "warning", "verified") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
