"""An int8 conv in channels-last layout as im2col + the packed int8 matmul kernel.

Called by `channels_last.Int8ConvsChannelsLast` (kernel_relax_passes, before `PackInt8Weights`,
which then packs the new matmul's weight for the target's dot intrinsic). Input: the conv's
channels-last activation `x` `[N, *S, C]` (8-bit), its constant weight `W` `[O, C, *K]` and its
geometry. Output, all channels-last:

    cols = im2col(x)                      # [N, *S', *K, C], padded with the zero point's value
    acc  = R.matmul(reshape(cols, [N, rows, K*C]), W2, out_dtype="int32")   # W2 = W as [K*C, O]
    acc  = reshape(acc, [N, *S', O])      # 1-D: already that shape, so the epilogue fuses into the matmul

`PackInt8Weights` then makes the im2col implicit where the input's channels fill whole vectors
(`implicit_im2col`): the packed matmul kernel reads `x` itself and gathers each register tile's rows
on the stack (`ConvRows`), and the im2col kernel is dropped. Materialized, the im2col is the input
copied once per tap through memory (a 3x3 conv over 128 channels: 1152 bytes per output position),
and it took a quarter to a third of 2-D conv nets' time.

A 1x1 conv with stride 1 and no padding needs no im2col: x is already the matmul's lhs. TVM's
legalized int8 conv is a scalar loop nest that the default schedule can only parallelize; as a
matmul it runs on the tensorized VNNI / AVX2 / sdot / NEON kernel. The reduction K*C is
zero-padded to the intrinsic's k-step, with zero weight rows. A float32 conv (weight float32, with
the float multiply-add intrinsic) becomes a float32 matmul the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from nativeq.compile._tvm import relax, te, tirx, tvm
from nativeq.compile.provenance import with_span
from nativeq.compile.schedules.intrinsics import DotIntrin

IM2COL_BLOCK = "im2col"
# NOTE: opaque to FuseOps: fused into its producer (e.g. a requantize), im2col would recompute
# the producer once per kernel tap; materializing the 8-bit input once is cheaper.
OPAQUE = 8  # TVM OpPatternKind.kOpaque
IM2COL_ATTR = "nativeq.im2col"  # PrimFunc attribute of an im2col kernel: its geometry (JSON)
IM2COL_CHANNELS = "nativeq.im2col_channels"  # rows block annotation: rows gathered from a conv input of C channels
IMPLICIT_MIN_BITS = 128  # a (row, tap)'s channels fill whole 128-bit vectors: the in-kernel gather copies vectors


@dataclass(frozen=True)
class ConvGeometry:
    """Strides, dilation and padding of a conv (padding: before per spatial axis, then after), and
    the value its padded positions read (0, or the zero point a folded `nn.pad` padded with)."""

    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    pad_value: float = 0.0

    @property
    def padded(self) -> bool:
        return any(self.padding)

    def as_te_kwargs(self) -> dict:
        """As plain lists and floats (what `BlockBuilder.call_te` passes through to a TE function)."""
        return {"strides": list(self.strides), "dilation": list(self.dilation), "padding": list(self.padding),
                "pad_value": float(self.pad_value)}

    @classmethod
    def from_te_kwargs(cls, strides, dilation, padding, pad_value) -> "ConvGeometry":
        return cls(tuple(int(s) for s in strides), tuple(int(d) for d in dilation), tuple(int(p) for p in padding),
                   float(pad_value))


def gather_padded(x: te.Tensor, n, position, c, geometry: ConvGeometry):
    """x[n, *position, c] of a channels-last tensor, or the pad value where `position` lies outside it."""
    spatial = x.shape[1:-1]
    if not geometry.padded:
        return x[(n, *position, c)]
    inside = tirx.const(True, "bool")
    for i, extent in zip(position, spatial):
        inside = tirx.all(inside, i >= 0, i < extent)
    safe = [tirx.max(tirx.min(i, extent - 1), 0) for i, extent in zip(position, spatial)]
    return tirx.if_then_else(inside, x[(n, *safe, c)], tirx.const(geometry.pad_value, x.dtype))


def tap_position(out_index, kernel_index, geometry: ConvGeometry) -> list:
    """The input position output `out_index` reads at kernel tap `kernel_index`."""
    before = geometry.padding[: len(out_index)]
    return [o * s + k * d - p for o, k, s, d, p in zip(out_index, kernel_index, geometry.strides, geometry.dilation, before)]


def im2col_channels_last_te(x: te.Tensor, kernel, out_spatial, **geometry_kwargs):
    """[N, *S, C] -> [N, *out_spatial, *kernel, C]: cols[n, *o, *k, c] = x[n, *(o*stride + k*dilation - pad), c].

    No div/mod in the index: each (output position, tap) is a contiguous copy of C channels.
    """
    geometry = ConvGeometry.from_te_kwargs(**geometry_kwargs)
    kernel = [int(k) for k in kernel]
    batch, channels = x.shape[0], x.shape[-1]
    ndim = len(kernel)

    def compute(n, *index):
        out_index, kernel_index, c = index[:ndim], index[ndim:2 * ndim], index[-1]
        return gather_padded(x, n, tap_position(out_index, kernel_index, geometry), c, geometry)

    return te.compute((batch, *out_spatial, *kernel, channels), compute, name=IM2COL_BLOCK)


def conv_as_matmul(builder, x_cl, weight: np.ndarray, out_spatial, geometry: ConvGeometry, intrin: DotIntrin,
                   span=None):
    """Emit the channels-last conv of `x_cl` [N, *S, C] with `weight` [O, C, *K]; returns the [N, *S', O] expr
    (int32 for an int8 weight, float32 for a float32 one). `span`: the ONNX node's, for the calls it emits
    (`compile/provenance.py`; a grouped conv becomes many)."""
    out_channels, channels, *kernel = weight.shape
    ndim = len(kernel)
    batch = x_cl.ty.shape.values[0]
    reduction = channels * int(np.prod(kernel))
    padded_reduction = -(-reduction // intrin.kstep) * intrin.kstep
    w2 = np.zeros((padded_reduction, out_channels), weight.dtype)
    # cols order (*K, C) -> weight rows (*K, C)
    w2[:reduction] = weight.transpose(*range(2, 2 + ndim), 1, 0).reshape(reduction, out_channels)
    pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in geometry.strides) and not geometry.padded
    if pointwise:
        cols = x_cl
    else:
        cols = builder.emit(with_span(builder.call_te(
            im2col_channels_last_te, x_cl, kernel=list(kernel), out_spatial=list(out_spatial), **geometry.as_te_kwargs(),
            primfunc_name_hint="im2col",
            primfunc_attrs={"op_pattern": OPAQUE, IM2COL_ATTR: json.dumps(geometry.as_te_kwargs())},
        ), span))
    rows = 1
    for extent in out_spatial:
        rows = rows * extent
    if ndim != 1 or not pointwise:
        cols = relax.op.reshape(cols, [batch, rows, reduction])
    if padded_reduction != reduction:  # the dot intrinsic's k-step: zero columns x zero weight rows
        cols = relax.op.nn.pad(cols, [0, 0, 0, 0, 0, padded_reduction - reduction])
    if span is not None and not isinstance(cols, relax.Var):
        cols = builder.emit(cols)  # a nested argument would make the normalizer rebuild the call without its span
    acc = builder.emit(with_span(relax.op.matmul(cols, relax.const(w2, str(w2.dtype)), out_dtype=intrin.acc_dtype), span))
    if ndim == 1:
        return acc
    return relax.op.reshape(acc, [batch, *out_spatial, out_channels])


class ConvRows:
    """The GEMM rows of a channels-last conv, read from its input `x` [N, *S, C] without materializing them:
    row r = the output position `r` (row-major over `out_spatial`), column k = tap k // C (row-major over `kernel`),
    channel k % C; `[N, rows, taps x C]`, the layout `im2col_channels_last_te` writes (reshaped)."""

    def __init__(self, x: te.Tensor, kernel, out_spatial, rows, **geometry_kwargs):
        self.x = x
        self.kernel = [int(k) for k in kernel]
        self.out_spatial = list(out_spatial)
        self.geometry = ConvGeometry.from_te_kwargs(**geometry_kwargs)
        self.channels = int(x.shape[-1])
        self.shape = [x.shape[0], rows, int(np.prod(self.kernel)) * self.channels]

    def read(self, index):
        n, row, k = index
        out_index = _unflatten(row, self.out_spatial)
        kernel_index = _unflatten(k // self.channels, self.kernel)
        position = tap_position(out_index, kernel_index, self.geometry)
        return gather_padded(self.x, n, position, k % self.channels, self.geometry)


def _unflatten(index, extents) -> list:
    """The row-major multi-index of flat `index` over `extents` (the first extent may be symbolic)."""
    result = []
    for extent in reversed(extents[1:]):
        result.append(index % extent)
        index = index // extent
    return [index, *reversed(result)]


def implicit_im2col(lookup, mod, x) -> tuple | None:
    """(conv input, `packed_matmul_te`'s `im2col` arguments) when matmul lhs `x` is the reshaped output of an
    `im2col_channels_last_te` kernel whose input's channels fill whole vectors and whose K needs no padding to the
    k-step (the rows a kernel gathers itself, see the module docstring); None otherwise. `lookup`: a mutator's
    `lookup_binding`."""
    reshape = lookup(x) if isinstance(x, relax.Var) else None
    if not isinstance(reshape, relax.Call) or reshape.op != tvm.ir.Op.get("relax.reshape"):
        return None
    im2col = lookup(reshape.args[0]) if isinstance(reshape.args[0], relax.Var) else None
    if not isinstance(im2col, relax.Call) or im2col.op != tvm.ir.Op.get("relax.call_tir"):
        return None
    func = mod[im2col.args[0]]
    if func.attrs is None or IM2COL_ATTR not in func.attrs:
        return None
    x_cl = im2col.args[1].fields[0]  # (then the symbolic sizes its TE function read, as PrimValues)
    *_, channels = x_cl.ty.shape.values
    cols_shape = reshape.args[0].ty.shape.values
    ndim = (len(cols_shape) - 2) // 2
    bits = tvm.runtime.DataType(str(x_cl.ty.dtype)).bits
    if not isinstance(channels, tirx.IntImm) or int(channels) * bits % IMPLICIT_MIN_BITS:
        return None
    rows = x.ty.shape.values[-2]
    kernel = [int(k) for k in cols_shape[1 + ndim:1 + 2 * ndim]]
    return x_cl, {"kernel": kernel, "out_spatial": list(cols_shape[1:1 + ndim]), "rows": rows,
                  **json.loads(str(func.attrs[IM2COL_ATTR]))}


def schedule_im2col(func, vector_bits: int):
    """The schedule of an `im2col_channels_last_te` kernel (and nothing else: None).

    Loops [n, *out, *kernel, c]: batch x first output axis in parallel, the other output axes and the
    taps serial, so no index is recovered by div/mod per element (the generic rule fuses them all).
    Channels filling at least a 128-bit register (`MIN_VECTOR_BITS`) are vectorized; fewer (a conv on a 1-channel
    spectrogram) are unrolled together with the innermost tap, whose input elements are adjacent
    (`[..., w*s + kw - p, c]`).
    """
    from nativeq.compile._tvm import Schedule, s_tir, tvm
    from nativeq.compile.schedules.generic import MIN_VECTOR_BITS, dividing_lanes, find_block

    sch = Schedule(func)
    block = find_block(sch, IM2COL_BLOCK)
    if block is None or len(sch.get_child_blocks(sch.get_sblock("root"))) != 1:
        return None
    try:
        n, *rest = sch.get_loops(block)
        ndim = (len(rest) - 1) // 2
        out, taps, channels = rest[:ndim], rest[ndim:2 * ndim], rest[-1]
        sch.parallel(sch.fuse(n, out[0]))
        c = sch.get(channels).extent
        bits = tvm.runtime.DataType(str(sch.get(block).writes[0].source.dtype)).bits
        lanes = max(2, vector_bits // bits)
        width = dividing_lanes(int(c), lanes) if isinstance(c, tirx.IntImm) else None
        if width is not None and width * bits >= MIN_VECTOR_BITS:
            sch.vectorize(sch.split(channels, factors=[None, width])[1])
        elif isinstance(c, tirx.IntImm) and int(c) * int(sch.get(taps[-1]).extent) <= 64:
            sch.unroll(sch.fuse(taps[-1], channels))
    except (s_tir.ScheduleError, RuntimeError, ValueError, TypeError):
        return None
    return sch
