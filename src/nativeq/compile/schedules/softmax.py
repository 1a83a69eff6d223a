"""TIR schedule rule: MLAS-order softmax (from compile/passes/legalize_like_ort.py) + fused epilogue.

Pipeline position: `schedule_passes(target)`, after FuseOps/FuseTIR, before dlight's reduction
rule, for PrimFuncs holding the `mlas_softmax_lanes` block. Per row:

    maxima[l] = max over whole chunks of x[16c + l], vectorized over the 16 lanes; max = max of the
                lanes and of the partial last chunk's (one 16-lane gather per row)
    e[k]     = exp(x[k] - max), once per element, kept for the row
    lanes[l] = serial sum over whole chunks of e[16c + l], vectorized over the 16 lanes,
               then + the partial last chunk's lane (0 past the row's end)
    inverse  = 1 / (fixed pairwise sum of the lanes)
    out      = epilogue(e * inverse), vectorized along the row

with the outermost non-unit loop parallel. The per-lane sums stay serial in chunk order (that
makes the result bit-identical to ONNX Runtime), so the chunk loop is never split or
rfactored; dlight's reduction rule instead runs the 16 lanes one after another, each with
its own scalar exp (6.3 of 20 ms of the benchmark encoder at T=1000).
"""

from __future__ import annotations

import logging

from nativeq.compile._tvm import Schedule, s_tir, tirx
from nativeq.compile.passes.legalize_like_ort import (
    SOFTMAX_EXP_BLOCK,
    SOFTMAX_INVERSE_BLOCK,
    SOFTMAX_LANES_BLOCK,
    SOFTMAX_MAX_LANES_BLOCK,
    SOFTMAX_MAX_TAIL_BLOCK,
    SOFTMAX_SUM_TAIL_BLOCK,
)
from nativeq.compile.schedules.generic import has_block, loop_extent, split_off_guards

logger = logging.getLogger(__name__)

_ERRORS = (s_tir.ScheduleError, RuntimeError, ValueError, TypeError)


def is_mlas_softmax(func) -> bool:
    return has_block(func, SOFTMAX_LANES_BLOCK)


def schedule_softmax(func, vector_bits: int) -> Schedule | None:
    """The schedule above, or None when `func` is not an MLAS softmax or a step does not apply."""
    if not is_mlas_softmax(func):
        return None
    try:
        return _schedule(Schedule(func), vector_bits)
    except _ERRORS as err:
        logger.debug("softmax schedule does not apply: %s", err)
        return None



def _schedule(sch: Schedule, vector_bits: int) -> Schedule:
    root = sch.get_sblock("root")
    blocks = list(sch.get_child_blocks(root))
    names = [sch.get(b).name_hint for b in blocks]
    inverse_index = names.index(SOFTMAX_INVERSE_BLOCK)
    per_row = blocks[: inverse_index + 1]  # the lanes, the tail lanes, the max, the inverse sum
    tail = blocks[inverse_index + 1:]  # softmax, then the fused epilogue
    for block in tail[:-1]:
        sch.compute_inline(block)
    out = tail[-1]
    *outer, row = sch.get_loops(out)
    for block in reversed(per_row):
        sch.compute_at(block, outer[-1])
    lane_blocks = [sch.get_sblock(SOFTMAX_MAX_LANES_BLOCK), sch.get_sblock(SOFTMAX_LANES_BLOCK)]
    chunks = []
    for lane_block in lane_blocks:
        if _reduce_extent(sch, lane_block) == 1:  # compute_at left no chunk loop: the lanes are the last loop
            sch.vectorize(sch.get_loops(lane_block)[-1])
            continue
        *_, lane, chunk = sch.get_loops(lane_block)
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        chunks.append((lane_block, chunk))
    for name in (SOFTMAX_MAX_TAIL_BLOCK, SOFTMAX_SUM_TAIL_BLOCK):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    exp_row = sch.get_loops(sch.get_sblock(SOFTMAX_EXP_BLOCK))[-1]
    if loop_extent(sch, exp_row) is not None:
        sch.vectorize(sch.split(exp_row, factors=[None, max(2, vector_bits // 32)])[1])
    else:  # placed per row, a guarded loop: without the split, a scalar MLAS exp per element on NEON
        split_off_guards(sch, exp_row)
    if loop_extent(sch, row) is not None:
        _, vec = sch.split(row, factors=[None, max(2, vector_bits // 32)])
        sch.vectorize(vec)
    # NOTE: a symbolic row stays one plain loop: split, its tail would need a lane predicate, which TVM
    # scalarizes; unsplit, LLVM's loop vectorizer vectorizes it with a scalar remainder.
    sch.parallel(next((loop for loop in outer if loop_extent(sch, loop) != 1), outer[0]))
    # NOTE: last: vectorize/parallel need the lanes blocks whole (reduction blocks with their init).
    for lane_block, chunk in chunks:
        sch.decompose_reduction(lane_block, chunk)
    return sch


def _reduce_extent(sch, block) -> int | None:
    """The extent of `block`'s reduction (the chunks of a row), when static."""
    (extent,) = [iv.dom.extent for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return int(extent) if isinstance(extent, tirx.IntImm) else None
