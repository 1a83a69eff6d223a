"""int8 (and float32) depthwise convolution, channels-last: the TE kernel and its TIR schedule rule.

Kernel (emitted by `channels_last.Int8ConvsChannelsLast`, kernel_relax_passes, before legalization):

    acc[n, *o, c] = sum_k x[n, *(o*stride + k*dilation - pad), c] * w[*k, c]     # int32, x and w 8-bit

as a `call_tir` marked out-elementwise-fusable, so FuseOps fuses its requantize epilogue into it.
A float32 depthwise conv (x and w float32: a float model's, or one `quantize_dynamic` leaves in float)
is the same kernel with float32 accumulators.
A depthwise reduction (the kernel taps, 3 to 40 of them) is too short for the int8 dot-product
instructions, which reduce 4 neighbours along K; in channels-last layout the channels are the
vector axis instead: every tap is one contiguous vector load of C activations and of C weights.

Schedule (`schedule_depthwise`, schedule_passes, after FuseTIR; the rule `DefaultCpuSchedule` names
"depthwise"):

    for (n, *o, t0) in parallel:                    # blocks of P = 4 output positions along the last axis
        for c0 in C / lanes:                         # (P = 5, 6 or 3 for a static axis 4 does not divide)
            acc[P][lanes] = 0                        # on the stack
            for k in taps:                           # each weight vector loaded once for P positions
                for t in unroll(P): acc[t] += widen(x[.., t0*P + t .., c0*lanes:]) * widen(w[k, c0*lanes:])
            out[n, *o, t0*P:, c0*lanes:] = epilogue(acc)    # requantize, vectorized; cropped to T

A 2-D conv's zero-point padded input (`copy_padding`) is a stage of the kernel: the rows loop (n, *o) alone is
parallel, and each row of outputs first copies the kernel rows of padded input it reads into a buffer of its own.

On AVX-512 VNNI a uint8 conv of 8+ taps along its last axis (QuartzNet's 33-63, a Conformer's 15) runs 4 taps
per instruction instead: its padded input is written once as 32-bit words of 4 neighbouring taps per channel
(`interleave_taps_te`), the weight as [*K', G, C, 4], and each tap step of the loop above is one `vpdpbusd`
(16 channels x 4 taps) instead of 4 widening multiply-adds and adds. A word serves every output position
whose taps cover it, so short kernels (3x3) gain nothing from it and keep the loop above.
"""

from __future__ import annotations

import logging

import numpy as np

from nativeq.compile._tvm import Analyzer, Schedule, s_tir, te, tirx
from nativeq.compile.schedules.conv_as_matmul import OPAQUE, ConvGeometry, gather_padded, tap_position
from nativeq.compile.schedules.generic import dividing_lanes, find_block

logger = logging.getLogger(__name__)

DEPTHWISE_BLOCK = "nativeq_int8_depthwise"
DEPTHWISE_CROP = "nativeq_int8_depthwise_crop"
DEPTHWISE_PAD = "nativeq_int8_depthwise_pad"
POSITIONS = 4  # output positions along the last spatial axis per register block (`positions_for`)
_POSITION_CHOICES = (4, 5, 6, 3)  # block sizes that fit the registers; a static axis takes the first dividing it
# NOTE: at least 16 channels per vector step, also where a register holds 4 int32 (NEON): 16 int8 activations
# are then one load, widened in two steps and multiplied by widening multiply-adds (`smlal`/`smlal2`), instead
# of a 4-byte load widened twice per 4 products.
_MIN_LANES = 16
_OUT_EWISE_FUSABLE = 4  # TVM OpPatternKind.kOutEWiseFusable
_ERRORS = (s_tir.ScheduleError, RuntimeError, ValueError, TypeError)


def positions_for(last) -> int:
    """Output positions per register block along a last spatial axis of extent `last`: `POSITIONS`, or for a static
    extent it does not divide (DS-CNN's 5 columns) the first of `_POSITION_CHOICES` that does, so that no output
    is computed past the end and cropped (5 columns in blocks of 4: 8 computed)."""
    if isinstance(last, (int, tirx.IntImm)):
        return next((p for p in _POSITION_CHOICES if int(last) % p == 0), POSITIONS)
    return POSITIONS


def depthwise_te(x: te.Tensor, w: te.Tensor, out_spatial, pair_taps: bool = False, rows_past_end: bool = False,
                 quad_taps: bool = False, copy_padding=None, **geometry_kwargs) -> te.Tensor:
    """int32 depthwise conv of `x` [N, *S, C] (8-bit) with `w` [*K, C] (int8): [N, *out_spatial, C]
    (float32 when x and w are float32).

    The last output axis is computed padded to whole blocks of `positions_for(last)` and cropped after, so the
    schedule can hold a block of outputs in registers without a bounds predicate in its inner loop. The
    padding outputs read clamped input positions, unless `rows_past_end`: the caller padded `x`'s last axis
    by `extra_rows` past what the conv reads (one padded copy of the input instead of a clamp per position
    and tap in the inner loop: on x86 5 scalar instructions next to each 16-lane multiply-add).

    `pair_taps` (int8 x and w, no weight -128, the last tap axis of `w` even: `pair_taps_weight`): the
    products of two neighbouring taps are summed in int16 before they are widened into the int32
    accumulator (ARM: `smull` + `smlal`, then one widening add, instead of widening every product). Exact:
    |x * w| <= 128 * 127, so two products stay within int16. No read is clamped: the caller pads `x`'s
    last axis by `extra_rows(..., pair_taps=True)` past what the conv reads (a zero tap the pairing added past
    the kernel, the output block padding).

    `copy_padding` (before per spatial axis, then after; the geometry's own padding zero): the padded copy of `x`
    that `rows_past_end` reads is a stage of this kernel (`DEPTHWISE_PAD`), computed per row of outputs by the
    schedule, instead of a kernel of its own before it.

    `quad_taps` (x86 AVX-512 VNNI, uint8 x): `x` is `interleave_taps_te`'s uint32 [N, *S, C] (each channel's 4
    neighbouring taps along the last axis as the bytes of one word) and `w` is `quad_taps_weight`'s
    [*K', G, C, 4]: one `vpdpbusd` lane multiplies 4 taps of one channel.
    """
    geometry = ConvGeometry.from_te_kwargs(**geometry_kwargs)
    if copy_padding:
        ndim = len(copy_padding) // 2
        x = pad_channels_last_te(x, copy_padding[:ndim], copy_padding[ndim:], geometry.pad_value, name=DEPTHWISE_PAD)
    *kernel, channels = w.shape[:-1] if quad_taps else w.shape
    *outer, last = out_spatial
    input_last = x.shape[-2]
    positions = positions_for(last)
    padded_last = (last + positions - 1) // positions * positions
    crop = not (isinstance(last, (int, tirx.IntImm)) and int(last) % positions == 0)
    acc_dtype = "float32" if w.dtype == "float32" else "int32"
    taps = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]

    def compute(n, *index):
        out_index, c = index[:-1], index[-1]
        position = tap_position(out_index, taps, geometry)
        if crop and not geometry.padded and not rows_past_end:  # the padding rows read a clamped (valid) input row
            position[-1] = tirx.min(position[-1], input_last - 1)
        value = gather_padded(x, n, position, c, geometry)
        return te.sum(value.astype(acc_dtype) * w[(*taps, c)].astype(acc_dtype), axis=taps)

    if pair_taps:
        compute = _paired_taps(x, w, geometry)
    if quad_taps:
        compute = _quad_taps(x, w, geometry)
    acc = te.compute((x.shape[0], *outer, padded_last if crop else last, channels), compute, name=DEPTHWISE_BLOCK)
    if not crop:
        return acc
    return te.compute((x.shape[0], *outer, last, channels), lambda *i: acc[i], name=DEPTHWISE_CROP)


def pair_taps_weight(weight: np.ndarray) -> np.ndarray | None:
    """`weight` [*K, C] int8 with its last tap axis zero-padded to an even length, when the int16 pair sums of
    `depthwise_te(pair_taps=True)` are exact for it (no value is -128, at least 2 taps), else None."""
    if weight.dtype != np.int8 or weight.shape[-2] < 2 or int(weight.min()) == -128:
        return None
    if weight.shape[-2] % 2:
        pad = [(0, 0)] * weight.ndim
        pad[-2] = (0, 1)
        weight = np.pad(weight, pad)
    return np.ascontiguousarray(weight)


def extra_rows(kernel_last: int, stride: int, dilation: int, out_last, pair_taps: bool = False) -> int:
    """Input rows past the conv's own that `depthwise_te(rows_past_end=True)` (and `pair_taps=True`) may read
    along the last spatial axis: the outputs computed past the end (`out_last` of them are real) up to a whole
    block of `positions_for(out_last)`, and with `pair_taps` the zero tap added to an odd `kernel_last`."""
    block = positions_for(out_last)
    whole_blocks = isinstance(out_last, (int, tirx.IntImm)) and int(out_last) % block == 0
    return (dilation * (kernel_last % 2) if pair_taps else 0) + (0 if whole_blocks else (block - 1) * stride)


def _paired_taps(x, w, geometry):
    """The compute of `depthwise_te(pair_taps=True)`: int16 sums of two neighbouring taps' products, widened."""
    *kernel, _ = w.shape
    outer_taps = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel[:-1])]
    pair = te.reduce_axis((0, kernel[-1] // 2), name="pair")

    def compute(n, *index):
        out_index, c = index[:-1], index[-1]

        def product(tap):
            value = gather_padded(x, n, tap_position(out_index, [*outer_taps, tap], geometry), c, geometry)
            return value.astype("int16") * w[(*outer_taps, tap, c)].astype("int16")

        return te.sum((product(2 * pair) + product(2 * pair + 1)).astype("int32"), axis=[*outer_taps, pair])

    return compute


QUAD = 4  # taps a `vpdpbusd` lane multiplies


def quad_taps_weight(weight: np.ndarray) -> np.ndarray:
    """`weight` [*K, C] as [*K[:-1], G, C, 4]: the last tap axis zero-padded to G = ceil(K / 4) groups of 4 taps,
    each channel's 4 taps side by side (`depthwise_te(quad_taps=True)`)."""
    *kernel, channels = weight.shape
    groups = -(-kernel[-1] // QUAD)
    pad = [(0, 0)] * weight.ndim
    pad[-2] = (0, groups * QUAD - kernel[-1])
    padded = np.pad(weight, pad).reshape(*kernel[:-1], groups, QUAD, channels)
    return np.ascontiguousarray(np.moveaxis(padded, -2, -1))


def quad_extra_rows(kernel_last: int, stride: int, dilation: int, out_last) -> int:
    """Input rows past the conv's own that `depthwise_te(quad_taps=True)` reads: `extra_rows`, and the zero taps
    that round the last tap axis up to groups of 4."""
    return extra_rows(kernel_last, stride, dilation, out_last) + dilation * (-kernel_last % QUAD)


def interleave_taps_te(x: te.Tensor, before, after, pad_value: float, dilation: int) -> te.Tensor:
    """x [N, *S, C] (uint8) zero-point padded like `pad_channels_last_te`, as uint32 [N, *S', C]: byte j of
    position t along the last axis is the padded input at t + j * dilation (the pad value past the end), so one
    32-bit lane holds a channel's 4 neighbouring taps (elementwise over C: no gather, no shuffle)."""
    shape, geometry = _padded(x, before, after, pad_value)

    def compute(n, *index):
        *position, c = index
        position = [i - b for i, b in zip(position, before)]
        word = tirx.const(0, "uint32")
        for j in range(QUAD):
            tap = gather_padded(x, n, [*position[:-1], position[-1] + j * dilation], c, geometry)
            word = word | (tap.astype("uint32") << tirx.const(8 * j, "uint32"))
        return word

    return te.compute(shape, compute, name="interleave_taps")


def call_interleave_taps(builder, x_cl, before, after, pad_value: float, dilation: int):
    # NOTE: opaque to FuseOps, as im2col: fused into its producer (a GLU's requantize chain, channels-last
    # transposes) each word would recompute the producer for its 4 taps (a static-length Conformer's conv module:
    # 0.17 ms for the fused kernel, 0.045 ms for the chain and the interleave apart).
    return builder.call_te(interleave_taps_te, x_cl, before=list(before), after=list(after), pad_value=pad_value,
                           dilation=dilation, primfunc_name_hint="interleave_taps", primfunc_attrs={"op_pattern": OPAQUE})


def _quad_taps(x4, w4, geometry):
    """The compute of `depthwise_te(quad_taps=True)`: 4 taps of a channel per step of the last tap axis."""
    *kernel, groups, _, _ = w4.shape
    outer_taps = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]
    group = te.reduce_axis((0, groups), name="group")
    quad = te.reduce_axis((0, QUAD), name="quad")

    def compute(n, *index):
        out_index, c = index[:-1], index[-1]
        position = tap_position(out_index, [*outer_taps, group * QUAD], geometry)
        byte = (x4[(n, *position, c)] >> (quad * 8).astype("uint32")) & tirx.const(255, "uint32")
        return te.sum(byte.astype("int32") * w4[(*outer_taps, group, c, quad)].astype("int32"),
                      axis=[*outer_taps, group, quad])

    return compute


def pad_channels_last_te(x: te.Tensor, before, after, pad_value: float, name: str = "pad") -> te.Tensor:
    """x [N, *S, C] zero-point padded along the spatial axes. The padded sizes are simplified here: the kernel
    that reads the result is specialized to its shape, which must equal what the Relax graph spells later
    (FuseTIR refuses `(T - 1) // 2 + 1 + 32` for `(T - 1) // 2 + 33`)."""
    shape, geometry = _padded(x, before, after, pad_value)

    def compute(n, *index):
        return gather_padded(x, n, [i - b for i, b in zip(index[:-1], before)], index[-1], geometry)

    return te.compute(shape, compute, name=name)


def _padded(x: te.Tensor, before, after, pad_value: float):
    """(the shape of x [N, *S, C] padded by `before` / `after` along S, simplified; the geometry reading x padded)."""
    analyzer = Analyzer()
    spatial = x.shape[1:-1]
    shape = [x.shape[0], *(analyzer.simplify(d + b + a) for d, b, a in zip(spatial, before, after)), x.shape[-1]]
    ones = (1,) * len(spatial)
    return shape, ConvGeometry(ones, ones, (*before, *after), pad_value)


def call_pad_channels_last(builder, x_cl, before, after, pad_value: float):
    return builder.call_te(pad_channels_last_te, x_cl, before=list(before), after=list(after), pad_value=pad_value,
                           primfunc_name_hint="pad")


def call_depthwise(builder, x_cl, w_cl, out_spatial, geometry: ConvGeometry, pair_taps: bool = False,
                   rows_past_end: bool = False, quad_taps: bool = False, copy_padding=None):
    """`builder.call_te` of `depthwise_te`, marked so FuseOps fuses the requantize epilogue into it."""
    float_kernel = str(w_cl.ty.dtype) == "float32"
    return builder.call_te(
        depthwise_te, x_cl, w_cl, out_spatial=list(out_spatial), pair_taps=pair_taps, rows_past_end=rows_past_end,
        quad_taps=quad_taps, copy_padding=list(copy_padding) if copy_padding else None, **geometry.as_te_kwargs(),
        primfunc_name_hint="f32_depthwise" if float_kernel else "int8_depthwise", primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE},
    )


def schedule_depthwise(func, vector_bits: int, quad_intrin: str | None = None) -> Schedule | None:
    """The schedule of a PrimFunc holding the depthwise block (see the module docstring), or None.

    `quad_intrin`: the tensor intrinsic multiplying 4 taps of 16 channels (`depthwise_te(quad_taps=True)`), if the
    target has one; a quad-tap kernel without it is not scheduled."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = Schedule(func)
    block = find_block(sch, DEPTHWISE_BLOCK)
    if block is None:
        return None
    try:
        return _schedule(sch, block, vector_bits, quad_intrin)
    except _ERRORS as err:
        logger.debug("depthwise schedule does not apply: %s", err)
        return None


def _schedule(sch: Schedule, block, vector_bits: int, quad_intrin: str | None) -> Schedule | None:
    children = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in children]
    position = names.index(DEPTHWISE_BLOCK)
    pad = children[names.index(DEPTHWISE_PAD)] if DEPTHWISE_PAD in names[:position] else None
    for producer in reversed(children[:position]):
        if producer is not pad:
            sch.compute_inline(producer)
    epilogue = children[position + 1:]
    for consumer in epilogue[:-1]:
        sch.compute_inline(consumer)
    last = epilogue[-1] if epilogue else None

    loops = sch.get_loops(block)
    n_taps = len(sch.get(block).iter_vars) - len(sch.get(block).writes[0].source.shape)
    spatial, taps = loops[:-n_taps], loops[-n_taps:]
    quad = _is_quad(sch, block)
    if quad and (quad_intrin is None or last is None):
        return None
    quad_loop = taps.pop() if quad else None
    *outer, last_axis, channel = spatial
    channels = sch.get(channel).extent
    if not isinstance(channels, tirx.IntImm):
        return None
    lanes = 16 if quad else dividing_lanes(int(channels), max(vector_bits // 32, _MIN_LANES))  # int32 / f32 accumulators
    if lanes is None or int(channels) % lanes:
        return None
    position_block, position = sch.split(last_axis, factors=[None, positions_for(sch.get(last_axis).extent)])
    c_outer, c_lane = sch.split(channel, factors=[None, lanes])
    sch.reorder(*outer, position_block, c_outer, *taps, position, c_lane, *([quad_loop] if quad else []))
    if pad is None:
        sch.parallel(sch.fuse(*outer, position_block))
    else:  # a row of outputs per task, its input rows padded first: the copy is made kernel rows / stride times
        rows = sch.fuse(*outer)
        sch.compute_at(pad, rows)
        sch.set_scope(pad, 0, "local")  # each task's own rows
        _vectorize_channels(sch, pad, vector_bits)
        sch.parallel(rows)
    # NOTE: vectorize before decompose_reduction: after it the update block has no init and no longer
    # counts as a reduction block, which vectorize requires.
    if not quad:
        sch.vectorize(c_lane)
    sch.unroll(position)
    init = sch.decompose_reduction(block, taps[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if last is not None:
        sch.reverse_compute_at(last, c_outer)
        sch.vectorize(sch.get_loops(last)[-1])
        sch.set_scope(init, 0, "local")  # the accumulators of one register block, on the stack
    if quad:
        sch.tensorize(c_lane, quad_intrin)
    return sch


def _vectorize_channels(sch: Schedule, block, vector_bits: int) -> None:
    """Vectorize the channel loop (innermost) of an 8-bit copy `block` in whole vectors where they divide it."""
    channel = sch.get_loops(block)[-1]
    lanes = dividing_lanes(int(sch.get(channel).extent), vector_bits // 8)
    if lanes is not None:
        sch.vectorize(sch.split(channel, factors=[None, lanes])[1])


def _is_quad(sch: Schedule, block) -> bool:
    """Whether the depthwise block is `depthwise_te(quad_taps=True)`'s: its innermost reduction is 4 taps."""
    reduce_vars = [iv for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    extent = reduce_vars[-1].dom.extent if reduce_vars else None
    return isinstance(extent, tirx.IntImm) and int(extent) == QUAD and any(
        str(r.source.dtype) == "uint32" for r in sch.get(block).reads)  # the interleaved taps, 4 bytes a word
