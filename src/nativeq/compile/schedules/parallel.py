"""Which kernels are worth a parallel launch: small ones run on the calling thread.

Used by `default_schedule.py` after a rule scheduled a PrimFunc: a kernel whose work is known
(static shapes) and small keeps its schedule without the `parallel` loops, replayed from the
schedule's trace. A parallel region wakes TVM's worker threads and joins them: about 3-4 us on
the development machine (DS-CNN, 16 kernels, 2 threads: 0.143 ms a call against 0.090 ms on one
thread), more than a kernel of a few thousand vector instructions takes alone. Kernels with a
symbolic size (a time axis) stay parallel: their work grows with the input.

Work is counted in vector instructions: every block instance of the unscheduled function, divided
by the lanes one instruction covers (int8 dot products: vector bytes; anything else: 32-bit lanes).
"""

from __future__ import annotations

import logging

from nativeq.compile._tvm import Schedule, s_tir, tirx

logger = logging.getLogger(__name__)

# NOTE: a parallel launch costs ~3-4 us; below ~16k vector instructions (a few us of work) it does not pay.
MIN_PARALLEL_INSTRUCTIONS = 16384


def vector_instructions(func, vector_bits: int) -> int | None:
    """Estimated vector instructions of `func` (an unscheduled PrimFunc), or None if a size is symbolic."""
    sch = Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (s_tir.ScheduleError, RuntimeError, ValueError) as err:  # hand-written TIR (e.g. a recurrent loop)
        logger.debug("no work estimate: %s", err)
        return None
    total = 0
    result = _static_elements(sch.get(blocks[-1]).writes[0].source.shape) if blocks else None
    for block in blocks:
        stmt = sch.get(block)
        extents = [iv.dom.extent for iv in stmt.iter_vars]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        spatial = reduced = 1
        for iter_var, extent in zip(stmt.iter_vars, extents):
            if iter_var.iter_type == tirx.IterVar.CommReduce:
                reduced *= int(extent)
            else:
                spatial *= int(extent)
        int8_reduction = reduced > 1 and any(str(region.source.dtype) in ("int8", "uint8") for region in stmt.reads)
        if int8_reduction and result is not None and result < spatial:
            # NOTE: a matmul's rows and columns are padded to whole register tiles (a one-row head: 6 rows x 16
            # columns for 1 x 1); the kernel's result counts the outputs whose sums it needs.
            spatial = result
        lanes = vector_bits // 8 if int8_reduction else vector_bits // 32
        total += -(-(spatial * reduced) // lanes)
    return total


def _static_elements(shape) -> int | None:
    count = 1
    for dim in shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        count *= int(dim)
    return count


def worth_parallel(func, vector_bits: int) -> bool:
    work = vector_instructions(func, vector_bits)
    return work is None or work >= MIN_PARALLEL_INSTRUCTIONS


def without_parallel(sch: Schedule, func) -> Schedule:
    """`sch` replayed on `func` without its `parallel` instructions (`sch` itself if the replay fails)."""
    trace = sch.trace
    kept = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    if len(kept) == len(trace.insts):
        return sch
    serial = Schedule(func)
    try:
        s_tir.schedule.Trace(kept, {inst: d for inst, d in trace.decisions.items() if inst in kept}).apply_to_schedule(
            serial, remove_postproc=False)
    except (s_tir.ScheduleError, RuntimeError, ValueError, TypeError) as err:
        logger.debug("serial replay failed, keeping the parallel schedule: %s", err)
        return sch
    return serial
