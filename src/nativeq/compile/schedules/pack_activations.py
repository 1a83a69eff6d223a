"""Relax pass: int8 activation x activation matmuls on the dot intrinsic, their rhs packed at run time.

Pipeline position: `kernel_relax_passes(target)`, right after `PackInt8Weights` (which takes the
matmuls with a constant weight; this pass takes those whose rhs is computed at run time), before
LegalizeOps. Input, as `lower_activation_product` emits it for attention's Q.K^T and P.V:

    acc = R.matmul(lhs, rhs, out_dtype="int32")   # lhs: [..., M, K] intrin.act_dtype, rhs: [..., K, N] int8

(rhs possibly behind a permute_dims; M, K, N may be symbolic). Output:

    rhs_p = call_tir(int8_pack_activation, rhs)   # [..., ceil(N/lanes), ceil(K/kstep), lanes, kstep], zero padded
    acc   = call_tir(int8_matmul_packed, lhs, rhs_p)

The pack is marked injective, so FuseOps fuses rhs's producers (its quantize, permute_dims) into
it; `matmul.schedule_int8_pack` vectorizes it one (lanes x kstep) tile at a time. The matmul is
`pack_weights.packed_matmul_te` with a batched packed operand: lhs is zero-padded along K to the
packed K inside the kernel (its `nativeq_int8_rows_pad` block, with the row padding), and the result
is cropped back to N columns (`nativeq_int8_rows_crop`). Zero padding adds zero products, so the
int32 sums are exactly those of the unpacked matmul. The PrimFunc is marked like `PackInt8Weights`
marks its own (`op_pattern=kOutEWiseFusable`, `nativeq.int8_matmul`), so FuseOps still fuses the
epilogue (zero-point corrections, rescale, quantize) and `matmul.py` tensorizes it; if that schedule
does not apply, the generic rule schedules it, still exact.

On the Pi 4 (NEON without dotprod) an rhs with a static N (P·V) is packed for the kernel with k along the lanes in
its form for any int8 operands (`intrinsics.run_time_form_of`: [..., N/4, K/16, 4, 16]).

With the float multiply-add intrinsic (`intrinsics.fma_intrin_for`) the same pass takes float32
activation products (attention a `quantize_dynamic` model keeps in float): packed `[..., N/lanes, K,
lanes, 1]`, run on the packed float kernel.

Matmuls left alone: constant rhs (PackInt8Weights' job), other dtypes, rank < 2, unknown shapes,
K of lhs and rhs not provably equal, rhs batch dims that lhs's do not broadcast them to (rhs may have
fewer batch axes or unit ones, as a relative-position table [H, dk, P] against queries [B, H, T, dk]; not
more).
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, relax, te, tirx, tvm
from nativeq.compile.passes import result_dtype, rewrite_functions
from nativeq.compile.schedules.intrinsics import DotIntrin, run_time_form_of
from nativeq.compile.schedules.pack_weights import call_packed_matmul

PACK_BLOCK = "nativeq_int8_pack"
# NOTE: AnnotateTIROpPattern calls the pack opaque (its clamped reads); it is injective (one input
# element per output element), which lets FuseOps fuse rhs's producers (quantize, permute_dims) into it.
_INJECTIVE = 2


def _ceil_div(value, divisor: int):
    if isinstance(value, (int, tirx.IntImm)):
        return -(-int(value) // divisor)
    return (value + (divisor - 1)) // divisor


def _multiple_of(value, divisor: int) -> bool:
    return isinstance(value, (int, tirx.IntImm)) and int(value) % divisor == 0


def pack_activation_te(w: te.Tensor, lanes: int, kstep: int) -> te.Tensor:
    """[..., K, N] int8 -> [..., ceil(N/lanes), ceil(K/kstep), lanes, kstep], zero where k >= K or n >= N:
    packed[..., n0, k0, n1, k1] = w[..., k0*kstep + k1, n0*lanes + n1] (`weight_formats.pack_weight`, batched).

    The padding is a select on a clamped (always in-bounds) read, not an if_then_else: the schedule
    vectorizes over (n1, k1), and TVM scalarizes a vector loop holding an if_then_else. The clamp
    never reads out of bounds: an iteration exists only when K >= 1 and N >= 1.
    """
    *batch, kdim, n = w.shape
    pad_k, pad_n = not _multiple_of(kdim, kstep), not _multiple_of(n, lanes)

    def compute(*idx):
        *b, n0, k0, n1, k1 = idx
        k, j = k0 * kstep + k1, n0 * lanes + n1
        value = w[(*b, tirx.min(k, kdim - 1) if pad_k else k, tirx.min(j, n - 1) if pad_n else j)]
        inside = [*([k < kdim] if pad_k else []), *([j < n] if pad_n else [])]
        if not inside:
            return value
        return tirx.Select(inside[0] if len(inside) == 1 else tirx.all(*inside), value, tirx.const(0, w.dtype))

    return te.compute((*batch, _ceil_div(n, lanes), _ceil_div(kdim, kstep), lanes, kstep), compute, name=PACK_BLOCK)


def _shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


def is_activation_product(call, intrin: DotIntrin) -> bool:
    """Whether `call` is an int32 matmul of a non-constant int8 rhs (with the float multiply-add intrinsic: a
    float32 matmul of a non-constant rhs) that this pass packs for `intrin`."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.matmul"):
        return False
    if len(call.args) != 2:
        return False
    lhs, rhs = call.args
    if result_dtype(call) != intrin.acc_dtype:
        return False
    if isinstance(rhs, tvm.ir.GenericConst):
        return False
    lhs_shape, rhs_shape = _shape(lhs), _shape(rhs)
    if lhs_shape is None or rhs_shape is None or len(lhs_shape) < 2 or len(rhs_shape) < 2:
        return False
    if str(lhs.ty.dtype) != intrin.act_dtype or str(rhs.ty.dtype) != intrin.weight_dtype:
        return False
    analyzer = Analyzer()
    if not analyzer.can_prove_equal(lhs_shape[-1], rhs_shape[-2]):
        return False
    lhs_batch, rhs_batch = lhs_shape[:-2], rhs_shape[:-2]
    if len(rhs_batch) > len(lhs_batch):
        return False
    # rhs's batch dims broadcast to lhs's (right-aligned, unit axes repeated); the result has lhs's batch dims
    return all(analyzer.can_prove_equal(a, b) or (isinstance(b, tirx.IntImm) and int(b) == 1)
               for a, b in zip(lhs_batch[len(lhs_batch) - len(rhs_batch):], rhs_batch))


@relax.expr_functor.mutator
class _ActivationPacker(relax.PyExprMutator):
    def __init__(self, mod, intrin: DotIntrin):
        super().__init__(mod)
        self.intrin = intrin
        self.packed = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not is_activation_product(call, self.intrin):
            return call
        lhs, rhs = call.args
        intrin = run_time_form_of(self.intrin) or self.intrin
        packed = self.builder_.emit(
            self.builder_.call_te(pack_activation_te, rhs, lanes=intrin.lanes, kstep=intrin.kstep,
                                  primfunc_name_hint="f32_pack_activation" if intrin.is_float else "int8_pack_activation",
                                  primfunc_attrs={"op_pattern": _INJECTIVE})
        )
        self.packed += 1
        return call_packed_matmul(self.builder_, lhs, packed, intrin, n_out=_shape(rhs)[-1])


@tvm.transform.module_pass(opt_level=0, name="nativeq.PackInt8Activations")
class PackInt8Activations:
    """Pack the rhs of int8 activation x activation matmuls at run time for `intrin` (see the module docstring)."""

    def __init__(self, intrin: DotIntrin):
        self.intrin = intrin
        self.packed = 0

    def transform_module(self, mod, _ctx):
        packer = _ActivationPacker(mod, self.intrin)
        new_mod = rewrite_functions(packer)
        self.packed = packer.packed
        return new_mod
