"""Relax pass: pack the constant weights of int8 matmuls for the target's dot intrinsic.

Pipeline position: `kernel_relax_passes(target)`, after the int8 rewrite (`compile/passes/`)
and before LegalizeOps. Input, as the int8 rewrite emits it:

    y = R.matmul(x, W, out_dtype="int32")   # x: [..., K] uint8 (x86) / int8 (ARM), W: int8 constant [K, N]

Output: the weight packed once, at compile time, into the tile layout of the intrinsic
(`[N/lanes, K/kstep, lanes, kstep]`, see `intrinsics.py`) in the format its values allow
(`weight_formats.py`: dense, block-sparse with a per-column-block tile list, 4-bit two tiles per
byte), and the matmul replaced by a `call_tir` to a PrimFunc reading the packed constant(s). The
PrimFunc is marked `op_pattern=kOutEWiseFusable`, so FuseOps still fuses its elementwise epilogue
(requantize, bias, cast) into it, and carries the `nativeq.int8_matmul` attribute that the TIR
schedule rule (`matmul.py`) keys on. A 4-bit weight is unpacked inside the kernel, one k-step of
the register tile at a time (`nativeq_int4_unpack`); a sparse one is multiplied tile by tile
through its list, so skipped tiles cost neither bytes nor dot instructions.

An N that is not a multiple of the intrinsic's lanes (a 12-class head) gets zero weight columns,
cropped in the kernel; a K that is not a multiple of its k-step, zero weight rows (x is zero-padded
per tile). Matmuls the intrinsic cannot cover (non-constant weights, wrong dtypes) are left alone
and get the generic schedule.

Float32 matmuls with a constant weight (what `quantize_dynamic` and float models keep in float, and
the float convs `channels_last.py` turns into matmuls) go through the same pass with the target's
float multiply-add intrinsic (`intrinsics.fma_intrin_for`, kstep 1): the same kernel, register tile
and fused epilogue, dense weights only. The reduction block keeps the int8 kernel's name
(`nativeq_int8_matmul`): the schedule, the tuner and the tuning records key on it.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, relax, te, tvm
from nativeq.compile.passes import result_dtype, rewrite_functions
from nativeq.compile.schedules.conv_as_matmul import IM2COL_ATTR, IM2COL_CHANNELS, ConvRows, implicit_im2col
from nativeq.compile.schedules.intrinsics import (DotIntrin, dense_form_of, intrin_for_weights, is_twin, packed_forms,
                                                  padded_column_blocks, row_tile)
from nativeq.compile.schedules.weight_formats import (TILE_LIST_DTYPE, WIDE_SPARSE_MAX_DENSITY, PackedWeight,
                                                      pack_for_kernel, to_int4, with_wider_tiles)

# NOTE: TVM's OpPatternKind enum: kElemWise=0, kBroadcast=1, kInjective=2, kCommReduce=3, kOutEWiseFusable=4.
_OUT_EWISE_FUSABLE = 4
INT8_MATMUL_ATTR = "nativeq.int8_matmul"
REDUCTION_BLOCK = "nativeq_int8_matmul"
PACKED_FOR = "nativeq.packed_for"  # reduction block annotation: the intrinsic a twin-packed operand needs
ROWS_PAD_BLOCK = "nativeq_int8_rows_pad"
ROWS_CROP_BLOCK = "nativeq_int8_rows_crop"
INT4_UNPACK_BLOCK = "nativeq_int4_unpack"
LISTED_GATHER_BLOCK = "nativeq_int8_listed_gather"


def packed_matmul_te(x: te.Tensor, wp: te.Tensor, lanes: int, kstep: int, row_tile: int, n_out=None,
                     blocks: te.Tensor | None = None, int4_tiles: int | None = None, k_in: int | None = None,
                     list_group: int = 1, list_unit: int | None = None, intrin_name: str = "",
                     im2col: dict | None = None) -> te.Tensor:
    """int32 (float32: float32) matmul of `x` [..., rows, K] with a packed operand `wp` [*wbatch, N/lanes, K/kstep, lanes, kstep].

    `wbatch` is empty (a constant weight shared by every batch entry of `x`) or batch dims `x`'s broadcast to
    (an activation packed at run time, `pack_activations.py`: one packed matrix per batch entry it has).
    When `rows` is symbolic or not a multiple of `row_tile`, or `x`'s K is shorter than the packed
    K (padded to the k-step), `x` is zero-padded (`nativeq_int8_rows_pad`, computed per tile by the
    schedule) and the result cropped back to `rows` x `n_out` (`nativeq_int8_rows_crop`, inlined into
    the epilogue): TVM's tensorize rejects the predicate a row tail would otherwise put on the
    tensorized block. A single row behind batch dims (`[T, 1, K]`, time-major) is tiled along
    the last batch axis instead (the result keeps the unit axis). `n_out` (default: the packed N) is
    the real number of columns when the packed N was zero-padded to a multiple of `lanes`.

    Constant weights may come in the compressed formats of `weight_formats.py`: `int4_tiles` = W when
    `wp` holds two tiles per byte (unpacked in the kernel, `nativeq_int4_unpack`), `blocks`
    [N/lanes/list_group, W] int16 when `wp` holds only the listed tiles of each column block (one list per
    `list_group` column blocks; the reduction then runs over the W listed k-steps; `k_in` is the padded K
    the activation is read with).

    With `list_unit` < kstep (a kernel with k along the lanes) each tile joins kstep/list_unit listed blocks of
    `list_unit` inputs: the activation's listed blocks are gathered into contiguous rows first (one per list,
    `nativeq_int8_listed_gather`), which the reduction reads like a dense activation.

    `intrin_name` (annotated on the reduction block, which FuseTIR keeps) names the intrinsic the
    operand was packed for when the weights chose it (`intrinsics.intrin_for_weights`).

    With `im2col` (a conv's geometry, `conv_as_matmul.implicit_im2col`) `x` is the conv's channels-last input
    [N, *S, C] and the matmul's rows are gathered from it inside the kernel: the rows block reads each row's taps
    (`conv_as_matmul.ConvRows`), and the schedule builds a register tile's rows once, for all its column tiles,
    on the stack (an implicit im2col: no [N, rows, taps x C] buffer in memory).
    """
    if int4_tiles is not None:
        wp = _unpack_int4(wp, int4_tiles)
    *wbatch, n_blocks, k_blocks, _, _ = wp.shape
    n, kdim = n_blocks * lanes, k_blocks * kstep  # kdim: the reduction's extent (W k-steps when sparse)
    x_kdim = kdim if blocks is None else k_in
    rows_view = None if im2col is None else ConvRows(x, **im2col)  # x: the conv's input, the rows gathered from it
    *batch, rows, x_k = x.shape if rows_view is None else rows_view.shape
    if len(wbatch) > len(batch):
        raise ValueError(f"packed operand batch {wbatch} has more axes than the activation batch {batch}")
    analyzer = Analyzer()
    source = x
    read = source.__getitem__ if rows_view is None else rows_view.read
    # A single row behind batch dims (time-major [T, 1, K], the layout torch's MultiheadAttention exports):
    # the last batch axis becomes the row axis, so the register tiles hold T rows instead of 1 + padding.
    unit_rows = (rows_view is None and not wbatch and bool(batch) and isinstance(rows, tvm.tirx.IntImm)
                 and int(rows) == 1)
    if unit_rows:
        *batch, rows = batch

        def read(index):
            return source[(*index[:-1], 0, index[-1])]

    pad_rows = unit_rows or not (isinstance(rows, tvm.tirx.IntImm) and int(rows) % row_tile == 0)
    pad_k = not analyzer.can_prove_equal(x_k, x_kdim)
    if pad_rows or pad_k or rows_view is not None:
        padded_rows = (rows + (row_tile - 1)) // row_tile * row_tile if pad_rows else rows

        def pad(*i):
            zero = tvm.tirx.const(0, source.dtype)
            if pad_k:  # select on a clamped read: the vectorized K loop stays vectorized (x_k >= 1 here)
                value = tvm.tirx.Select(i[-1] < x_k, read((*i[:-1], tvm.tirx.min(i[-1], x_k - 1))), zero)
            else:
                value = read(i)
            return tvm.tirx.if_then_else(i[-2] < rows, value, zero) if pad_rows else value

        attrs = None if rows_view is None else {IM2COL_CHANNELS: rows_view.channels}
        x = te.compute((*batch, padded_rows, x_kdim), pad, name=ROWS_PAD_BLOCK, attrs=attrs)
    k = te.reduce_axis((0, kdim), name="k")
    acc_dtype = "float32" if wp.dtype == "float32" else "int32"
    gathered = None
    if blocks is not None and list_unit is not None and list_unit != kstep:
        unit = list_unit

        def gather(*i):
            block = _listed_block(blocks[i[-2], i[-1] // unit], x_kdim // unit)
            return x[(*i[:-2], block * unit + i[-1] % unit)]

        gathered = te.compute((*x.shape[:-1], blocks.shape[0], kdim), gather, name=LISTED_GATHER_BLOCK)

    def compute(*idx):
        *row_idx, j = idx
        w_batch = _broadcast_index(row_idx[:-1], batch, wbatch)
        if gathered is not None:
            activation = gathered[(*row_idx, j // (lanes * list_group), k)]
        else:
            listed = None if blocks is None else blocks[j // (lanes * list_group), k // kstep]
            x_k = k if listed is None else _listed_block(listed, x_kdim // kstep) * kstep + k % kstep
            activation = x[(*row_idx, x_k)]
        return te.sum(
            activation.astype(acc_dtype) * wp[(*w_batch, j // lanes, k // kstep, j % lanes, k % kstep)].astype(acc_dtype),
            axis=k,
        )

    acc = te.compute((*x.shape[:-1], n), compute, name=REDUCTION_BLOCK,
                     attrs={PACKED_FOR: intrin_name} if intrin_name else None)
    crop_cols = n_out is not None and not analyzer.can_prove_equal(n_out, n)
    if not pad_rows and not crop_cols:
        return acc
    cols = n_out if crop_cols else n
    if unit_rows:
        return te.compute((*batch, rows, 1, cols), lambda *i: acc[(*i[:-2], i[-1])], name=ROWS_CROP_BLOCK)
    return te.compute((*batch, rows, cols), lambda *i: acc[i], name=ROWS_CROP_BLOCK)


def _broadcast_index(index, batch, wbatch) -> list:
    """The packed operand's batch index for the activation's batch `index`, numpy's broadcasting: `wbatch`
    right-aligned with `batch`, a unit axis of `wbatch` read at 0 (the relative-position table [H, dk, P] of
    queries [B, H, T, dk])."""
    index = list(index)[len(batch) - len(wbatch):]
    return [0 if _is_one(w) and not _is_one(x) else i for i, w, x in zip(index, wbatch, batch[len(batch) - len(wbatch):])]


def _is_one(dim) -> bool:
    return isinstance(dim, (int, tvm.tirx.IntImm)) and int(dim) == 1


def _listed_block(block, k_blocks: int):
    """A sparse weight's listed k-step index (int16) clamped to [0, k_blocks): a no-op on valid lists, it
    bounds the activation region a tile reads, which the schedule needs to build the tile's rows. (Signed: a
    clamp of an unsigned index loses its lower bound to TVM's simplifier.)"""
    return tvm.tirx.max(tvm.tirx.min(block.astype("int32"), k_blocks - 1), 0).astype("int64")


def _unpack_int4(packed: te.Tensor, tiles: int) -> te.Tensor:
    """[N/lanes, ceil(W/2), lanes, kstep] two 4-bit tiles per byte -> [N/lanes, W, lanes, kstep] int8
    (`weight_formats.pack_int4_pairs`: tile 2i in the low nibble, sign-extended by shifts)."""
    n_blocks, _, lanes, kstep = packed.shape

    def unpack(n0, w, n1, k1):
        byte = packed[n0, w // 2, n1, k1]
        four = tvm.tirx.const(4, "int8")
        low_first = tvm.tirx.Select(w % 2 == 0, byte << four, byte)
        return low_first >> four  # arithmetic shift: sign-extends the nibble

    return te.compute((n_blocks, tiles, lanes, kstep), unpack, name=INT4_UNPACK_BLOCK)


def packed_intrin(sch, intrin: DotIntrin) -> DotIntrin:
    """The intrinsic the packed matmul of Schedule `sch` was packed for: the target's `intrin`, or its twin
    when `intrin_for_weights` picked it (named in the reduction block's annotation)."""
    annotations = sch.get(sch.get_sblock(REDUCTION_BLOCK)).annotations
    name = str(annotations[PACKED_FOR]) if PACKED_FOR in annotations else ""
    return next((form for form in packed_forms(intrin) if form.name == name), intrin)


def _is_packable(call: relax.Call, intrin: DotIntrin) -> bool:
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.matmul"):
        return False
    x, w = call.args
    x_type, w_type = x.ty, w.ty
    if not isinstance(w, tvm.ir.GenericConst) or result_dtype(call) != intrin.acc_dtype:
        return False
    if x_type.dtype != intrin.act_dtype or w_type.dtype != intrin.weight_dtype or w_type.ndim != 2 or x_type.ndim < 1:
        return False
    k = int(w_type.shape.values[0])
    x_k = x_type.shape.values[-1] if isinstance(x_type.shape, relax.ShapeExpr) else None
    return isinstance(x_k, tvm.tirx.IntImm) and int(x_k) == k


def call_packed_matmul(builder, x, packed, intrin: DotIntrin, n_out=None, weight: PackedWeight | None = None,
                       im2col: dict | None = None):
    """`builder.call_te` of `packed_matmul_te`, marked so FuseOps fuses its epilogue and matmul.py tensorizes it.

    `packed`: a run-time packed activation (`pack_activations.py`), or None with `weight`, a constant
    weight in one of the formats of `weight_formats.py`. `im2col`: `x` is a conv's input, the rows gathered
    from it in the kernel (`conv_as_matmul.implicit_im2col`)."""
    formats = {} if im2col is None else {"im2col": im2col}
    if weight is not None:
        packed = relax.const(weight.values, str(weight.values.dtype))
        if weight.blocks is not None:
            formats["blocks"] = relax.const(weight.blocks, TILE_LIST_DTYPE)
            formats["k_in"] = weight.k
            formats["list_group"] = weight.group
            formats["list_unit"] = weight.list_unit
        if weight.int4:
            formats["int4_tiles"] = weight.tiles
        if weight.n != weight.values.shape[0] * intrin.lanes:
            n_out = weight.n
    return builder.call_te(
        packed_matmul_te,
        x,
        packed,
        lanes=intrin.lanes,
        kstep=intrin.kstep,
        row_tile=row_tile(intrin),
        n_out=n_out,
        intrin_name=intrin.name if is_twin(intrin) else "",
        **formats,
        primfunc_name_hint="f32_matmul_packed" if intrin.is_float else "int8_matmul_packed",
        primfunc_attrs={
            "op_pattern": _OUT_EWISE_FUSABLE,
            INT8_MATMUL_ATTR: f"{intrin.name}:{intrin.lanes}x{intrin.kstep}",
        },
    )


def _in_wider_tiles(values, weight: PackedWeight, form: DotIntrin, allow_int4: bool) -> PackedWeight:
    """`weight` (packed for the target's tile) repacked for `form`, a kernel with k along the lanes: its listed blocks
    joined into `form.kstep` wide tiles (`weight_formats.with_wider_tiles`) when that density pays, else dense."""
    if weight.blocks is not None:
        sparse = with_wider_tiles(pack_for_kernel(values, weight.lanes, weight.kstep, allow_int4=False), form.kstep)
        if sparse.density <= WIDE_SPARSE_MAX_DENSITY:
            return to_int4(sparse) if weight.int4 else sparse
    return pack_for_kernel(values, form.lanes, form.kstep, allow_sparse=False, allow_int4=allow_int4)


def _without_unused_im2col(mod):
    """`mod` without the im2col kernels no Relax function calls any more (their convs gather their rows in the
    matmul kernel)."""
    used = {gv for func in mod.functions.values() if isinstance(func, relax.Function)
            for gv in relax.analysis.all_global_vars(func)}
    mod = mod.clone()
    for gv, func in list(mod.functions_items()):
        if gv not in used and func.attrs is not None and IM2COL_ATTR in func.attrs:
            del mod[gv]
    return mod


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod, intrin: DotIntrin, sparse: bool, int4: bool):
        super().__init__(mod)
        self.intrin = intrin
        self.sparse, self.int4 = sparse, int4
        self.packed = 0
        self.formats: list[str] = []
        self.dropped_im2col = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not _is_packable(call, self.intrin):
            return call
        x, w = call.args
        # zero rows up to whole k-steps (the kernel zero-pads x's K to match) and zero columns up to whole
        # vectors, or register tiles (the kernel's epilogue crops them); 4-bit / block-sparse when the values allow
        integer = not self.intrin.is_float
        values = w.value.numpy()
        intrin = intrin_for_weights(self.intrin, values) if integer else self.intrin
        k, n = values.shape
        n_blocks = padded_column_blocks(-(-n // intrin.lanes), -(-k // intrin.kstep), intrin)
        weight = pack_for_kernel(values, intrin.lanes, intrin.kstep, allow_sparse=self.sparse and integer,
                                 allow_int4=self.int4 and integer, n_blocks=n_blocks)
        dense_form = dense_form_of(intrin)
        if dense_form is not None:
            intrin, weight = dense_form, _in_wider_tiles(values, weight, dense_form, self.int4 and integer)
        self.packed += 1
        self.formats.append(weight.format_name())
        im2col = None
        source = implicit_im2col(self.lookup_binding, self.builder_.get(), x) if weight.blocks is None else None
        if source is not None:  # the conv's rows gathered in the kernel: its im2col kernel is left unused
            x, im2col = source
            self.dropped_im2col += 1
        return call_packed_matmul(self.builder_, x, None, intrin, weight=weight, im2col=im2col)


@tvm.transform.module_pass(opt_level=0, name="nativeq.PackInt8Weights")
class PackInt8Weights:
    """Pack constant int8 (or, with a float intrinsic, float32) matmul weights for `intrin` (see the module docstring).

    `sparse` / `int4` False keep every weight dense / 8-bit (benchmarks compare the formats).
    """

    def __init__(self, intrin: DotIntrin, sparse: bool = True, int4: bool = True):
        self.intrin = intrin
        self.sparse, self.int4 = sparse, int4
        self.packed = 0
        self.formats: list[str] = []  # per packed weight, e.g. "int4 block-sparse 25%"

    def transform_module(self, mod, _ctx):
        packer = _Packer(mod, self.intrin, self.sparse, self.int4)
        new_mod = rewrite_functions(packer, remove_unused=True)
        if packer.dropped_im2col:
            new_mod = _without_unused_im2col(new_mod)
        self.packed = packer.packed
        self.formats = packer.formats
        return new_mod
