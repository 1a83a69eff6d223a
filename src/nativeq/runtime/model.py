"""`CompiledModel`: a loaded artifact you call with numpy arrays by input name.

Only tvm-ffi and TVM's runtime library (`libtvm_runtime.so`) are used: not the `tvm` Python
package, whose `__init__` loads the compiler (see `nativeq.runtime`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError
from nativeq.runtime.memory import MemoryFormula, check_memory, default_limit, parse_memory
from nativeq.runtime.shape_checks import check_shape_conditions
from nativeq.runtime.manifest import TensorSpec, input_specs, output_specs

_KDL_CPU = 1  # DLPack device type of the CPU
_POOLED_ALLOCATOR = 2  # tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
_SHARE_ALL_CORES = -3  # tvm::runtime::threading::ThreadGroup::kSpecifyThreadShareAllCore
# NOTE: read before any TVM thread pool exists: TVM's default pool pins the thread that first runs a
# parallel kernel to its first cores, so this thread's affinity may be narrower afterwards.
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
_import_lock = threading.Lock()
_pool = threading.local()  # .threads: what this thread's TVM pool was last configured to by a CompiledModel


def import_tvm_ffi():
    """The `tvm_ffi` module, imported without importing torch.

    NOTE: tvm-ffi's `__init__` runs `import torch` whenever torch is installed (a workaround for a
    symbol clash on Windows) and has no switch to skip it; torch costs seconds to import and is never
    needed here. The import is therefore made with torch hidden, unless torch or tvm_ffi is imported
    already. tvm-ffi's optional torch DLPack accelerator then stays off in this process (nativeq passes
    numpy arrays only); a later `import torch` works as usual. In a runtime-only process
    (`TVM_USE_RUNTIME_LIB=1`) ml_dtypes is hidden too: tvm-ffi imports it for bfloat16/float8/int4
    numpy conversions, which nativeq does not use, and it is most of tvm-ffi's import time.
    """
    module = sys.modules.get("tvm_ffi")
    if module is not None:
        return module
    with _import_lock:
        hidden = ["torch"] + (["ml_dtypes"] if os.environ.get("TVM_USE_RUNTIME_LIB") == "1" else [])
        hidden = [name for name in hidden if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # makes `import name` raise ImportError
        try:
            import tvm_ffi as module
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    return module


def _configure_thread_pool(ffi, threads: int) -> None:
    """Give the calling thread's TVM pool `threads` workers that may run on any of `_CPUS`."""
    # NOTE: TVM's pool is per calling thread and sized when the thread first uses it (from its max
    # concurrency, which config_threadpool sets to the length of the cpu list); later calls can only
    # lower the number of workers used. The list is the allowed CPUs, cycled to at least `threads`.
    size = max(threads, len(_CPUS))
    cpus = [str(_CPUS[i % len(_CPUS)]) for i in range(size)]
    ffi.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, threads, cpus)
    _pool.threads = threads


def runtime_threads() -> int:
    """The number of workers the calling thread's TVM pool uses (after a `load`; starts the pool if there is none)."""
    return int(import_tvm_ffi().get_global_func("runtime.NumThreads")())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, object],
                 shape_checks: list[dict] | tuple = ()) -> list[np.ndarray]:
    """Validate `inputs` against `specs`; return the arrays in spec order (C-contiguous).

    Not a mapping, a wrong or missing name, a value that is no array, a dtype other than the
    declared one (no silent casts), a wrong rank, a static dim of another size, a symbolic dim
    of size 0 or bound to two sizes, or a NaN or infinity in a float input raises a
    NativeqError naming the input, what was expected and what was given; sizes that break one
    of the artifact's `shape_checks` (`shape_checks.py`) one naming the ONNX node.
    """
    arrays, _ = checked_structure(specs, inputs, shape_checks)
    return [checked_values(spec, array) for spec, array in zip(specs, arrays)]


def checked_structure(specs: tuple[TensorSpec, ...], inputs: Mapping[str, object],
                      shape_checks: list[dict] | tuple = (),
                      dtypes: tuple[np.dtype, ...] | None = None) -> tuple[list[np.ndarray], dict[str, int]]:
    """The checks of `check_inputs` that read no element: the arrays as given (in spec order, not copied)
    and the symbolic sizes they bind. Cheap whatever the sizes (a zero-stride view of terabytes included).
    `dtypes`: the specs' numpy dtypes, if the caller has them already (`_numpy_dtype` per spec)."""
    if not isinstance(inputs, (dict, Mapping)):  # dict first: the ABC check is slower
        example = ", ".join(f"{s.name!r}: array" for s in specs)
        raise NativeqError(
            f"run() takes a dict of input name -> array, got {type(inputs).__name__}; e.g. run({{{example}}})"
        )
    if len(inputs) != len(specs) or not all(s.name in inputs for s in specs):
        by_name = {s.name: s for s in specs}
        for name in inputs:
            if name not in by_name:
                listing = "; ".join(str(s) for s in specs)
                raise NativeqError(f"unknown input {name!r}; the model's inputs are: {listing}")
    arrays: list[np.ndarray] = []
    bound: dict[str, tuple[int, str]] = {}
    for index, spec in enumerate(specs):
        if spec.name not in inputs:
            raise NativeqError(f"missing input {spec.name!r} ({spec})")
        value = inputs[spec.name]
        try:
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError) as e:
            raise NativeqError(f"input {spec.name!r} is not an array: {str(e).splitlines()[0]}") from None
        if array.dtype != (_numpy_dtype(spec) if dtypes is None else dtypes[index]):
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
            elif got == 0:
                raise NativeqError(
                    f"input {spec.name!r}: dim {axis} ({want}) is 0; the model needs at least 1 "
                    f"(got shape {tuple(array.shape)})"
                )
            elif want in bound and bound[want][0] != got:
                size, where = bound[want]
                raise NativeqError(
                    f"input {spec.name!r}: dim {axis} ({want}) is {got} but {want}={size} from input {where!r}"
                )
            else:
                bound[str(want)] = (got, spec.name)
        arrays.append(array)
    sizes = {name: size for name, (size, _) in bound.items()}
    if shape_checks:
        check_shape_conditions(list(shape_checks), sizes)
    return arrays, sizes


def checked_values(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """`array` (which passed `checked_structure`) refused if a float input holds NaN or infinity, or if the input
    was fixed at compile time to other values; C-contiguous."""
    if spec.value is not None and not np.array_equal(array.reshape(-1), np.asarray(spec.value, array.dtype)):
        raise NativeqError(f"input {spec.name!r} was fixed to {', '.join(map(str, spec.value))} when the artifact "
                           f"was compiled (compile --input-value); got {_values_text(array)}")
    if array.dtype.kind == "f" and not _all_finite(array):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        raise NativeqError(
            f"input {spec.name!r} has {bad} NaN or infinite value{'s' if bad > 1 else ''}; "
            f"the model takes finite values only"
        )
    # NOTE: not np.ascontiguousarray, which returns a 0-d array as shape (1,) and the VM refuses it.
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _values_text(array: np.ndarray) -> str:
    flat = array.reshape(-1)
    return ", ".join(str(v) for v in flat[:4]) + (f" ... ({flat.size} values)" if flat.size > 4 else "")


def _numpy_dtype(spec: TensorSpec) -> np.dtype:
    """The numpy dtype of a manifest dtype name (bfloat16, float8 and 4-bit names need ml_dtypes)."""
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        pass
    try:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, spec.dtype))
    except (ImportError, AttributeError, TypeError):
        raise NativeqError(f"{spec.name!r} has dtype {spec.dtype}, which numpy cannot represent here "
                           f"(install ml_dtypes)") from None


def _all_finite(array: np.ndarray) -> bool:
    """No NaN and no infinity in the float array: one pass, no temporary array.

    float32/64 in C order: the dot product of the values with themselves (BLAS), which is NaN or infinite
    if any value is; a finite array whose squares overflow takes the exact check. float16: a float64 sum,
    which no float16 values overflow."""
    if array.dtype in _BLAS_FLOATS and array.flags.c_contiguous:
        flat = array.reshape(-1)
        if math.isfinite(np.dot(flat, flat)):
            return True
        return bool(np.isfinite(array).all())
    if array.dtype.itemsize <= 4:  # a float64 sum of float16/32 values cannot overflow: non-finite iff NaN/inf
        return bool(np.isfinite(array.sum(dtype=np.float64)))
    return bool(np.isfinite(array).all())


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


ALIGNMENT = 64  # bytes: what TVM's kernels assume of every tensor they are given


def needs_copy(array: np.ndarray) -> bool:
    """Whether `aligned` copies `array`: not C-contiguous, not 64-byte aligned, or read-only (DLPack before
    version 1.0, which tvm-ffi asks for, cannot mark a tensor read-only, so numpy refuses to export it)."""
    return not (array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0)


def _in_place(ffi, spec: TensorSpec, array: np.ndarray):
    """The DLPack tensor of `array` when the kernels can read it in place (`needs_copy`'s conditions, the address
    read from the tensor, which is cheaper than `ndarray.ctypes`; a 4-bit input is always widened), else None."""
    if spec.dtype in _WIDE_4BIT or not (array.flags.c_contiguous and array.flags.writeable):
        return None
    tensor = ffi.from_dlpack(array)
    return None if tensor.data_ptr() % ALIGNMENT else tensor


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` if it is C-contiguous, writeable and at a 64-byte aligned address, else such a copy of it."""
    if not needs_copy(array):
        return array
    buffer = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    offset = -buffer.ctypes.data % ALIGNMENT
    copy = buffer[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


# 4-bit tensors (ml_dtypes int4/uint4, one value a byte) cross DLPack, which has no 4-bit type, as 8-bit:
# the compiled function takes and returns int8/uint8 holding the same values.
_WIDE_4BIT = {"int4": np.int8, "uint4": np.uint8}


def _widen_4bit(array: np.ndarray, dtype: str) -> np.ndarray:
    wide = _WIDE_4BIT.get(dtype)
    return array if wide is None else array.astype(wide)


def _narrow_4bit(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(np.dtype(dtype)) if dtype in _WIDE_4BIT else array


class CompiledModel:
    """A compiled artifact loaded on this CPU (created by `nativeq.load`).

    `model(x=feats)` or `model.run({"x": feats})` returns a dict name -> np.ndarray in the
    ONNX output order. `.inputs` / `.outputs` are `TensorSpec`s.

    Thread safety: one model may be called from any number of threads at once. Each calling
    thread gets its own Relax VM, made on its first call from the library loaded once (a VM
    holds per-call state - registers, storage - that concurrent calls would corrupt). VMs share
    the code and the constants (weights); a thread's VM is freed when the thread ends.

    `threads` (None: TVM's default, `TVM_NUM_THREADS` or the number of physical cores) sets the
    number of TVM worker threads each calling thread uses for this model's kernels (TVM's pool
    is per calling thread: N calling threads with threads=k use up to N*k workers).

    `max_memory` (bytes or "4GB"; None: `runtime.memory.default_limit()` at load) bounds each call:
    `run` refuses inputs whose memory bound (the manifest's `memory` formula) exceeds it, before
    running (see `runtime/memory.py`). `memory_needed(sizes)` gives the bound.
    """

    def __init__(self, path: Path, manifest: dict, library, *, threads: int | None = None, max_memory=None):
        self.path = Path(path)
        self.manifest = manifest
        self.inputs: tuple[TensorSpec, ...] = input_specs(manifest)
        self.outputs: tuple[TensorSpec, ...] = output_specs(manifest)
        self.target: str = manifest["target"]["name"]
        self.threads = threads
        self._memory = MemoryFormula.from_manifest(manifest)
        self._default_limit = max_memory is None
        self.max_memory: int | None = default_limit() if max_memory is None else parse_memory(max_memory)
        self._ffi = import_tvm_ffi()
        self._library = library
        self._entry_name = manifest["entry"]
        self._local = threading.local()
        self._input_dtypes = tuple(_numpy_dtype(spec) for spec in self.inputs)
        self._output_dtypes = tuple(np.dtype(_WIDE_4BIT[spec.dtype]) if spec.dtype in _WIDE_4BIT
                                    else _numpy_dtype(spec) for spec in self.outputs)
        self._shape_checks = tuple(manifest.get("shape_checks") or ())
        if self._memory is not None and not any(isinstance(d, str) for s in self.inputs for d in s.shape or ()):
            self.check_memory({})  # static shapes: every call needs the same
        self._entry()  # the loading thread's VM: a broken library fails in `load`, not at the first call

    def _new_vm(self):
        """A new Relax VM of this model's executable, on the CPU (shares code and weights with the others)."""
        vm = self._library["vm_load_executable"]()
        vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
        return vm

    def _entry(self):
        """The entry function of the calling thread's VM (made on the thread's first call)."""
        entry = getattr(self._local, "entry", None)
        if entry is None:
            vm = self._new_vm()
            self._local.vm, self._local.entry = vm, vm[self._entry_name]
            entry = self._local.entry
        if self.threads is not None and getattr(_pool, "threads", None) != self.threads:
            _configure_thread_pool(self._ffi, self.threads)
        return entry

    def run(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        given, sizes = checked_structure(self.inputs, inputs, self._shape_checks, self._input_dtypes)
        ffi = self._ffi
        # NOTE: zero-copy both ways (DLPack): a tensor copy costs ~30 us a call, more than a small model's
        # kernels. The kernels read the caller's arrays in place and never write them; every call's outputs
        # are fresh VM allocations, so the returned arrays own their memory (through the DLPack capsule).
        tensors = [_in_place(ffi, spec, a) for spec, a in zip(self.inputs, given)]
        # NOTE: before any element is read (finiteness) or copied, so a refused size costs nothing however
        # large its inputs are; the copies count towards the bound.
        self.check_memory(sizes, sum(a.nbytes for a, t in zip(given, tensors) if t is None))
        staged = []
        for index, (spec, a) in enumerate(zip(self.inputs, given)):
            checked_values(spec, a)
            if tensors[index] is None:
                staged.append(self._staged(index, _widen_4bit(a, spec.dtype)))
                tensors[index] = ffi.from_dlpack(staged[-1])
        entry = self._entry()
        try:
            result = entry(*tensors)
        except Exception as e:  # noqa: BLE001  (the VM checks its arguments: a manifest that does not describe its library)
            raise NativeqError(f"artifact {self.path}: calling {self._entry_name!r} failed: {_first_line(e)}") from None
        values = [result] if isinstance(result, ffi.Tensor) else list(result)
        if len(values) != len(self.outputs):
            raise NativeqError(
                f"artifact {self.path} returned {len(values)} outputs, its manifest lists {len(self.outputs)}"
            )
        arrays = [np.from_dlpack(value) for value in values]
        if staged:  # an output that is an input (or a view of one) must not be the buffer the next call overwrites
            arrays = [array.copy() if any(np.may_share_memory(array, copy) for copy in staged)
                      else array for array in arrays]
        return {spec.name: self._output(spec, dtype, array)
                for spec, dtype, array in zip(self.outputs, self._output_dtypes, arrays)}

    def _staged(self, index: int, array: np.ndarray) -> np.ndarray:
        """`array` copied into the calling thread's 64-byte aligned buffer for input `index`, kept from call to
        call (grown when too small): most numpy arrays are only 16-byte aligned, and a fresh aligned allocation
        per call costs several times the copy of a small input."""
        buffers = self._local.__dict__.setdefault("staging", {})
        buffer = buffers.get(index)
        if buffer is None or buffer.nbytes < array.nbytes:
            buffer = buffers[index] = aligned(np.empty(max(array.nbytes, ALIGNMENT), np.uint8))
        copy = buffer[:array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(copy, array)
        return copy

    def _output(self, spec: TensorSpec, dtype: np.dtype, array: np.ndarray) -> np.ndarray:
        """`array` as the output `spec` declares it (`dtype`: what the library returns for it); a NativeqError if
        the library returned another dtype, rank or static size (a manifest edited to describe another library:
        returned as is, it would be mislabelled)."""
        shape_agrees = spec.shape is None or (array.ndim == len(spec.shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(spec.shape, array.shape)))
        if array.dtype != dtype or not shape_agrees:
            raise NativeqError(f"artifact {self.path}: its library returned {spec.name!r} as {array.dtype}"
                               f"{list(array.shape)}, its manifest declares {spec}; recompile it")
        return _narrow_4bit(array, spec.dtype)

    def memory_needed(self, sizes: Mapping[str, int]) -> int | None:
        """Upper bound in bytes of what one call with these symbolic sizes allocates (None: no formula)."""
        return None if self._memory is None else self._memory.bytes(dict(sizes))

    def check_memory(self, sizes: Mapping[str, int], copies: int = 0) -> None:
        """Refuse (NativeqError) symbolic sizes whose memory bound (plus `copies` bytes of input copies) exceeds
        `max_memory`."""
        sizes = dict(sizes)
        need = (self._memory.bytes(sizes) if self._memory is not None else 0) + copies
        if self.max_memory is None or need <= self.max_memory:
            return
        if self._default_limit:
            self.max_memory = default_limit()  # memory may have been freed since the load
        check_memory(self._memory, sizes, self.max_memory, f"artifact {self.path}", copies)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"CompiledModel({str(self.path)!r}, target={self.target!r}, inputs=({ins}), outputs=({outs}))"
