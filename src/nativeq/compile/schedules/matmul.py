"""TIR schedule rule: int8 packed matmul (+ fused epilogue) -> tiled, parallel, tensorized kernel.

The same rule schedules a packed float32 matmul with the target's float multiply-add intrinsic
(`intrinsics.fma_intrin_for`, kstep 1): the intrinsic to use follows the accumulator's dtype.

Pipeline position: `schedule_passes(target)`, after FuseOps/FuseTIR. It acts on PrimFuncs
holding a `nativeq_int8_matmul` block, i.e. the `call_tir` kernels that
`pack_weights.PackInt8Weights` created (constant weight `[N/lanes, K/kstep, lanes, kstep]`) and
those `pack_activations.PackInt8Activations` created (activation x activation, the rhs packed at run
time: the same layout behind the batch dims, N and K zero-padded to whole tiles, possibly symbolic),
with whatever elementwise epilogue FuseTIR fused in (bias add, zero-point corrections, int32 -> float
rescale, round, clip, cast to int8/uint8). `schedule_int8_pack` schedules the run-time pack itself.

Schedule (rows = the row axis, tiled; batch axes fused into the parallel tile loop; symbolic sizes allowed):

    for tile in parallel(rows/mr x N/(nr*lanes)):      # one register tile per iteration
        acc[mr, nr*lanes] = 0                           # decomposed reduction init
        for k0 in K/kstep:
            for r in unroll(mr): for c in unroll(nr):
                acc[r, c*lanes:(c+1)*lanes] += dot(A[r, k0*kstep:], Wp[c, k0])   # tensorized
        out[tile] = epilogue(acc)                       # reverse_compute_at: no int32 tensor in memory

With a symbolic N (activation products such as Q·Kᵀ), or for an operand packed at run time a static N of static
rows that fills no whole tile (`_ragged_columns`: the same products in a model with static shapes), the epilogue
is instead padded to whole tiles and cropped afterwards (`_schedule_padded_epilogue`), so that no lane predicate
scalarizes it.

With k along the vector lanes (`intrinsics.NEON_K_LANES`, the Pi 4's kernel for dense and block-sparse constant
weights) every output accumulates 4 int32 partial sums: the reduction is `rfactor`ed into a partial-sum block
(tensorized) and a write-back adding them once per tile (`addp`, `_add_partial_sums_at`). Its tiles are one
column block wide, so the parallel loop runs over row tiles and builds their activation rows once (zero padded,
or for a block-sparse weight the listed blocks of each list gathered contiguous: `_gather_at`), the column tiles
inside.

A conv's rows gathered from its input (`conv_as_matmul.ConvRows`, an implicit im2col) are built once per row tile
as well, for all its column tiles, each tap a contiguous vector copy of the input's channels (`_schedule_conv_rows`).

The int32 accumulator is the fused function's intermediate buffer; after `reverse_compute_at`
buffer compaction shrinks it to the `mr x nr*lanes` tile. Row tiles divide the (padded)
rows exactly, because TVM's tensorize rejects predicated blocks; the zero-padded activation
rows of a tile are built inside the tile (`compute_at`). Columns split exactly too: N is a multiple
of lanes (static, or padded by the run-time packing; a symbolic N gets nr = 1). The epilogue crops
the padded columns (a predicate outside the tensorized block). Any step that fails returns None so
the generic rule applies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from nativeq.compile._tvm import Analyzer, Schedule, cached_flags, s_tir, tirx
from nativeq.compile.schedules.conv_as_matmul import IM2COL_CHANNELS
from nativeq.compile.schedules.generic import block_dtype, find_block, loop_extent, split_off_guards
from nativeq.compile.schedules.intrinsics import DotIntrin, grouped_of, partial_sums_intrin, row_tile
from nativeq.compile.schedules.pack_activations import PACK_BLOCK
from nativeq.compile.schedules.pack_weights import (INT4_UNPACK_BLOCK, LISTED_GATHER_BLOCK, REDUCTION_BLOCK,
                                                    ROWS_CROP_BLOCK, ROWS_PAD_BLOCK, packed_intrin)
from nativeq.compile.schedules.weight_formats import TILE_LIST_DTYPE
from nativeq.compile.tir_rewrite import rewrite_stmt

logger = logging.getLogger(__name__)

LISTED_TILES = "nativeq_listed_tiles"  # reduction block annotation: the weight is block-sparse (a tile list)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)



@dataclass(frozen=True)
class TileKnobs:
    """The tunable choices of the int8 matmul schedule (static N; `nativeq tune` searches them).

    mr: rows of the register tile; divides the row tile the packing pass padded the rows to
        (`intrinsics.row_tile`), so the split stays exact (TVM's tensorize rejects the
        predicate a row tail would need).
    nr: column blocks (of `lanes` columns) of the register tile; divides N/lanes.

    (The parallel loop order is not a knob: column panels outside row tiles measured well on a
    kernel alone but 1.2-1.5x slower in the encoder, the two threads writing the two halves of
    the same output rows.)
    """

    mr: int
    nr: int

    def as_text(self) -> str:
        return f"mr={self.mr},nr={self.nr}"

    @classmethod
    def from_text(cls, text: str) -> "TileKnobs":
        fields = dict(item.split("=") for item in text.split(","))
        return cls(mr=int(fields["mr"]), nr=int(fields["nr"]))


def register_tile(n_blocks: int, intrin: DotIntrin) -> TileKnobs:
    """The default (untuned) tile for `n_blocks` = N/lanes: the packing's row tile x up to `intrin.cols` (4) column
    blocks. `intrin`: the kernel's (`kernel_intrin`)."""
    return TileKnobs(row_tile(intrin), _largest_divisor_at_most(n_blocks, intrin.cols))


def tile_choices(n_blocks: int, intrin: DotIntrin) -> list[TileKnobs]:
    """Every tile the tuner may pick for N/lanes = `n_blocks` with the kernel's `intrin` (`kernel_intrin`):
    accumulators within the default's register budget (row tile x `intrin.cols`) and at least a quarter of
    it; the default first.
    (The weight operand needs no register of its own: the dot instructions read it from memory.)"""
    budget = row_tile(intrin) * intrin.cols
    default = register_tile(n_blocks, intrin)
    choices = [default]
    for mr in _divisors(row_tile(intrin)):
        for nr in _divisors(n_blocks):
            knobs = TileKnobs(mr, nr)
            if budget // 4 <= mr * nr <= budget and knobs != default:
                choices.append(knobs)
    return choices


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def accumulator_dtype(func) -> str | None:
    """"int32" / "float32": what the packed matmul in `func` accumulates (which intrinsic it was packed for);
    None when `func` holds no packed matmul."""
    return block_dtype(func, REDUCTION_BLOCK)


def is_int8_matmul(func) -> bool:
    """Whether `func` holds the reduction block of a packed int8 matmul."""
    return accumulator_dtype(func) == "int32"


def is_float_matmul(func) -> bool:
    """Whether `func` holds the reduction block of a packed float32 matmul (the multiply-add intrinsic)."""
    return accumulator_dtype(func) == "float32"


def schedule_int8_matmul(func, intrin: DotIntrin, knobs: TileKnobs | None = None) -> Schedule | None:
    """The tensorized schedule of an `nativeq.int8_matmul` PrimFunc, or None if it does not apply.

    `knobs` (from a tuning database) pick the register tile; None: the default tile.
    Knobs that do not fit this kernel's N are ignored.
    """
    if accumulator_dtype(func) != intrin.acc_dtype:
        return None
    return apply_int8_matmul(_schedule_of(without_tile_list_reads(func)), intrin, knobs)


def _schedule_of(func) -> Schedule:
    """A Schedule of `func`; without TVM's checks when the only property they fail to prove is the row crop's cover.

    NOTE: the rows are padded to ceil(R / mr) * mr and cropped back to R (`ROWS_CROP_BLOCK`), which covers the crop
    by construction. TVM's initial region-cover analysis cannot prove it when the symbolic R has a constant factor
    sharing a divisor with mr (the T/2 x 40 rows of a 2-D conv's matmul), so the whole function would count as no
    stage pipeline and every compute-at / reverse-compute-at would be refused: the kernel fell to the generic path.
    The same analysis proves it once the rows are split (after `decompose_reduction`)."""
    sch = Schedule(func)
    root = sch.get_sblock("root")
    if cached_flags(sch, root).stage_pipeline:
        return sch
    uncovered = [sch.get(b).name_hint for b in sch.get_child_blocks(root) if not cached_flags(sch, b).region_cover]
    return Schedule(func, enable_check=False) if uncovered == [ROWS_CROP_BLOCK] else sch


def without_tile_list_reads(func):
    """`func` with the tile list of a block-sparse weight (`weight_formats.py`) dropped from the matmul
    block's declared reads.

    The list is a constant the kernel only reads (as the activation's offset), so no dependence goes
    through it; but as a third operand of the dot-product block it would keep the block from matching
    the tensor intrinsic, whose reads are the accumulator, the activation and the weight tile.
    """
    def drop_list_reads(stmt):
        if isinstance(stmt, s_tir.SBlock) and stmt.name_hint == REDUCTION_BLOCK:
            reads = [r for r in stmt.reads if not _is_tile_list(r.source)]
            if len(reads) == len(stmt.reads):
                return stmt
            annotations = {**stmt.annotations, LISTED_TILES: 1}  # dropped, but `_grouped_dot` needs to know
            return s_tir.SBlock(stmt.iter_vars, reads, stmt.writes, stmt.name_hint, stmt.body, stmt.init,
                                stmt.alloc_buffers, stmt.match_buffers, annotations)
        return stmt

    return func.with_body(rewrite_stmt(func.body, drop_list_reads))


def _is_tile_list(buffer) -> bool:
    return len(buffer.shape) == 2 and str(buffer.dtype) == TILE_LIST_DTYPE


def apply_int8_matmul(sch: Schedule, intrin: DotIntrin, knobs: TileKnobs | None = None) -> Schedule | None:
    """`schedule_int8_matmul` on an existing Schedule (MetaSchedule's design space): the scheduled
    Schedule, or None if it does not apply."""
    try:
        return _schedule(sch, intrin, knobs)
    except (s_tir.ScheduleError, RuntimeError, ValueError, TypeError) as err:
        logger.debug("int8 matmul schedule does not apply: %s", err)
        return None


def kernel_intrin(func, intrin: DotIntrin) -> DotIntrin:
    """The intrinsic the dot products of int8 matmul `func` (a PrimFunc or its Schedule) use with the target's
    `intrin`: the twin its weights were packed for (`pack_weights.packed_intrin`), in its grouped form when the
    kernel allows it (`_grouped_dot`). Its tile budget is what `register_tile` and `tile_choices` need."""
    sch = func if isinstance(func, Schedule) else Schedule(func)
    *_, k = sch.get_loops(sch.get_sblock(REDUCTION_BLOCK))
    return _grouped_dot(sch, packed_intrin(sch, intrin), loop_extent(sch, k))


def int8_matmul_n_blocks(func, intrin: DotIntrin) -> int | None:
    """N/lanes of an int8 matmul PrimFunc with a static N (what `tile_choices` needs), else None."""
    sch = Schedule(func)
    *_, j, _ = sch.get_loops(sch.get_sblock(REDUCTION_BLOCK))
    n = loop_extent(sch, j)
    return None if n is None or n % intrin.lanes else n // intrin.lanes


def _schedule(sch: Schedule, intrin: DotIntrin, knobs: TileKnobs | None = None) -> Schedule | None:
    intrin = packed_intrin(sch, intrin)
    lanes, kstep = intrin.lanes, intrin.kstep
    matmul = sch.get_sblock(REDUCTION_BLOCK)
    *row_loops, j, k = sch.get_loops(matmul)
    # the packed operand: [N/lanes, K/kstep, lanes, kstep] (a constant weight) or, packed at run time
    # (`pack_activations.py`), the same with batch dims in front (those of the rows or fewer, which broadcast)
    packed = [r.source for r in sch.get(matmul).reads
              if 4 <= len(r.source.shape) <= len(row_loops) + 3 and _static_dims(r.source.shape[-2:]) == [lanes, kstep]]
    if len(packed) != 1:
        return None  # packed for another intrinsic (or ambiguous)
    # N and K: static, or symbolic and padded to whole tiles (the run-time packing pads them)
    n_extent, k_extent = sch.get(j).extent, sch.get(k).extent
    if not _divisible(n_extent, lanes) or not _divisible(k_extent, kstep):
        return None
    n, kdim = loop_extent(sch, j), loop_extent(sch, k)
    dot = _grouped_dot(sch, intrin, kdim)
    partial_sums = None  # the block adding each output's partial sums (k along the lanes)
    if dot.partial_sums > 1:
        _inline_scalars(sch, matmul)
        partial_sums = matmul
        matmul, k_outer, k_inner = _partial_sums_rfactor(sch, matmul, dot)
        *row_loops, j, _ = sch.get_loops(matmul)[:-len(k_inner)]

    # Side inputs of the epilogue that FuseOps computed as blocks of their own ahead of the matmul
    # (a residual's dequantize, a transposed operand): inlined into their epilogue consumer, so the
    # tile loop reads them per tile instead of the kernel materializing them in a serial loop nest.
    _inline_epilogue_inputs(sch, matmul)

    # Epilogue: inline every block after the matmul into the last one (requantize chains, GELU
    # diamonds), keep that one for reverse_compute_at.
    result = matmul if partial_sums is None else partial_sums  # the block writing the int32 matmul result
    epilogue = _blocks_after(sch, result)
    if not epilogue:
        # the matmul writes the function's output (no epilogue, no crop): accumulate in a buffer of the
        # kernel's own, which the tile loop copies out, so that the register tile can live on the stack
        sch.cache_write(result, 0, "global")
        epilogue = _blocks_after(sch, result)
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None
    # NOTE: a ragged static N only for an operand packed at run time (with its batch dims: Q·Kᵀ, P·V): a constant
    # weight's tiles measured faster in the fused row x column tile loop (static MobileNetV3 1.05x padded)
    run_time_packed = len(packed[0].shape) > 4
    if last is not None and (n is None or run_time_packed and _ragged_columns(sch, last, lanes)):
        padded = _schedule_padded_epilogue(sch, intrin, sch.get(last).name_hint, kdim, dot)
        if padded is not None:
            return padded

    # Only the rows axis is tiled: it is padded to a multiple of mr per batch entry, so the split
    # is exact even when the batch is symbolic too (fusing batch x rows first would not be).
    *batch_loops, rows = row_loops
    if n is None:
        knobs = TileKnobs(row_tile(dot), 1)
    elif knobs is None or knobs not in tile_choices(n // lanes, dot):
        knobs = register_tile(n // lanes, dot)
    gather = find_block(sch, LISTED_GATHER_BLOCK)
    blocks_per_list = _columns_per_list(sch, gather, n, lanes) if gather is not None else None
    if blocks_per_list is not None and blocks_per_list % knobs.nr:
        knobs = register_tile(n // lanes, dot)  # a column tile within one list's columns
    row_outer, row_inner = sch.split(rows, factors=[None, knobs.mr])
    col_outer, col_block, col_lane = sch.split(j, factors=[None, knobs.nr, lanes])
    if partial_sums is None:
        k_outer, k_inner = sch.split(k, factors=[None, kstep * dot.groups])
        k_inner = [k_inner]
    sch.reorder(*batch_loops, row_outer, col_outer, k_outer, row_inner, col_block, col_lane, *k_inner)
    # NOTE: a symbolic batch stays a serial loop around the parallel tiles: fused with symbolic rows, the
    # tile index divides by a product of two symbolic extents, which tensorize's blockize cannot invert.
    parallel_batch = batch_loops if all(isinstance(sch.get(loop).extent, tirx.IntImm) for loop in batch_loops) else []
    pad = find_block(sch, ROWS_PAD_BLOCK)
    if (kdim is None or lanes == 4 or _gathers_conv_rows(sch, pad)) and pad is not None or partial_sums is not None:
        # zero-padded activation rows (of a run-time K: P·V, K = T, N = a head's width; on NEON of any K) and
        # a kernel with k along the lanes (one column block per tile): the rows built once per row tile, for all
        # its column tiles (a serial loop). NOTE: on NEON a copy per tile was a `memcpy` call per 6 x 8 tile (zoo
        # Conformer, Pi 5: 46.5 -> 42.7 M instructions once per row tile); on x86, with a static K, the fused
        # row x column tile loop measured faster.
        # NOTE: row tiles outermost, the static batch (heads) inside: the fused index then splits by a static
        # extent, and the tile's accumulator region is a constant offset from it (batch outermost, it divides
        # by the symbolic row-tile count, the accumulator's index stays a run-time offset, and LLVM keeps the
        # tile in memory, one load and one store per multiply-add).
        # NOTE: a conv's rows gathered from its input (an implicit im2col) are built once per row tile on x86
        # too: per column tile, ECAPA-TDNN's 512-channel convs gathered each row 8 times (1.11x its time).
        if parallel_batch:
            sch.reorder(row_outer, *parallel_batch)
        rows_at = sch.fuse(row_outer, *parallel_batch) if parallel_batch else row_outer
        sch.parallel(rows_at)
        tile = col_outer
        if gather is not None:
            # the row tile's activations at the listed blocks of one list, gathered before its column tiles
            band, tile = sch.split(col_outer, factors=[None, blocks_per_list // knobs.nr])
            _gather_at(sch, gather, band)
    else:
        tile = rows_at = sch.fuse(*parallel_batch, row_outer, col_outer)
        sch.parallel(tile)

    init = sch.decompose_reduction(matmul, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    if partial_sums is not None:
        _add_partial_sums_at(sch, partial_sums, tile, dot)
    if last is not None:
        # NOTE: before tensorize: reverse_compute_at after it trips over the replaced inner block.
        sch.reverse_compute_at(last, tile)
        _vectorize_epilogue_columns(sch, last, tile, lanes)
        _column_inputs_on_stack(sch, last, tile)
    # a 4-bit weight: the register tile's k-step of weights unpacked right before its dot products
    unpack = _unpack_int4_at(sch, k_outer)
    # the tile's zero-padded activation rows, built right before the tile needs them
    _tensorize_tile(sch, dot, col_lane, init, rows_at=rows_at, kdim=kdim)
    if unpack is not None:
        sch.set_scope(unpack, 0, "local")
    if gather is not None:
        sch.set_scope(gather, 0, "local")
    sch.unroll(row_inner)
    sch.unroll(col_block)
    return sch


def _inline_scalars(sch: Schedule, matmul) -> None:
    """Inline the blocks of the kernel that compute one scalar (no loops) and that the matmul does not read: a
    run-time zero point's int32 value and its shift to int8 (`quantize_dynamic`'s activations on a kernel with int8
    activations), consumed by the epilogue. NOTE: TVM's rfactor fails an internal check on a function holding a
    block without loops (`block_realize == old_block_realize_`), which left such kernels on the generic path."""
    reads = {r.source.name for r in sch.get(matmul).reads}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if not sch.get_loops(block) and not any(w.source.name in reads for w in stmt.writes):
            sch.compute_inline(block)


def _partial_sums_rfactor(sch: Schedule, matmul, dot: DotIntrin):
    """Split the reduction of `matmul` for a kernel with k along the lanes, k = k_outer * kstep + half * kstep/2 +
    2 * partial + pair (`intrinsics._k_lanes_desc`), and `rfactor` it over `partial`: a block accumulating
    `dot.partial_sums` partial sums per output ([..., rows, N, partial_sums]) in the loops of `matmul`, and
    `matmul` left adding them. Returns the partial-sum block, its k_outer loop and its [half, partial, pair] loops."""
    *_, k = sch.get_loops(matmul)
    k_outer, half, partial, pair = sch.split(k, factors=[None, 2, dot.partial_sums, 2])
    ndim = len(sch.get(matmul).writes[0].source.shape)
    sums = sch.rfactor(partial, factor_axis=ndim)
    *_, k_outer, half, partial, pair = sch.get_loops(sums)
    return sums, k_outer, [half, partial, pair]


def _columns_per_list(sch: Schedule, gather, n: int, lanes: int) -> int:
    """Column blocks (of `lanes`) that share one list of a block-sparse weight with a listed-block gather."""
    n_lists = int(sch.get(gather).writes[0].source.shape[-2])
    return n // lanes // n_lists


def _gather_at(sch: Schedule, gather, loop) -> None:
    """Compute the listed-block gather (`pack_weights.LISTED_GATHER_BLOCK`: the rows of a tile at one list's
    blocks, contiguous) at `loop`, a listed block (4 bytes) per copy. (The stack scope comes after tensorize, whose
    intrinsic matches global buffers.)"""
    sch.compute_at(gather, loop)
    loops = sch.get_loops(gather)
    *rows, k = loops[[sch.get(outer) for outer in loops].index(sch.get(loop)) + 1:]  # no rows loop for one row
    listed, unit = sch.split(k, factors=[None, _gather_unit(sch, gather)])
    sch.reorder(listed, *rows, unit)  # each list entry read once for the tile's rows
    sch.vectorize(unit)


def _gather_unit(sch: Schedule, gather) -> int:
    """Inputs per listed block of a gather: the gathered row's length over the list's."""
    block = sch.get(gather)
    lists = next(r.source for r in block.reads if _is_tile_list(r.source))
    return int(block.writes[0].source.shape[-1]) // int(lists.shape[-1])


def _add_partial_sums_at(sch: Schedule, block, tile, dot: DotIntrin) -> None:
    """The write-back block of `rfactor` (each output the sum of its partial sums) computed per register tile, after
    its dot products, into a tile buffer on the stack; tensorized (`intrinsics.partial_sums_intrin`) per `lanes`
    outputs."""
    sch.reverse_compute_at(block, tile)
    _tensorize_partial_sums(sch, block, tile, dot)


def _tensorize_partial_sums(sch: Schedule, block, tile, dot: DotIntrin) -> None:
    """Tensorize the write-back block of `rfactor`, computed under loop `tile`, per `lanes` outputs; its tile buffer
    on the stack."""
    # NOTE: `rfactor` puts the partial-sum axis first: the loops under the tile are (partial, [rows,] cols), rows
    # (and unit batch dims) absent where the tile has one
    loops = sch.get_loops(block)
    partial, *rows, cols = loops[[sch.get(loop) for loop in loops].index(sch.get(tile)) + 1:]
    col_block, col_lane = sch.split(cols, factors=[None, dot.lanes])
    sch.reorder(*rows, col_block, col_lane, partial)
    init = sch.decompose_reduction(block, col_lane)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(col_lane, partial_sums_intrin(dot))
    sch.set_scope(init, 0, "local")


def _grouped_dot(sch: Schedule, intrin: DotIntrin, kdim: int | None) -> DotIntrin:
    """The intrinsic the register tile's dot products use: `intrin`'s grouped form (several k-steps per call,
    `intrinsics.grouped_of`) when the static K divides into at least `min_trips` of its groups and the
    weight is dense (a block-sparse weight's listed tiles are not consecutive k-steps), else `intrin`."""
    grouped = grouped_of(intrin)
    if grouped is None or kdim is None or kdim % (grouped.kstep * grouped.groups):
        return intrin
    if kdim // (grouped.kstep * grouped.groups) < grouped.min_trips:
        return intrin
    block = sch.get(sch.get_sblock(REDUCTION_BLOCK))
    listed = LISTED_TILES in block.annotations or any(_is_tile_list(r.source) for r in block.reads)
    return intrin if listed else grouped


def _column_inputs_on_stack(sch: Schedule, last, tile) -> None:
    """Copy the epilogue's per-column inputs (scales, zero points, bounds: [..., N] with unit leading dims) for the
    tile's columns onto the stack once per tile, before its rows read them.

    NOTE: read in place, LLVM reloads them for every row of the tile: it cannot prove that the output stores
    between the rows leave them unchanged (on NEON 7 loads per 8 outputs of a per-channel requantize; x86 folds
    them into its instructions' memory operands, where the copy measured neutral). On the stack they stay in
    registers across the rows."""
    for index, region in enumerate(list(sch.get(last).reads)):
        shape = region.source.shape
        if len(shape) < 1 or not all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in shape[:-1]):
            continue
        if isinstance(shape[-1], tirx.IntImm) and int(shape[-1]) == 1:
            continue
        last_extent = region.region[-1].extent
        if not isinstance(last_extent, tirx.IntImm) or int(last_extent) != 1:
            continue  # read at any index (a lookup table), not at the block's column
        copy = sch.cache_read(last, index, "local")
        sch.compute_at(copy, tile)
        loops = sch.get_loops(copy)
        if not sch.get(loops[-1]).same_as(sch.get(tile)):  # a tile of one column has no loop of its own
            sch.vectorize(loops[-1])


def _unpack_int4_at(sch: Schedule, loop):
    """Compute the 4-bit weight unpacking (`pack_weights.INT4_UNPACK_BLOCK`), if the kernel has one, at `loop`
    (one k-step of the register tile: `nr` vectors), vectorized; returns its block or None."""
    unpack = find_block(sch, INT4_UNPACK_BLOCK)
    if unpack is None:
        return None
    sch.compute_at(unpack, loop)
    *_, lane, step = sch.get_loops(unpack)
    sch.vectorize(sch.fuse(lane, step))
    return unpack


def _inline_epilogue_inputs(sch: Schedule, matmul) -> None:
    """Inline every block before the matmul that the matmul does not read (directly or through the
    zero-padded rows): elementwise producers of epilogue side inputs. Raises if one cannot be inlined."""
    operand_blocks = {ROWS_PAD_BLOCK}
    operand_buffers = {r.source.name for r in sch.get(matmul).reads}
    pad = find_block(sch, ROWS_PAD_BLOCK)
    if pad is not None:
        operand_buffers |= {r.source.name for r in sch.get(pad).reads}
    for block in reversed(_blocks_before(sch, matmul)):
        stmt = sch.get(block)
        if stmt.name_hint in operand_blocks or any(w.source.name in operand_buffers for w in stmt.writes):
            continue
        sch.compute_inline(block)


def _ragged_columns(sch: Schedule, last, lanes: int) -> bool:
    """Whether epilogue block `last` is static with a column count that is no multiple of `lanes` (N padded by the
    packing, e.g. Q·Kᵀ of a static-length model at T = 200, N = 200): the lane predicate of its last column tile
    scalarized every tile's epilogue (that Q·Kᵀ 0.31 ms per call; padded 0.10-0.14 ms, as with a symbolic T).
    NOTE: static rows only: with symbolic rows and a static N `pad_einsum`'s padded epilogue fails TVM's lowering
    (int32 vs int64 extents)."""
    extents = [loop_extent(sch, loop) for loop in sch.get_loops(last)]
    return None not in extents and extents[-1] % lanes != 0


def _schedule_padded_epilogue(sch: Schedule, intrin: DotIntrin, last_name: str, kdim: int | None,
                              dot: DotIntrin | None = None) -> Schedule | None:
    """The schedule for a symbolic or ragged N: the epilogue on whole register tiles, then a crop; None if it does not
    apply.

    With N symbolic the tile's epilogue would carry a `col < N` predicate on its vector lanes, which
    TVM scalarizes (Q·Kᵀ of the benchmark encoder at T=1000: 0.73 ms, against 0.21 ms for P·V).
    `pad_einsum` pads the epilogue's domain to whole tiles (rows to mr, columns to lanes, as the
    accumulator already is): per-row/per-column inputs get zero-padded copies, a plain copy crops the
    result. The tile loop then runs over the padded epilogue and computes its matmul tile in place:

        for row_block in parallel(rows_pad/mr):
            A_tile = the block's rows (zero padded)
            for column_tile in N_pad/lanes:
                row/column inputs of the tile (padded copies); acc[mr, lanes] = A_tile . Wp_tile   # tensorized
                out_pad[tile] = epilogue(acc)                                                       # vectorized
        out = out_pad[:rows, :N]                                                                # crop
    """
    lanes, kstep, mr = intrin.lanes, intrin.kstep, row_tile(intrin)
    sch = sch.copy()
    try:
        last = sch.get_sblock(last_name)
        ndim = len(sch.get(last).writes[0].source.shape)
        if ndim < 2:
            return None
        sch.pad_einsum(last, [1] * (ndim - 2) + [mr, lanes])
        accumulator_copy = find_block(sch, REDUCTION_BLOCK + "_pad")
        if accumulator_copy is not None:
            sch.compute_inline(accumulator_copy)
        matmul = sch.get_sblock(REDUCTION_BLOCK)
        last = sch.get_sblock(last_name)
        *after, crop = _blocks_after(sch, matmul)
        inputs = [b for b in after if sch.get(b).name_hint != last_name]
        *crop_outer, _ = sch.get_loops(crop)
        if crop_outer:
            sch.parallel(sch.fuse(*crop_outer))

        *batch, rows, cols = sch.get_loops(last)
        row_outer, row_inner = sch.split(rows, factors=[None, mr])
        col_outer, col_lane = sch.split(cols, factors=[None, lanes])
        sch.reorder(*batch, row_outer, col_outer, row_inner, col_lane)
        # NOTE: column tiles stay a serial inner loop: splitting a fused index over symbolic extents
        # costs 64-bit divisions per iteration, more than a short (K = head size) tile's dot products.
        row_block = sch.fuse(*batch, row_outer)
        sch.parallel(row_block)
        sch.vectorize(col_lane)
        # NOTE: the epilogue reads the accumulator tile row by row: unrolled, its rows are registers; a loop left to
        # LLVM stays a loop when the epilogue is long (two requantizes around a residual add), and the tile is then
        # stored to the stack and reloaded at run-time indices.
        sch.unroll(row_inner)
        for block in inputs:
            sch.compute_at(block, col_outer)
            *_, input_lanes = sch.get_loops(block)
            if loop_extent(sch, input_lanes) == lanes:  # a tile-shaped input (a residual, the scores' bias):
                sch.vectorize(input_lanes)  # its zero-padded copy is guarded per column: a guard-free loop
                split_off_guards(sch, col_outer)  # for the whole column tiles (the guard scalarizes the vector)
        sch.compute_at(matmul, col_outer)
        partial_sums = None
        if dot is not None and dot.partial_sums > 1:  # k along the lanes: the partial sums, then their write-back
            partial_sums, matmul = matmul, sch.get_sblock(REDUCTION_BLOCK + "_rf")
            sch.compute_at(matmul, col_outer)
            loops = sch.get_loops(matmul)
            # NOTE: `rfactor` puts the partial-sum axis first: (partial, [rows,] cols, k_outer, half, pair)
            partial, *m_rows, m_cols, k_outer, half, pair = loops[[sch.get(x) for x in loops].index(sch.get(col_outer)) + 1:]
            k_inner = [half, partial, pair]
        else:
            *_, m_rows, m_cols, k = sch.get_loops(matmul)
            m_rows = [m_rows]
            k_outer, k_inner = sch.split(k, factors=[None, kstep])
            k_inner = [k_inner]
        sch.reorder(k_outer, *m_rows, m_cols, *k_inner)
        init = sch.decompose_reduction(matmul, k_outer)
        sch.vectorize(sch.get_loops(init)[-1])
        if partial_sums is not None:
            _tensorize_partial_sums(sch, partial_sums, col_outer, dot)
        # the padded activation rows once per row block, for all its column tiles
        _tensorize_tile(sch, dot or intrin, m_cols, init, rows_at=row_block, kdim=kdim)
        for loop in m_rows:
            sch.unroll(loop)
    except (s_tir.ScheduleError, RuntimeError, ValueError, TypeError) as err:
        logger.debug("padded epilogue schedule does not apply: %s", err)
        return None
    return sch


def _gathers_conv_rows(sch: Schedule, pad) -> bool:
    """Whether rows block `pad` gathers a conv's rows from its input (`conv_as_matmul.ConvRows`)."""
    return pad is not None and IM2COL_CHANNELS in sch.get(pad).annotations


# NOTE: unrolled, a tile's taps (and rows) compute their input positions and border checks from constants: fewer
# instructions than the im2col kernel and the copy of its rows (the zoo's ResNet, Pi 5: 8.59 -> 8.36 M; looped,
# 9.14 M) and 0.87-0.95x the looped gather's time on x86
MAX_UNROLLED_TAPS = 16
MAX_UNROLLED_COPIES = 64


def _schedule_conv_rows(sch: Schedule, pad, loops) -> None:
    """Schedule rows block `pad` gathering a conv's rows (`loops`: its [rows,] K loops under the row tile): per tap a
    contiguous vector copy of the input's channels. The split by C lets TVM prove the vector's index (tap * C + c) % C
    a ramp (a 16-byte vector of 48 channels split from K directly was a gather)."""
    *rows, k = loops
    channels = int(sch.get(pad).annotations[IM2COL_CHANNELS])
    tap_loop, channel_loop = sch.split(k, factors=[None, channels])
    sch.vectorize(sch.split(channel_loop, factors=[None, _pad_vector_width(channels)])[1])
    taps = loop_extent(sch, tap_loop)
    if taps is None or taps > MAX_UNROLLED_TAPS:
        return
    sch.unroll(tap_loop)
    row_extents = [loop_extent(sch, loop) for loop in rows]
    if None not in row_extents and taps * math.prod(row_extents) <= MAX_UNROLLED_COPIES:
        for loop in rows:
            sch.unroll(loop)


def _tensorize_tile(sch: Schedule, intrin: DotIntrin, lane_loop, init, rows_at, kdim: int | None) -> None:
    """Build the zero-padded activation rows at loop `rows_at` (vectorized copy), tensorize the dot
    products at `lane_loop`, and keep the accumulator (and, for a static K, the rows) on the stack."""
    pad = find_block(sch, ROWS_PAD_BLOCK)
    if pad is not None:
        sch.compute_at(pad, rows_at)
        pad_loops = sch.get_loops(pad)
        # NOTE: the vector width divides K: a lane predicate (K % width != 0) scalarizes the copy.
        if _gathers_conv_rows(sch, pad):
            _schedule_conv_rows(sch, pad, pad_loops[[sch.get(loop) for loop in pad_loops].index(sch.get(rows_at)) + 1:])
        elif kdim is not None:
            sch.vectorize(sch.split(pad_loops[-1], factors=[None, _pad_vector_width(kdim)])[1])
        elif intrin.lanes == 4:  # 128-bit vectors (NEON): no masked stores, the guarded copy went byte by byte
            # NOTE: x86 copies the guarded loop with masked vectors; split there, attention at T = 1000 ran 17% slower
            split_off_guards(sch, pad_loops[-1])
        # NOTE: a run-time K is not split by a vector width: its tail would need a lane predicate (TVM then
        # scalarizes the copy), or a k-step wide split (4 bytes, a gather per vector with the clamped
        # read); LLVM's loop vectorizer vectorizes the loop (x86: masked; NEON: its guard-free part).
    sch.tensorize(lane_loop, intrin.name)
    # NOTE: the tile accumulator and the padded activation rows on the stack ("local"; after
    # tensorize, whose intrinsic matches global buffers). As workspace buffers they may alias for
    # LLVM, which then stores the accumulator after every dot product instead of keeping it in
    # registers.
    sch.set_scope(init, 0, "local")
    if pad is not None and kdim is not None:  # a symbolic K: no fixed-size stack buffer
        sch.set_scope(pad, 0, "local")


def schedule_int8_pack(func) -> Schedule | None:
    """The schedule of a run-time activation pack (`pack_activations.py`) and its fused producers, or None.

    The producers (quantize chains, transposes) are inlined into the pack; the (lanes, kstep) tile of
    each packed block is one vector (a gather from the source), the blocks are parallel.
    """
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = Schedule(func)
    pack = find_block(sch, PACK_BLOCK)
    if pack is None:
        return None
    try:
        for block in _blocks_before(sch, pack):
            sch.compute_inline(block)
        if _blocks_after(sch, pack):
            return None
        *outer, lane, step = sch.get_loops(pack)
        sch.vectorize(sch.fuse(lane, step))
        if outer:
            sch.parallel(sch.fuse(*outer))
    except (s_tir.ScheduleError, RuntimeError, ValueError, TypeError) as err:
        logger.debug("int8 pack schedule does not apply: %s", err)
        return None
    return sch


def _pad_vector_width(kdim: int) -> int:
    """Bytes per vector of the padded-rows copy: the largest of 64/32/16/8/4 dividing K (K is a multiple of the k-step).
    NOTE: a width that does not divide K leaves a predicate on the vector loop, which TVM scalarizes."""
    return next(width for width in (64, 32, 16, 8, 4, 2, 1) if kdim % width == 0)


def _static_dims(shape) -> list[int | None]:
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in shape]


def _vectorize_epilogue_columns(sch: Schedule, epilogue, tile, lanes: int) -> None:
    """Vectorize the columns of the epilogue computed at `tile`, by `lanes`; a tile of fewer real columns (a
    one-output head: the unit loops of its single element are gone after `reverse_compute_at`) as they are."""
    loops = sch.get_loops(epilogue)
    own = loops[[sch.get(loop).same_as(sch.get(tile)) for loop in loops].index(True) + 1:]
    if not own:
        return
    extent = loop_extent(sch, own[-1])
    if extent is not None and extent <= lanes:
        if extent > 1:
            sch.vectorize(own[-1])
        return
    _, epi_lane = sch.split(own[-1], factors=[None, lanes])
    sch.vectorize(epi_lane)


def _divisible(extent, factor: int) -> bool:
    """Whether a loop extent, static or symbolic (e.g. `(T + 15) // 16 * 16`), is a multiple of `factor`."""
    if isinstance(extent, tirx.IntImm):
        return int(extent) % factor == 0
    return bool(Analyzer().can_prove(tirx.floormod(extent, factor) == 0))


def _blocks_before(sch: Schedule, block) -> list:
    """The blocks that precede `block` under the root, in program order."""
    children = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in children]
    return children[:names.index(sch.get(block).name_hint)]


def _blocks_after(sch: Schedule, block) -> list:
    """The blocks that follow `block` under the root, in program order."""
    children = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in children]
    return children[names.index(sch.get(block).name_hint) + 1:]
