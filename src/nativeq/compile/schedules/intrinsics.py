"""Dot-product tensor intrinsics of the packed matmul kernel, one int8 and one float32 per target family,
registered under nativeq names.

Every intrinsic computes the same thing: `C[i] += sum_k int32(A[k]) * int32(B[i, k])` for a
`lanes x kstep` tile, where `B` is a packed weight tile (row `i` = one output channel, `kstep`
consecutive reduction elements) and `A` the `kstep` activations broadcast to every lane. The
int8 matmul schedule (`matmul.py`) tensorizes the innermost `(lanes, kstep)` loops with the
intrinsic of the target's family; weights are packed `[N/lanes, K/kstep, lanes, kstep]` once at
compile time (`pack_weights.py`).

- `avx512-vnni`: `vpdpbusd` (uint8 x int8, 16 x 4). TVM's own `dot_16x4_vnni` passes the weights
  as `<16 x i32>` where LLVM 22 declares the intrinsic on `<64 x i8>` operands and fails module
  verification; ours reinterprets both operands as `int8x64`/`uint8x64`.
- `avx2`: exact `vpmaddwd` path (uint8 x int8, 8 x 2): activations zero-extended and weights
  sign-extended to int16, then multiply-add pairs into int32. `vpmaddubsw` is NOT used: it
  saturates its int16 pair sums for full-range uint8 x int8 (255*127*2 > 32767).
- `neon` / `sdot` (ARM, int8 x int8, 4 x 4): `smull` + pairwise adds (Pi 4) and `sdot` (Pi 5),
  the sequences of TVM's ARM intrinsics, registered here so that nativeq never has to import
  `tvm.s_tir.tensor_intrin` (which loads every backend's intrinsics).
- `neon` pair sums (`NEON_PAIR_SUM`, Pi 4): 4 instructions per 16 multiply-adds instead of 6:
  `smull` / `smull2` (int16 products), `addp` (int16 sums of two products), `sadalp` (widen and
  accumulate). Exact only when no weight is -128: then |a * w| <= 128 * 127 and two products stay
  within int16 (<= 32512). The weight packing picks it per matmul from the constant weights
  (`pack_weights.py`); an operand packed at run time (activation x activation) keeps `neon`.
- `sdot` over 4 k-steps (`SDOT_LANES`, Pi 5): the activations of 4 consecutive k-steps loaded as one
  16-byte vector, each `sdot` reading its k-step's 4 bytes as an indexed lane (`sdot v.4s, v.16b, v.4b[i]`),
  instead of one broadcast load (`ld1r`, no address offset: plus an add) per row and k-step. Same weight layout
  (4 consecutive [lanes, kstep] tiles); `matmul._grouped_dot` picks it for a dense weight whose K allows it
  (`grouped_of`).
- k along the lanes (`NEON_K_LANES`, Pi 4, a dense weight without -128; `dense_form_of` the pair-sum twin): the
  weight packed [N/4, K/16, 4, 16], so that one 16-byte load holds 16 consecutive k of one output column, as does a
  plain load of an activation row. `smull` + `smlal2` multiply them (two products per int16 lane, the pair-sum
  bound) and `sadalp` widens the 8 sums into 4 int32 partial sums of that output: 3 instructions per 16
  multiply-adds, no broadcast. The partial sums are added once per register tile (`addp`,
  `partial_sums_intrin`): the schedule `rfactor`s the reduction (`matmul._partial_sums_rfactor`). The scheme of
  MLAS's A72 int8 kernel. `NEON_K_LANES_WIDE`, the same without the int16 pair sums (`smull` and `smull2` each
  widened: 4 instructions per 16), is exact for any int8: a weight holding -128 (`dense_form_of(NEON)`) and an
  operand packed at run time (`run_time_form_of`).

The float32 twin (`fma_intrin_for`): `C[i] += A[0] * B[i, 0]`, one vector of `lanes` columns
(16 with AVX-512, 8 with AVX2, 4 with NEON) times one broadcast activation, as `llvm.fmuladd` (a
fused multiply-add where the target has one). It lets the same packed, register-tiled matmul run
the float convolutions and matmuls a model keeps in float (`quantize_dynamic` leaves convolutions
and attention in float): kstep 1, weights packed `[N/lanes, K, lanes, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nativeq.compile._tvm import T, TensorIntrin, tirx


@dataclass(frozen=True)
class DotIntrin:
    """A registered int8 dot-product tensor intrinsic and the tile it covers."""

    name: str  # name in TVM's TensorIntrin registry
    lanes: int  # output channels per call (packed tile rows)
    kstep: int  # reduction elements per call (packed tile columns)
    act_dtype: str  # activation dtype the instruction needs ("uint8" on x86, "int8" on ARM, "float32")
    weight_dtype: str = "int8"
    acc_dtype: str = "int32"
    rows: int = 0  # rows of the register tile (`row_tile`); 0: by lanes
    groups: int = 1  # k-steps per call (`groups * kstep` activations loaded as one vector)
    cols: int = 4  # column blocks of the default register tile (`matmul.register_tile`)
    min_trips: int = 1  # a grouped form: k-loop trips (K / (groups * kstep)) below which it is not used
    partial_sums: int = 1  # int32 partial sums per output the kernel accumulates, added once per tile (`_k_lanes_desc`)
    # independent accumulators the instruction needs to issue at full rate when it adds into its own destination
    # (latency x instructions per cycle: `padded_column_blocks`); 0: a tile of any width issues at full rate
    chained_accumulators: int = 0

    @property
    def is_float(self) -> bool:
        return self.acc_dtype == "float32"


def _desc(lanes: int, kstep: int, act_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (kstep,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, kstep), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kstep], B[0:lanes, 0:kstep])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, kstep):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _grouped_desc(lanes: int, kstep: int, groups: int, act_dtype: str):
    """`_desc` over `groups` consecutive k-steps: the weight tiles [groups, lanes, kstep] as the packing lays
    them out ([N/lanes, K/kstep, lanes, kstep]), the activations as one run of `groups * kstep`."""
    width = groups * kstep

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (width,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (groups, lanes, kstep), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:width], B[0:groups, 0:lanes, 0:kstep])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, width):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vk // kstep, vi, vk % kstep], "int32")

    return desc


def _k_lanes_desc(lanes: int, kstep: int, partial_sums: int):
    """`_desc` with k along the vector lanes: each output accumulates `partial_sums` int32 partial sums, partial
    sum `j` of a call the products at k = h * kstep/2 + 2j + p (h, p in {0, 1}), where `smull` + `smlal2` +
    `sadalp` put them. The matmul schedule adds an output's partial sums once per register tile (`rfactor`)."""
    half = kstep // 2

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (kstep,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, kstep), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes, partial_sums), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:partial_sums], A[0:kstep], B[0:lanes, 0:kstep])
            T.writes(C[0:lanes, 0:partial_sums])
            for i, h, j, p in T.grid(lanes, 2, partial_sums, 2):
                with T.sblock("update"):
                    # NOTE: the partial-sum axis first, as `rfactor` orders the block's iterators
                    vj, vi, vh, vp = T.axis.remap("SSRR", [j, i, h, p])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vh * half + vj * 2 + vp], "int32") * T.cast(
                        B[vi, vh * half + vj * 2 + vp], "int32")

    return desc


def _fma_desc(lanes: int):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes, 1), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:1], B[0:lanes, 0:1])
            T.writes(C[0:lanes])
            # NOTE: no reduce axis: the kernel's k-step loop has extent 1, and TVM drops its block iterator
            for i, _k in T.grid(lanes, 1):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + A[0] * B[vi, 0]

    return desc


def _fma_impl(lanes: int):
    vector = f"float32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes, 1), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:1], B[0:lanes, 0:1])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.fmuladd"),
                T.broadcast(A[0], lanes),
                B.vload([0, 0], dtype=vector),
                C.vload([0], dtype=vector),
                dtype=vector,
            )

    return impl


@T.prim_func(s_tir=True)
def _vnni_16x4_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # NOTE: operands inline, not bound to names: a named value becomes a stack slot that LLVM
        # keeps storing and reloading around every call once the kernel has a symbolic size.
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _avx2_8x2_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (8, 2), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        # (a0, a1) as two int16 in one int32, broadcast to 8 lanes -> a0 a1 a0 a1 ... (16 x int16)
        a_pair = T.reinterpret(T.cast(A.vload([0], "uint8x2"), "int16x2"), dtype="int32")
        a_i16x16 = T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16")
        b_i16x16 = T.cast(B.vload([0, 0], dtype="int8x16"), "int16x16")
        # NOTE: exact: |a*b| <= 255*128, a pair sum fits int32, vpmaddwd never saturates here.
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            a_i16x16,
            b_i16x16,
            dtype="int32x8",
        )


@T.prim_func(s_tir=True)
def _depthwise_quad_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    """4 depthwise taps on 16 channels: int32 accumulators (the register block's, `local`) += the 4 products of
    each channel's uint8 activations (the bytes of one uint32 word) and int8 weights (`depthwise.py`, quad taps)."""
    A = T.match_buffer(a, (16,), "uint32", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        for i, k in T.grid(16, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", T.shift_right(A[vi], T.Cast("uint32", vk * 8)) & T.uint32(255)) * T.Cast(
                    "int32", B[vi, vk])


@T.prim_func(s_tir=True)
def _vnni_depthwise_quad_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (16,), "uint32", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        # NOTE: lane i adds the 4 products of bytes 4i..4i+3: each channel's own taps, no broadcast.
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(A.vload([0], dtype="uint32x16"), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


def _neon(name: str, *args, dtype: str):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}"), *args, dtype=dtype)


def _widened_then_paired(low, high):
    """int32 row sums of the int16 products: each product widened (pairwise) first. Exact for any int8."""
    return _neon("addp.v4i32", _neon("saddlp.v4i32.v8i16", low, dtype="int32x4"),
                 _neon("saddlp.v4i32.v8i16", high, dtype="int32x4"), dtype="int32x4")


def _paired_then_widened(low, high):
    """int32 row sums of the int16 products: two products summed in int16 first, then widened.
    NOTE: exact only for weights in [-127, 127] (the packing checks): |a * w| <= 128 * 127 twice fits int16."""
    return _neon("saddlp.v4i32.v8i16", _neon("addp.v8i16", low, high, dtype="int16x8"), dtype="int32x4")


def _arm_4x4_impl(accumulate):
    """An ARM dot tile: `accumulate(c, a, b)` adds the products of the 4 activations `a` (broadcast to int8x16)
    with the 4x4 weight tile `b` (int8x16, one row per output) to the int32x4 accumulators `c`."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i8x16 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
            b_i8x16 = B.vload([0, 0], dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = accumulate(C.vload([0], dtype="int32x4"), a_i8x16, b_i8x16)

    return impl


def _neon_products(row_sums):
    """The Pi 4 tile: int16 products (`smull`) of the low and high 8 bytes of the activations with those of the weights,
    added to the int32 accumulators by `row_sums(low, high)`. One-k-step tile: `low` holds weight rows 0-1, `high`
    rows 2-3; with k along the lanes (`_neon_k_lanes_impl`), k 0-7 and 8-15 of one output."""

    def accumulate(c, a_i8x16, b_i8x16):
        return c + row_sums(
            _neon("smull.v8i16", T.vectorlow(a_i8x16, dtype="int8x8"), T.vectorlow(b_i8x16, dtype="int8x8"),
                  dtype="int16x8"),
            _neon("smull.v8i16", T.vectorhigh(a_i8x16, dtype="int8x8"), T.vectorhigh(b_i8x16, dtype="int8x8"),
                  dtype="int16x8"),
        )

    return accumulate


def _sdot(c, a_i8x16, b_i8x16):
    """The Pi 5 tile: one `sdot` (four int8 products per int32 lane)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), c, a_i8x16,
                                   b_i8x16, dtype="int32x4")


def _per_k_step(accumulate):
    """The k-steps of a grouped tile one after the other, each by `accumulate(c, a_i8x16, b_i8x16)` (as in
    `_arm_4x4_impl`)."""

    def chain(c, lanes, weights):
        for a_i8x16, b_i8x16 in zip(lanes, weights):
            c = accumulate(c, a_i8x16, b_i8x16)
        return c

    return chain


def _summed_then_widened(low, high):
    """The 4 int32 partial sums of one output from its products at k (`low`) and k + 8 (`high`): summed in int16
    (`smull` + `smlal2`), then pairwise widened (`sadalp`). NOTE: exact only for weights in [-127, 127] (the packing
    checks), as `_paired_then_widened`."""
    return _neon("saddlp.v4i32.v8i16", low + high, dtype="int32x4")


def _each_widened(low, high):
    """`_summed_then_widened` exact for any int8: each half's products pairwise widened (`smull` and `smull2`, two
    `sadalp`)."""
    return _neon("saddlp.v4i32.v8i16", low, dtype="int32x4") + _neon("saddlp.v4i32.v8i16", high, dtype="int32x4")


def _neon_k_lanes_impl(partial_sums):
    """The Pi 4's tile with k along the lanes: per output column i, the products of the 16 activations with its 16
    weights (`_neon_products`, the activations not broadcast) added to its 4 partial sums by `partial_sums(low,
    high)`."""
    accumulate = _neon_products(partial_sums)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 16), "int8", offset_factor=1)
        C = T.match_buffer(c, (4, 4), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4, 0:4], A[0:16], B[0:4, 0:16])
            T.writes(C[0:4, 0:4])
            for i in T.unroll(4):
                C[i, T.ramp(T.int32(0), 1, 4)] = accumulate(C.vload([i, 0], dtype="int32x4"),
                                                             A.vload([0], dtype="int8x16"),
                                                             B.vload([i, 0], dtype="int8x16"))

    return impl


def _partial_sums_desc(lanes: int, partial_sums: int):
    """Each of `lanes` outputs plus its `partial_sums` partial sums (the write-back of a k-along-lanes kernel)."""

    @T.prim_func(s_tir=True)
    def desc(p: T.handle, c: T.handle) -> None:
        P = T.match_buffer(p, (lanes, partial_sums), "int32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:lanes, 0:partial_sums])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, partial_sums):
                with T.sblock("update"):
                    vj, vi = T.axis.remap("RS", [j, i])  # NOTE: the partial-sum axis first, as `rfactor` orders them
                    C[vi] = C[vi] + P[vi, vj]

    return desc


@T.prim_func(s_tir=True)
def _neon_partial_sums_impl(p: T.handle, c: T.handle) -> None:
    P = T.match_buffer(p, (4, 4), "int32", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], P[0:4, 0:4])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + _neon(
            "addp.v4i32",
            _neon("addp.v4i32", P.vload([0, 0], dtype="int32x4"), P.vload([1, 0], dtype="int32x4"), dtype="int32x4"),
            _neon("addp.v4i32", P.vload([2, 0], dtype="int32x4"), P.vload([3, 0], dtype="int32x4"), dtype="int32x4"),
            dtype="int32x4")


def _lanes_impl(chain, groups: int):
    """An ARM dot tile over `groups` k-steps: the activations loaded once (`groups * 4` bytes, a plain load with an
    address offset), each k-step's 4 bytes taken as a lane broadcast to int8x16, the k-steps accumulated by
    `chain(c, lanes, weights)`: `sdot`'s indexed form reads the lane itself (`sdot v.4s, v.16b, v.4b[g]`) instead of
    a broadcast load per row and k-step (`ld1r`, no address offset: plus an add)."""
    width = groups * 4

    def lanes_of(a_i32):
        return [T.reinterpret(tirx.Shuffle([a_i32], [g] * 4), dtype="int8x16") for g in range(groups)]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (width,), "int8", offset_factor=1)
        B = T.match_buffer(b, (groups, 4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:width], B[0:groups, 0:4, 0:4])
            T.writes(C[0:4])
            C[T.ramp(T.int32(0), 1, 4)] = chain(
                C.vload([0], dtype="int32x4"),
                lanes_of(T.reinterpret(A.vload([0], f"int8x{width}"), dtype=f"int32x{groups}")),
                [B.vload([g, 0, 0], dtype="int8x16") for g in range(groups)])

    return impl


def _sdot_indexed(c, a_lane_i8x16, b_i8x16):
    """`_sdot` with the broadcast activations as the third operand, where `sdot`'s indexed form takes them."""
    return _sdot(c, b_i8x16, a_lane_i8x16)


# NOTE: `vpdpbusd` accumulates into its destination: 5 cycles, up to 2 per cycle (Intel server cores). AVX2's sequence
# ends in a 1-cycle `vpaddd`; Arm's `sdot` (2-3 cycles, 2 per cycle) keeps busy on a 6-row tile one block wide.
VNNI = DotIntrin("nativeq_dot_16x4_u8i8i32_vnni", lanes=16, kstep=4, act_dtype="uint8", chained_accumulators=10)
AVX2 = DotIntrin("nativeq_dot_8x2_u8i8i32_avx2", lanes=8, kstep=2, act_dtype="uint8")
NEON = DotIntrin("nativeq_dot_4x4_i8i8i32_neon", lanes=4, kstep=4, act_dtype="int8", rows=4)
NEON_PAIR_SUM = DotIntrin("nativeq_dot_4x4_i8i8i32_neon_pair_sum", lanes=4, kstep=4, act_dtype="int8", rows=4)
SDOT = DotIntrin("nativeq_dot_4x4_i8i8i32_sdot", lanes=4, kstep=4, act_dtype="int8")
# NOTE: 2 column blocks: with 4 the tile's 16 weight vectors (4 k-steps x 4 blocks) and 24 accumulators spill.
# At least 5 trips: with 3 or 4 LLVM unrolls the k loop fully, loads every weight vector of the tile up front and
# spills them (K = 48 and 64: 7-10% more instructions than the one-k-step kernel; K = 80: 12% fewer).
SDOT_LANES = DotIntrin("nativeq_dot_4x16_i8i8i32_sdot_lanes", lanes=4, kstep=4, act_dtype="int8", groups=4, cols=2,
                       min_trips=5)

# NOTE: the Pi 4's fastest kernel for a dense weight without -128 (`smull` + `smlal2` + `sadalp`: 3 instructions per 16
# multiply-adds, no broadcast). Each product pair fits int16 as in NEON_PAIR_SUM.
# One column block (4 outputs) per row: every output holds a vector of partial sums (4 x 4: 16 accumulators).
NEON_K_LANES = DotIntrin("nativeq_dot_4x16_i8i8i32_neon_k_lanes", lanes=4, kstep=16, act_dtype="int8", rows=4, cols=1,
                         partial_sums=4)

# The same for any int8 operands (no int16 pair sums: `smull` + `smull2`, two `sadalp`): operands packed at run time.
NEON_K_LANES_WIDE = DotIntrin("nativeq_dot_4x16_i8i8i32_neon_k_lanes_wide", lanes=4, kstep=16, act_dtype="int8", rows=4,
                              cols=1, partial_sums=4)
NEON_PARTIAL_SUMS = "nativeq_add_partial_sums_4x4_i32_neon"  # its write-back: 4 outputs' partial sums by `addp`
_PARTIAL_SUMS = {NEON_K_LANES.name: NEON_PARTIAL_SUMS, NEON_K_LANES_WIDE.name: NEON_PARTIAL_SUMS}

_BY_FAMILY = {"avx512-vnni": VNNI, "avx2": AVX2, "neon": NEON, "sdot": SDOT}
# faster forms over consecutive k-steps (a dense weight, K a multiple)
_GROUPED = {SDOT.name: SDOT_LANES}
_FOR_WEIGHTS_ABOVE_MIN = {NEON.name: NEON_PAIR_SUM}  # a faster twin, exact when no weight is -128
_DENSE_FORM = {NEON_PAIR_SUM.name: NEON_K_LANES, NEON.name: NEON_K_LANES_WIDE}  # the layout for a dense weight
_RUN_TIME_FORM = {NEON.name: NEON_K_LANES_WIDE}  # the layout an operand packed at run time gets
# 4 depthwise taps on 16 channels (`depthwise.py`, quad taps), by int8 family
DEPTHWISE_QUAD = {"avx512-vnni": "nativeq_depthwise_quad_16x4_u8i8i32_vnni"}
FMA_BY_LANES = {lanes: DotIntrin(f"nativeq_fma_{lanes}x1_f32", lanes=lanes, kstep=1, act_dtype="float32",
                                 weight_dtype="float32", acc_dtype="float32") for lanes in (16, 8, 4)}
_FMA_LANES = {"avx512-vnni": 16, "avx2": 8, "neon": 4, "sdot": 4}  # float32 lanes of the family's vectors
_registered = False


def register_intrinsics() -> None:
    """Register nativeq's intrinsics with TVM (idempotent).

    NOTE: never import `tvm.s_tir.tensor_intrin`: it registers every intrinsic TVM has
    (CUDA, ROCm, Hexagon, ...), which takes minutes on a loaded 2-core machine.
    """
    global _registered
    if _registered:
        return
    TensorIntrin.register(VNNI.name, _desc(16, 4, "uint8"), _vnni_16x4_impl, override=True)
    TensorIntrin.register(AVX2.name, _desc(8, 2, "uint8"), _avx2_8x2_impl, override=True)
    TensorIntrin.register(NEON.name, _desc(4, 4, "int8"), _arm_4x4_impl(_neon_products(_widened_then_paired)), override=True)
    TensorIntrin.register(NEON_PAIR_SUM.name, _desc(4, 4, "int8"), _arm_4x4_impl(_neon_products(_paired_then_widened)),
                          override=True)
    TensorIntrin.register(SDOT.name, _desc(4, 4, "int8"), _arm_4x4_impl(_sdot), override=True)
    TensorIntrin.register(SDOT_LANES.name, _grouped_desc(4, 4, SDOT_LANES.groups, "int8"),
                          _lanes_impl(_per_k_step(_sdot_indexed), SDOT_LANES.groups), override=True)
    TensorIntrin.register(NEON_K_LANES.name, _k_lanes_desc(4, 16, 4), _neon_k_lanes_impl(_summed_then_widened),
                          override=True)
    TensorIntrin.register(NEON_K_LANES_WIDE.name, _k_lanes_desc(4, 16, 4), _neon_k_lanes_impl(_each_widened),
                          override=True)
    TensorIntrin.register(NEON_PARTIAL_SUMS, _partial_sums_desc(4, 4), _neon_partial_sums_impl, override=True)
    for lanes, intrin in FMA_BY_LANES.items():
        TensorIntrin.register(intrin.name, _fma_desc(lanes), _fma_impl(lanes), override=True)
    TensorIntrin.register(DEPTHWISE_QUAD["avx512-vnni"], _depthwise_quad_desc, _vnni_depthwise_quad_impl,
                          override=True)
    _registered = True


def row_tile(intrin: DotIntrin) -> int:
    """Rows of the matmul register tile: accumulators (rows x 4 column blocks) fill ~3/4 of the vector registers
    (NEON without dotprod: 1/2, its products need registers of their own)."""
    return intrin.rows or {16: 6, 8: 3, 4: 6}.get(intrin.lanes, 4)


# NOTE: the reduction (in k-steps) from which `padded_column_blocks` pads: a shorter one hides the accumulators'
# chains in the out-of-order window behind the next tile's (see there).
LONG_REDUCTION_K_STEPS = 64


def padded_column_blocks(n_blocks: int, k_steps: int, intrin: DotIntrin) -> int:
    """Column blocks (of `lanes` columns) to pack a constant weight of `n_blocks` blocks and `k_steps` k-steps as for
    `intrin`'s kernel, whose register tile (`row_tile` rows x up to `intrin.cols` blocks) divides the blocks exactly:
    `n_blocks`, or up to `cols - 1` zero blocks more (the epilogue crops them) when the narrower tiles `n_blocks`
    allows would leave the dot instruction waiting on its accumulators (`chained_accumulators`) over a long
    reduction, and padding costs less work than the wait. 125 blocks of 16 (2000 columns): 126, tiles 3 wide.

    NOTE: measured (AVX-512 VNNI, 2 threads): Wav2Letter's 8000 x 2000 conv got 6 x 1 tiles, 6 accumulators for the
    10 `vpdpbusd` needs; padded to 126 blocks the model ran 0.59-0.66x its time. A short reduction hides the chains
    in the out-of-order window behind the next tile's: padded, the zoo's MobileNetV3 (K = 24) ran 1.05x its time,
    openWakeWord's embedding (K = 144, 216) the same, its melspectrogram (K = 512) 0.81x."""
    if not intrin.chained_accumulators or k_steps < LONG_REDUCTION_K_STEPS:
        return n_blocks
    rows = row_tile(intrin)

    def cost(blocks: int) -> float:
        width = max(d for d in range(1, intrin.cols + 1) if blocks % d == 0)
        return blocks * max(1.0, intrin.chained_accumulators / (rows * width))

    return min(range(n_blocks, n_blocks + intrin.cols), key=lambda blocks: (cost(blocks), blocks))


def intrin_for_weights(intrin: DotIntrin, weights) -> DotIntrin:
    """`intrin`, or its faster twin when the constant int8 `weights` (numpy) allow it (no value is -128)."""
    twin = twin_of(intrin)
    return twin if twin is not None and weights.size and int(weights.min()) > -128 else intrin


def partial_sums_intrin(intrin: DotIntrin) -> str:
    """The intrinsic adding the partial sums of `intrin` (one with `partial_sums` > 1) per output, by name."""
    return _PARTIAL_SUMS[intrin.name]


def grouped_of(intrin: DotIntrin) -> DotIntrin | None:
    """The intrinsic covering `groups` consecutive k-steps of `intrin` per call, or None."""
    return _GROUPED.get(intrin.name)


def twin_of(intrin: DotIntrin) -> DotIntrin | None:
    """The faster twin `intrin_for_weights` may pick for `intrin`, or None."""
    return _FOR_WEIGHTS_ABOVE_MIN.get(intrin.name)


def dense_form_of(intrin: DotIntrin) -> DotIntrin | None:
    """The layout a dense weight packed for `intrin` is better multiplied in (k along the lanes), or None."""
    return _DENSE_FORM.get(intrin.name)


def run_time_form_of(intrin: DotIntrin) -> DotIntrin | None:
    """The layout an operand packed at run time (`pack_activations.py`) is better multiplied in, or None."""
    return _RUN_TIME_FORM.get(intrin.name)


def packed_forms(intrin: DotIntrin) -> list[DotIntrin]:
    """The intrinsics other than the target's `intrin` that an operand may be packed for (`pack_weights.py` picks
    one per matmul from the weight's values and format, `pack_activations.py` the run-time form; the kernel names
    it)."""
    twin = twin_of(intrin)
    forms = [twin, dense_form_of(intrin), run_time_form_of(intrin)]
    if twin is not None:
        forms.append(dense_form_of(twin))
    return list(dict.fromkeys(form for form in forms if form is not None))


def is_twin(intrin: DotIntrin) -> bool:
    """Whether `intrin` is a packed form of some target's intrinsic (`packed_forms`) rather than the target's own."""
    return any(intrin in forms.values() for forms in (_FOR_WEIGHTS_ABOVE_MIN, _DENSE_FORM, _RUN_TIME_FORM))


def fma_intrin_for(target) -> DotIntrin | None:
    """The float32 multiply-add intrinsic for a nativeq Target (by its `int8` family's vector width), or None."""
    lanes = _FMA_LANES.get(getattr(target, "int8", None))
    if lanes is None:
        return None
    register_intrinsics()
    return FMA_BY_LANES[lanes]


def depthwise_quad_intrin_for(target) -> str | None:
    """The quad-tap depthwise intrinsic of a nativeq Target's int8 family (`DEPTHWISE_QUAD`), or None."""
    name = DEPTHWISE_QUAD.get(getattr(target, "int8", None))
    if name is not None:
        register_intrinsics()
    return name


def dot_intrin_for(target) -> DotIntrin | None:
    """The int8 dot intrinsic for a nativeq Target (by its `int8` family), or None."""
    intrin = _BY_FAMILY.get(getattr(target, "int8", None))
    if intrin is not None:
        register_intrinsics()
    return intrin
