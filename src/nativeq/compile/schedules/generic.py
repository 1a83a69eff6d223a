"""TIR schedule rule: a safe default CPU schedule for any PrimFunc (parallel outer loops, vector inner loops).

Pipeline position: `schedule_passes(target)`, after FuseOps/FuseTIR, as the last rule, after
the int8 matmul rule (`matmul.py`) and dlight's CPU reduction rule (softmax, layer norm).
TVM's unscheduled CPU code is a single-threaded scalar loop nest; this rule gives every
other PrimFunc (elementwise chains, transposes, float matmuls, convolutions, int8 matmuls
the int8 rule could not take) the basic shape of a CPU kernel:

- non-output elementwise blocks are inlined into their consumers;
- elementwise blocks: all but the innermost loop fused and parallel, the innermost split by
  the vector width and vectorized (in pieces where a concat or pad selects along it);
- reduction blocks (`S...S R...R`): the innermost spatial loop is moved below the reduction
  loops and vectorized (a float matmul becomes rows x vector-of-columns FMAs), the other
  spatial loops fused and parallel, the reduction init decomposed out; a reduction along the
  rows it reads (a sum over time, channels first) sums each row in vector partial sums instead, and one with a
  single output axis that its reads are contiguous along (a sum over time, channels last) sums vectors of outputs;
- elementwise loops on a 128-bit target (NEON) step over 4 registers.

Every transformation is tried per block; one that TVM refuses leaves that block as it was,
so the function always stays correct.
"""

from __future__ import annotations

import logging
import math

from nativeq.compile._tvm import Analyzer, Schedule, detect_linear_equation, s_tir, tirx, tvm
from nativeq.compile.tir_rewrite import expr_nodes

logger = logging.getLogger(__name__)

_ERRORS = (s_tir.ScheduleError, RuntimeError, ValueError)


def loop_extent(sch: Schedule, loop) -> int | None:
    """A loop's extent when static, else None."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _block_dtype_bits(sch: Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if len(writes) else 32


def _iter_kinds(sch: Schedule, block) -> str:
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def _is_perfect_nest(sch: Schedule, block) -> bool:
    """The block's loops map one to one, in order, onto its iteration variables."""
    loops = sch.get_loops(block)
    realize_bindings = sch.get_sref(block).stmt.iter_vars
    return len(loops) == len(realize_bindings) and len(loops) > 0


def inline_elementwise(sch: Schedule) -> None:
    """Inline every non-output spatial block into its consumers (producers first)."""
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)} if root is not None else set()
    for block in blocks:
        if sch.get(block).name_hint in outputs or "R" in _iter_kinds(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except _ERRORS:
            pass


def _has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except _ERRORS:
        return False


def _transposed_axis(sch: Schedule, block) -> int | None:
    """For a block that reads some buffer along another innermost axis than it writes (a transpose), the
    position of the loop that indexes that read's innermost dim; None otherwise."""
    stmt = sch.get(block)
    loop_vars = [sch.get(loop).loop_var for loop in sch.get_loops(block)]
    bindings = list(sch.get_sref(block).stmt.iter_vars)
    block_vars = [iv.var for iv in stmt.iter_vars]
    if len(block_vars) != len(loop_vars) or len(stmt.writes) != 1:
        return None
    for read in stmt.reads:
        if not read.region:
            continue
        innermost = read.region[-1].min
        if isinstance(innermost, tirx.Var) and any(innermost.same_as(v) for v in block_vars):
            axis = next(i for i, v in enumerate(block_vars) if innermost.same_as(v))
            if axis != len(block_vars) - 1 and int(read.region[-1].extent) == 1:
                return axis
    return None


def transpose_vectorize(sch: Schedule, block, vector_bits: int) -> bool:
    """A transpose whose read-innermost axis is static and whole vectors long: vectorize along that axis
    (contiguous loads, strided stores), so a symbolic innermost output axis (T) cannot scalarize the loop
    with its tail predicate. False when it does not apply."""
    axis = _transposed_axis(sch, block)
    if axis is None:
        return False
    loops = sch.get_loops(block)
    lanes = max(2, vector_bits // _block_dtype_bits(sch, block))
    extent = loop_extent(sch, loops[axis])
    if extent is None or extent % lanes:
        return False
    outer, lane = sch.split(loops[axis], factors=[None, lanes])
    rest = [loop for i, loop in enumerate(loops) if i != axis]
    sch.reorder(*rest[:-1], outer, rest[-1], lane)
    parallel = [*rest[:-1], outer]
    sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    sch.vectorize(lane)
    return True


# NEON's registers are 128 bits: an elementwise loop steps over 512 bits of its output (4 registers, 16 floats or 64
# bytes) at a time, so that its counter, compare and branch are amortized and the registers' operations independent.
NEON_STEP_BITS = 512


def parallel_vectorize(sch: Schedule, block, vector_bits: int) -> None:
    """Elementwise block: fuse all but the innermost loop -> parallel; innermost -> vectorized
    (a transpose: along the axis its source is contiguous in, `transpose_vectorize`)."""
    if transpose_vectorize(sch, block, vector_bits):
        return
    loops = sch.get_loops(block)
    # a trailing unit axis (a channels-last layout of one channel) joins the axis before it: that axis is
    # the one to vectorize, and the parallel index then need not be split by div/mod per element
    while len(loops) > 1 and loop_extent(sch, loops[-1]) == 1:
        loops = [*loops[:-2], sch.fuse(loops[-2], loops[-1])]
    split = _reshape_split(sch, block, loops[-1])
    if split is not None:
        loops = [*loops[:-1], *sch.split(loops[-1], factors=[None, split])]
    bits = _block_dtype_bits(sch, block)
    lanes = max(2, (NEON_STEP_BITS if vector_bits == 128 else vector_bits) // bits)
    inner = loops[-1]
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    extent = loop_extent(sch, inner)
    if len(loops) > 1 and _vectorize_in_pieces(sch, inner, lanes):
        return
    if extent is not None and extent <= lanes:
        if extent > 1:
            sch.vectorize(inner)
        return
    # NOTE: a lane predicate (the tail of a split that does not divide) makes TVM scalarize the whole
    # vector loop: a static axis takes lanes that divide it; a symbolic one, or a static one no lane
    # count divides, stays one plain loop, which LLVM vectorizes with a scalar epilogue.
    split_lanes = dividing_lanes(extent, lanes) if extent is not None else None
    if split_lanes is None and len(loops) > 1:
        return
    outer, vec = sch.split(inner, factors=[None, split_lanes or lanes])
    sch.vectorize(vec)
    if len(loops) == 1:
        sch.parallel(outer)


def _reshape_split(sch: Schedule, block, inner) -> int | None:
    """The static K to split the innermost loop by when the block reads through a reshape of that axis (`i // K`,
    `i % K`: a transpose fused with the reshape after it, e.g. attention's heads [H, T, d] moved to [T, H x d] in a
    model with static shapes), so that its inner part reads contiguously (`i % K` becomes the inner loop itself)
    instead of one gathered lane at a time. The smallest such K that every other one is a multiple of; None if none."""
    extent = loop_extent(sch, inner)
    stmt = sch.get(block)
    if extent is None or len(stmt.iter_vars) == 0:
        return None
    if any(_is_if_then_else(node) for node in expr_nodes(stmt.body)):
        return None  # a concat or a pad: `_vectorize_in_pieces` splits the axis at its selects' boundaries
    var = stmt.iter_vars[-1].var
    analyzer = Analyzer()  # the indices simplified within the block's ranges (`i // E` of an i < E is 0)
    for iter_var in stmt.iter_vars:
        analyzer.bind(iter_var.var, iter_var.dom)
    factors = {int(node.b) for read in stmt.reads for dim in read.region
               for node in expr_nodes(analyzer.simplify(dim.min))
               if isinstance(node, (tirx.FloorMod, tirx.FloorDiv)) and isinstance(node.b, tirx.IntImm)
               and _uses(node.a, var)}
    factors = sorted(f for f in factors if 1 < f < extent and extent % f == 0)
    if not factors or any(f % factors[0] for f in factors) or factors[0] < _MIN_RESHAPE_ROW:
        return None
    return factors[0]


# The shortest contiguous row `_reshape_split` splits out: shorter ones (a transposed conv's 2 phases) would make
# vectors of 2 lanes; the gathered loop measured faster there (U-Net decoder, 1.06x the time with rows of 2).
_MIN_RESHAPE_ROW = 8


# At most this many pieces of an innermost axis (`_vectorize_in_pieces`): a concat of as many inputs, or a pad.
_MAX_PIECES = 8


def _is_if_then_else(node) -> bool:
    return isinstance(node, tvm.ir.Call) and getattr(node.op, "name", "") == "prim.if_then_else"


def select_boundaries(body, var, extent: int) -> list[int]:
    """The points 0 < b < `extent` at which a condition of an `if_then_else` in `body` that compares `var` (linearly,
    coefficient +-1) with a constant changes its value: a concat's choice of input along `var`, a pad's border."""
    points = set()

    def comparison_point(cond) -> int | None:
        kinds = {tirx.LT: (False, 0), tirx.LE: (False, 1), tirx.GT: (True, 0), tirx.GE: (True, 1)}
        for kind, (flipped, closed) in kinds.items():
            if isinstance(cond, kind):
                a, b = (cond.b, cond.a) if flipped else (cond.a, cond.b)  # a < b (closed: a <= b)
                coeffs = detect_linear_equation(a - b, [var])
                if len(coeffs) != 2 or not all(isinstance(c, tirx.IntImm) for c in coeffs):
                    return None
                coeff, const = int(coeffs[0]), int(coeffs[1])
                if coeff == 1:  # var < -const (+1 when closed)
                    return -const + closed
                if coeff == -1:  # var > const (-1 when closed)
                    return const + 1 - closed
        return None

    for node in expr_nodes(body):
        if not _is_if_then_else(node):
            continue
        pending = [node.args[0]]
        while pending:
            cond = pending.pop()
            if isinstance(cond, (tirx.And, tirx.Or)):
                pending += [cond.a, cond.b]
            elif isinstance(cond, tirx.Not):
                pending.append(cond.a)
            else:
                point = comparison_point(cond)
                if point is not None and 0 < point < extent:
                    points.add(point)
    return sorted(points)


def _vectorize_in_pieces(sch: Schedule, loop, lanes: int) -> bool:
    """Vectorize a static innermost `loop` in pieces split at the points where its block's `if_then_else` conditions
    change value (`select_boundaries`: a concat's inputs, a pad's borders), so that in each piece the condition is a
    constant. A condition that varies across the lanes of a vector makes TVM's vectorizer scalarize the whole loop
    (a channels-last concat in a requantize chain: 7 ns per element, every divide and round done one lane at a
    time). The loop is split by a lane count that divides it and every point, its vector loop vectorized, and the
    loop of vectors partitioned (a partitioned loop starts at its piece's first index, and TVM splits only loops
    that start at 0); a loop of at most `lanes` is partitioned and each piece vectorized whole. False, and `sch`
    untouched, when it does not apply."""
    extent = loop_extent(sch, loop)
    realize = sch.get(loop).body
    if extent is None or not isinstance(realize, s_tir.SBlockRealize):
        return False
    stmt, loop_var = realize.block, sch.get(loop).loop_var
    block_var = next((iv.var for iv, b in zip(stmt.iter_vars, realize.iter_values) if b.same_as(loop_var)), None)
    if block_var is None:
        return False
    points = select_boundaries(stmt.body, block_var, extent)
    if not points or len(points) >= _MAX_PIECES:
        return False
    sizes = [b - a for a, b in zip([0, *points], [*points, extent])]
    if extent <= lanes:
        for piece in sch.loop_partition(loop, factors=sizes[:-1]):
            sch.vectorize(piece)
        return True
    width = dividing_lanes(math.gcd(*sizes), lanes)  # divides every piece
    if width is None:
        return False
    vectors, lane = sch.split(loop, factors=[None, width])
    sch.vectorize(lane)
    sch.loop_partition(vectors, factors=[n // width for n in sizes[:-1]])
    return True


# An axis this wide is worth a vector on any target (one SSE / NEON register): a reduction's output axis, a conv's
# im2col channels (16 uint8 channels copied byte by byte were 3x slower on AVX-512).
MIN_VECTOR_BITS = 128


def reduction_vectorize(sch: Schedule, block, vector_bits: int) -> None:
    """Reduction block S..S R..R: spatial[:-1] parallel, reductions, innermost spatial vectorized."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    n_spatial = len(kinds) - len(kinds.lstrip("S"))
    if kinds != "S" * n_spatial + "R" * (len(kinds) - n_spatial) or n_spatial == len(kinds):
        return
    if all(loop_extent(sch, loop) == 1 for loop in loops[:n_spatial]):
        full_reduction_vectorize(sch, block)
        return
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    bits = _block_dtype_bits(sch, block)
    lanes = max(2, vector_bits // bits)
    last_extent = loop_extent(sch, spatial[-1])
    if last_extent is not None and _writes_float32(sch, block) and _reads_along_reduction(sch, block):
        # a float row sum (adds in partial sums need a schedule; LLVM vectorizes an integer one by itself)
        row_reduction_vectorize(sch, block)
        return
    if len(reduction) == 1 and last_extent is not None and _reads_along_output(sch, block):
        column_reduction_vectorize(sch, block, lanes)
        return
    if last_extent is None or last_extent * bits < min(MIN_VECTOR_BITS, vector_bits // 2) or n_spatial == 1:
        # Vectorizing over an axis shorter than half a vector and than a 128-bit register is not worth it (a max
        # pool over 16 uint8 channels is: one SSE / NEON register per window tap), nor over a symbolic one (its tail
        # predicate scalarizes the vector loop, which then runs outside the reduction): only parallelize, over the
        # outer loops when the last one is symbolic (a fused index over it costs a division per element).
        outer = spatial[:-1] if last_extent is None and n_spatial > 1 else spatial
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return
    if _reads_along_reduction(sch, block):  # a vector of outputs would gather each lane from another row
        row_reduction_vectorize(sch, block)
        return
    sch.reorder(*spatial[:-1], *reduction, spatial[-1])
    outer = sch.fuse(*spatial[:-1]) if n_spatial > 2 else spatial[0]
    sch.parallel(outer)
    if last_extent > lanes:
        lanes = dividing_lanes(last_extent, lanes) or lanes
    if last_extent > lanes:
        _, vec = sch.split(spatial[-1], factors=[None, lanes])
    else:
        vec = spatial[-1]
    # NOTE: vectorize before decompose_reduction: after it the update block has no init and no longer
    # counts as a reduction block, which vectorize requires.
    sch.vectorize(vec)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


REDUCTION_LANES = 16  # partial results of a whole-tensor reduction, whatever the target's vector width


def _uses(expr, var) -> bool:
    """Whether `expr` depends on `var`."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))


def _reads_along_reduction(sch: Schedule, block) -> bool:
    """Whether a `S..S R` block reads along its one reduction axis: every read that depends on it indexes its
    innermost dimension with it (a sum over time of a channels-first [C, T] tensor), and one of them has rows. Then
    vectorizing the innermost spatial axis, as a matmul wants, would gather every lane from another row."""
    stmt = sch.get(block)
    reduce_vars = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce_vars) != 1:
        return False
    (k,) = reduce_vars
    reads = [r for r in stmt.reads if any(_uses(rng.min, k) for rng in r.region)]
    if not reads or not any(len(r.region) >= 2 for r in reads):
        return False
    return all(r.region[-1].min.same_as(k) and not any(_uses(rng.min, k) for rng in r.region[:-1]) for r in reads)


def row_reduction_vectorize(sch: Schedule, block) -> None:
    """A reduction along the rows it reads (`_reads_along_reduction`): rows in parallel, each row's values summed in
    `REDUCTION_LANES` partial results (`full_reduction_vectorize`'s lanes, so x86 and the Pi add in the same order)
    by contiguous vector loads, the lanes then reduced. Left as it is when no lane count divides a static extent."""
    *spatial, reduction = sch.get_loops(block)
    extent = loop_extent(sch, reduction)
    lanes = dividing_lanes(extent, REDUCTION_LANES) if extent else REDUCTION_LANES
    if lanes is None:
        return
    sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    rows, lane = sch.split(reduction, factors=[None, lanes])
    if extent is None:
        split_off_guards(sch, rows)
    partial = sch.rfactor(lane, factor_axis=len(spatial))
    row, partial_rows, lane = sch.get_loops(partial)
    sch.reverse_compute_at(block, row)  # the lanes reduced in the same parallel loop, from a per-row buffer
    sch.set_scope(partial, 0, "local")
    sch.vectorize(lane)
    init = sch.decompose_reduction(partial, partial_rows)
    sch.vectorize(sch.get_loops(init)[-1])


def _writes_float32(sch: Schedule, block) -> bool:
    return str(sch.get(block).writes[0].source.dtype) == "float32"


def _extent_of(iter_var) -> int | None:
    extent = iter_var.dom.extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _reads_along_output(sch: Schedule, block) -> bool:
    """Whether a `S..S R` block with one output axis (the others of extent 1) reads along it: every read that depends
    on the output index indexes its innermost dimension with that index alone (a sum over time of a channels-last
    [T, C] tensor)."""
    stmt = sch.get(block)
    outputs = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if not outputs or any(_extent_of(iv) != 1 for iv in outputs[:-1]):
        return False
    i = outputs[-1].var
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source) and len(r.region)]
    return bool(reads) and all(r.region[-1].min.same_as(i) and not any(_uses(rng.min, i) for rng in r.region[:-1])
                               for r in reads if any(_uses(rng.min, i) for rng in r.region))


def column_reduction_vectorize(sch: Schedule, block, lanes: int) -> None:
    """A one-output-axis reduction along the output it reads (`_reads_along_output`): vectors of outputs, each
    summed over the reduction from contiguous loads (a mean over time of a channels-last tensor), the vectors in
    parallel. Each output adds its terms in order, as the scalar loop did. Left as it is when no lane count
    divides the output axis."""
    *units, spatial, reduction = sch.get_loops(block)
    lanes = dividing_lanes(loop_extent(sch, spatial), max(lanes, REDUCTION_LANES))
    if lanes is None:
        return
    outer, vec = sch.split(spatial, factors=[None, lanes])
    sch.reorder(*units, outer, reduction, vec)
    sch.parallel(outer)
    sch.vectorize(vec)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])


def full_reduction_vectorize(sch: Schedule, block) -> None:
    """A reduction of a whole tensor to one value (the min and max of a run-time quantization): one
    partial result per vector lane (`rfactor` over the innermost axis split by the vector width),
    accumulated with vector instructions over the rest of the tensor, then the lanes reduced.

    `REDUCTION_LANES` partial results on every target (one AVX-512 vector, two AVX2 or four NEON ones), so that a
    float sum adds in the same order, and rounds the same, on x86 and on the Pi. A static innermost axis takes
    that many lanes or a half or quarter of them that divides it; a symbolic one all of them, its last vector
    split off (`split_off_guards`: a lane predicate would scalarize the vector loop). Otherwise the block is left
    as it is. Spatial loops of extent 1 (a mean kept as [1, 1, 1]) stay outside."""
    loops = sch.get_loops(block)
    innermost = loop_extent(sch, loops[-1])
    lanes = dividing_lanes(innermost, REDUCTION_LANES) if innermost else REDUCTION_LANES
    if lanes is None:
        return
    rows, lane = sch.split(loops[-1], factors=[None, lanes])
    if innermost is None:
        split_off_guards(sch, rows)
    partial = sch.rfactor(lane, factor_axis=0)
    *outer, lane = sch.get_loops(partial)
    sch.vectorize(lane)
    init = sch.decompose_reduction(partial, outer[0])
    sch.vectorize(sch.get_loops(init)[-1])


def split_off_guards(sch: Schedule, loop) -> None:
    """Have TVM's LoopPartition (s_tir lowering) split `loop`, whose extent is symbolic, into a part where its body's
    guards hold and the rest, so that the main part is a plain loop.

    NOTE: a loop `compute_at` places per row covers its readers' region in a form that stays right when the
    region is empty (it starts at `min(0, last index)`, its store guarded by `0 <= start + i`), and a zero-padded
    copy guards its reads by the run-time length; NEON has no masked stores, so LLVM keeps such a loop scalar
    (x86 vectorizes it with masked stores). LoopPartition splits only loops that ask for it."""
    sch.annotate(loop, "pragma_loop_partition_hint", 1)


def _root_blocks(func) -> tuple[Schedule, list]:
    """A Schedule of `func` and the blocks under its root ([] when it has none TVM can schedule)."""
    sch = Schedule(func)
    try:
        return sch, list(sch.get_child_blocks(sch.get_sblock("root")))
    except _ERRORS:
        return sch, []


def has_multi_axis_reduction(func) -> bool:
    """Whether a block reduces over 2+ axes (convolutions), which dlight's softmax/norm rule schedules poorly."""
    sch, blocks = _root_blocks(func)
    return any(_iter_kinds(sch, b).count("R") >= 2 for b in blocks)


def has_whole_tensor_reduction(func) -> bool:
    """Whether a block reduces to one value (every spatial extent 1) that a later block broadcasts: a mean over the
    whole tensor, such as GroupNorm with one group or a mean over all frames. dlight's norm rule then takes the
    broadcast's axis for its rows and recomputes the whole reduction for every element (quadratic time)."""
    sch, blocks = _root_blocks(func)

    def spatial_extents(block):
        return [iv.dom.extent for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar]

    def is_one(extent) -> bool:
        return isinstance(extent, tirx.IntImm) and int(extent) == 1

    whole = [b for b in blocks if "R" in _iter_kinds(sch, b) and all(is_one(e) for e in spatial_extents(b))]
    return bool(whole) and any(not all(is_one(e) for e in spatial_extents(b)) for b in blocks)


def has_unbroadcast_reduction(func) -> bool:
    """Whether the function reduces over one axis and nothing after the reduction reads its result across more
    elements than it has: a mean or sum over time, with at most elementwise work on the reduced values (ECAPA's
    pooling statistics, a squeeze-excite mean). dlight's reduction rule, made for softmax and norm rows whose
    reductions are broadcast back over the row, sums such a block one scalar at a time; the generic rule
    vectorizes it (along the rows it reads, or across its outputs)."""
    sch, blocks = _root_blocks(func)
    kinds = [_iter_kinds(sch, b) for b in blocks]
    reductions = [i for i, k in enumerate(kinds) if "R" in k]
    if not reductions or any(kinds[i].count("R") != 1 for i in reductions):
        return False

    def elements(block):
        return math.prod(sch.get(block).writes[0].source.shape)

    largest = max((elements(blocks[i]) for i in reductions), key=lambda n: int(n) if isinstance(n, tirx.IntImm) else 0)
    analyzer = Analyzer()
    return all(analyzer.can_prove(elements(b) <= largest) for b in blocks[reductions[0] + 1:])


WINDOW_TAPS = 64  # the most elements a reduction reduces per output to count as a window (a pool), static


def has_window_reduction(func) -> bool:
    """Whether a block reduces a small static window (at most `WINDOW_TAPS` elements) of a tensor read along an
    output axis in its last index: a max / average pool over a channels-last tensor. dlight's reduction rule (for
    softmax and layer norm rows, reduced along the last index) leaves such a block scalar; the generic rule
    vectorizes the channels."""
    sch, blocks = _root_blocks(func)
    for block in blocks:
        stmt = sch.get(block)
        reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        spatial = {iv.var.name for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
        extents = [iv.dom.extent for iv in reduce]
        if not reduce or not all(isinstance(e, tirx.IntImm) for e in extents):
            continue
        if math.prod(int(e) for e in extents) > WINDOW_TAPS:
            continue
        for region in stmt.reads:
            if region.source.same_as(stmt.writes[0].source) or not len(region.region):
                continue
            last = {v.name for v in tirx.analysis.undefined_vars(region.region[-1].min, [])}
            if last and last <= spatial:
                return True
    return False


def dividing_lanes(extent: int, lanes: int) -> int | None:
    """`lanes`, or a half or a quarter of it (at least 4), that divides `extent`; None if none does.
    NOTE: a lane predicate (extent % lanes != 0) makes TVM refuse or scalarize a vector loop."""
    return next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and extent % w == 0), None)


def find_block(sch: Schedule, name: str):
    """The block called `name` in `sch`, or None."""
    try:
        return sch.get_sblock(name)
    except _ERRORS:
        return None


def block_dtype(func, name: str) -> str | None:
    """The dtype of the buffer that block `name` of PrimFunc `func` writes (which flavour of a kernel it is:
    int8 or float32), or None when `func` has no such block."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = Schedule(func)
    block = find_block(sch, name)
    return None if block is None else str(sch.get(block).writes[0].source.dtype)


def has_block(func, name: str) -> bool:
    """Whether `func` is a PrimFunc with a block called `name` (FuseTIR keeps block names, not attrs)."""
    return isinstance(func, tirx.PrimFunc) and find_block(Schedule(func), name) is not None


def has_integer_matmul(func) -> bool:
    """Whether a block accumulates 8-bit products into int32 over one axis (an activation x activation
    matmul, e.g. attention's Q.K^T and P.V): dlight's reduction rule keeps such a reduction innermost
    and scalar; `reduction_vectorize` turns it into rows x vector-of-columns multiply-adds."""
    sch, blocks = _root_blocks(func)
    for block in blocks:
        stmt = sch.get(block)
        if _iter_kinds(sch, block).count("R") != 1 or len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "int32":
            continue
        if any(str(r.source.dtype) in ("int8", "uint8") for r in stmt.reads):
            return True
    return False


def schedule_generic(func, vector_bits: int) -> Schedule | None:
    """The default CPU schedule of any PrimFunc, or None if nothing could be applied."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = Schedule(func)
    try:
        inline_elementwise(sch)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
    except _ERRORS as err:
        logger.debug("generic schedule does not apply: %s", err)
        return None
    changed = False
    # NOTE: by name: a loop partition (`_vectorize_in_pieces`) rebuilds the root's children, so block handles taken
    # before it no longer resolve.
    for name in [sch.get(b).name_hint for b in blocks]:
        block = sch.get_sblock(name)
        if not _is_perfect_nest(sch, block):
            continue
        kinds = _iter_kinds(sch, block)
        step = reduction_vectorize if "R" in kinds else parallel_vectorize
        trial = sch.copy()
        try:
            step(sch, block, vector_bits)
            changed = True
        except _ERRORS as err:
            logger.debug("generic schedule skips block %s: %s", name, err)
            sch = trial
    return sch if changed else None
