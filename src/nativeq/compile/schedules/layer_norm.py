"""TIR schedule rule: ORT-order LayerNorm (from compile/passes/legalize_like_ort.py) + fused epilogue, row by row.

Pipeline position: `schedule_passes(target)`, after FuseOps/FuseTIR, beside the softmax rule and before dlight's
reduction rule, for PrimFuncs holding the `ln_sum_lanes` block (a row of static length n >= 8). Per row:

    sum_lanes[l] = float64 sum over whole chunks of x[8c + l], vectorized over the 8 lanes
    mean         = f32((fixed pairwise sum of the lanes + the tail) / n)
    lanes[l]     = MLAS's 8 FMA accumulators of the squared deviations, vectorized over the lanes
    inv_std      = 1 / sqrt(pairwise sum of the lanes (+ tail) / n + eps)
    out          = epilogue(fma((x - mean) * inv_std, scale, bias)), vectorized along the row

with the outermost non-unit row loop parallel. dlight's rule, which scheduled these before, ran the float64 sum
one element at a time (a third of the kernel's instructions on the Pi 5). The float64 sum is exact in any order
for the rows LayerNorms see (see `legalize_like_ort`), so summing it in lanes keeps the result ORT's.
"""

from __future__ import annotations

import logging

from nativeq.compile._tvm import Schedule, s_tir
from nativeq.compile.passes.legalize_like_ort import (LAYER_NORM_BLOCK, LAYER_NORM_LANES_BLOCK,
                                                      LAYER_NORM_SUM_LANES_BLOCK)
from nativeq.compile.schedules.generic import dividing_lanes, has_block, loop_extent

logger = logging.getLogger(__name__)

_ERRORS = (s_tir.ScheduleError, RuntimeError, ValueError, TypeError)
ROW_LANES = 16  # the normalize + epilogue loop's vector: 4 NEON registers per step, independent, loop overhead amortized


def schedule_layer_norm(func, vector_bits: int) -> Schedule | None:
    """The schedule above, or None when `func` is not such a LayerNorm or a step does not apply."""
    if not has_block(func, LAYER_NORM_SUM_LANES_BLOCK):
        return None
    try:
        return _schedule(Schedule(func), vector_bits)
    except _ERRORS as err:
        logger.debug("layer norm schedule does not apply: %s", err)
        return None



def _schedule(sch: Schedule, vector_bits: int) -> Schedule:
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    norm_index = names.index(LAYER_NORM_BLOCK)
    per_row, tail = blocks[:norm_index], blocks[norm_index:]  # the row statistics; the normalize and its epilogue
    for block in tail[:-1]:
        sch.compute_inline(block)
    out = tail[-1]
    row_rank = len(sch.get(sch.get_sblock(LAYER_NORM_SUM_LANES_BLOCK)).iter_vars) - 2  # outer dims + lane + chunk
    loops = sch.get_loops(out)
    outer, row = loops[:row_rank], loops[row_rank:]
    for block in reversed(per_row):
        sch.compute_at(block, outer[-1])
    sum_lanes = sch.get_sblock(LAYER_NORM_SUM_LANES_BLOCK)
    *_, lane, chunk = sch.get_loops(sum_lanes)
    sch.reorder(chunk, lane)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(sch.get_sblock(LAYER_NORM_LANES_BLOCK))[-1])
    row = sch.fuse(*row) if len(row) > 1 else row[0]
    lanes = dividing_lanes(loop_extent(sch, row), max(ROW_LANES, vector_bits // 32)) if loop_extent(sch, row) else None
    if lanes is not None:
        sch.vectorize(sch.split(row, factors=[None, lanes])[1])
    sch.parallel(next((loop for loop in outer if loop_extent(sch, loop) != 1), outer[0]))
    # NOTE: last: vectorize/parallel need the lanes block whole (a reduction block with its init).
    sch.decompose_reduction(sum_lanes, chunk)
    return sch
