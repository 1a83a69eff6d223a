"""Tuning nativeq's own int8 matmul schedule: its knobs as a MetaSchedule design space.

The int8 matmul kernels (`compile/schedules/matmul.py`) are scheduled by hand, not by
MetaSchedule's generic tiling: only the hand schedule keeps the register tile, the fused
requantize epilogue and the tensorized dot product together. What is left to search are its
knobs (`TileKnobs`: register tile rows x column blocks), whose best
values depend on the layer shape, the time length and the thread count. Each knob setting is
one design space of a `ScheduleFn`; the tuner measures them through the usual builder and
runner (local or RPC) and stores the records in TVM's JSON database. Every candidate carries
its knobs as the annotation `nativeq.tile` on the matmul block, so a record says which knobs
won.

Speech models have a symbolic time axis, and MetaSchedule measures static shapes only. A
kernel with symbolic rows is therefore tuned at a concrete length (`tune --dim T=256`):
`specialize` binds its size variables by name. At compile time the symbolic kernel is
specialized the same way, the database is queried with that static twin, and the winning
knobs are applied to the symbolic kernel (`knobs_for`). Kernels whose N (columns) is symbolic
(attention's Q·Kᵀ) use the padded-epilogue schedule, which has no knobs, and are not tuned.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, tirx, tvm
from nativeq.compile.schedules.intrinsics import DotIntrin
from nativeq.compile.schedules.matmul import (
    TileKnobs,
    apply_int8_matmul,
    int8_matmul_n_blocks,
    is_int8_matmul,
    kernel_intrin,
    tile_choices,
    without_tile_list_reads,
)
from nativeq.compile.schedules.pack_weights import REDUCTION_BLOCK

TILE_ANNOTATION = "nativeq.tile"
DEFAULT_LENGTH = 256  # the value a symbolic size is tuned at when `--dim` does not name it
BATCH_NAMES = ("batch", "batch_size", "n", "b", "bs")  # symbolic sizes tuned at 1 by default
NOISE_MARGIN = 0.03  # a tuned tile must beat the default tile's measurement by more than this


def size_vars(func) -> dict:
    """The symbolic sizes of a PrimFunc by name: its scalar params (e.g. `T`) and the variables
    its buffer params' shapes define."""
    found = {}
    for param in func.params:
        if isinstance(param.ty, tirx.buffer.BufferType):
            for dim in param.ty.shape:
                for var in tirx.analysis.undefined_vars(dim, []):
                    found.setdefault(var.name, var)
        else:
            found.setdefault(param.name, param)
    return found


def default_dims(names, given: dict[str, int]) -> dict[str, int]:
    """A value for every symbolic size name: `given`, else 1 for batch-like names, else DEFAULT_LENGTH."""
    return {name: given.get(name, 1 if name.lower() in BATCH_NAMES else DEFAULT_LENGTH) for name in sorted(set(names))}


def specialize(func, dims: dict[str, int]):
    """`func` with its symbolic sizes bound to `dims` (by name), or None if one has no value."""
    sizes = size_vars(func)
    if any(name not in dims for name in sizes):
        return None
    # NOTE: TVM binds a buffer's symbolic dims to a new buffer's, and each must then be a bare
    # variable; a buffer with a derived dim (e.g. (B, (T - 1) // 4 + 1, C)) can be bound only once
    # the derived dim's variables are, hence rounds until nothing symbolic is left.
    while sizes:
        analyzer = Analyzer()
        for name, var in sizes.items():
            analyzer.bind(var, tirx.IntImm(var.ty.dtype, int(dims[name])))
        param_map = {}
        for param in func.params:
            if not isinstance(param.ty, tirx.buffer.BufferType):
                param_map[param] = tirx.IntImm(param.ty.dtype, int(dims[param.name]))
                continue
            symbolic = [d for d in param.ty.shape if not isinstance(d, tirx.IntImm)]
            if symbolic and all(isinstance(d, tirx.Var) for d in symbolic):
                shape = [analyzer.simplify(d) for d in param.ty.shape]
                param_map[param] = tirx.decl_buffer(shape, param.ty.dtype, name=param.name)
        if not param_map:
            return None
        func = func.specialize(param_map)
        sizes = size_vars(func)
    return func


def task_module(func):
    """The IRModule a kernel is tuned and looked up as (the same on both sides, or hashes differ); a block-sparse
    matmul's tile list is not a declared read of its dot-product block there (`matmul.without_tile_list_reads`)."""
    return tvm.IRModule({"main": without_tile_list_reads(func).with_attr("global_symbol", "main")})


def is_tunable_int8_matmul(func, intrin: DotIntrin | None) -> bool:
    """An int8 matmul whose N is static: its schedule has knobs (`tile_choices`)."""
    return intrin is not None and is_int8_matmul(func) and int8_matmul_n_blocks(func, intrin) is not None


def int8_matmul_space(intrin: DotIntrin, postprocs: list):
    """The MetaSchedule space generator of an int8 matmul task: one design space per knob setting."""
    from nativeq.compile._tvm import meta_schedule as ms

    def design_spaces(sch):
        n_blocks = int8_matmul_n_blocks(sch.mod["main"], intrin)
        spaces = []
        for knobs in tile_choices(n_blocks, kernel_intrin(sch, intrin)):
            candidate = sch.copy()
            candidate.annotate(candidate.get_sblock(REDUCTION_BLOCK), TILE_ANNOTATION, knobs.as_text())
            scheduled = apply_int8_matmul(candidate, intrin, knobs)
            if scheduled is not None:
                spaces.append(scheduled)
        return spaces

    return ms.space_generator.ScheduleFn(design_spaces, sch_rules=[], postprocs=postprocs, mutator_probs={})


def knobs_of(trace) -> TileKnobs | None:
    """The knobs a tuning record's trace was scheduled with (None: not a nativeq template record)."""
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and len(inst.attrs) and str(inst.attrs[0]) == TILE_ANNOTATION:
            return TileKnobs.from_text(str(inst.inputs[1]).strip('"'))
    return None


def static_twins(func, dims_options: list[dict[str, int]]) -> list:
    """The static kernels `func` is looked up as: itself when static, else its specializations under
    each of `dims_options` that binds all its sizes, in order."""
    if not size_vars(func):
        return [func]
    return [twin for twin in (specialize(func, dims) for dims in dims_options) if twin is not None]


def knobs_for(twins: list, database, default: TileKnobs | None = None, margin: float = NOISE_MARGIN) -> TileKnobs | None:
    """The tuned knobs of a kernel: from the best record of the first of its `static_twins` that has
    records, or None.

    The `default` knobs win unless the best record beats the default's record by more than
    `margin`: a difference within the measurement noise is no reason to leave the default tile.
    """
    for static in twins:
        records = database.get_top_k(database.commit_workload(task_module(static)), 1 << 16)
        timed = [(knobs_of(r.trace), _mean_seconds(r)) for r in records]
        timed = [(k, t) for k, t in timed if k is not None and t is not None]
        if not timed:
            continue
        best, best_time = min(timed, key=lambda kt: kt[1])
        default_times = [t for k, t in timed if k == default]
        if default_times and min(default_times) <= best_time * (1 + margin):
            return default
        return best
    return None


def _mean_seconds(record) -> float | None:
    if record.run_secs is None or not len(record.run_secs):
        return None
    seconds = [float(s) for s in record.run_secs]
    return None if max(seconds) >= 1e9 else sum(seconds) / len(seconds)  # TVM stores 1e10 s for a failure
