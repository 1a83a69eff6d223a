"""Relax pass: an int8 conv with a constant weight becomes im2col + the packed int8 matmul kernel.

Pipeline position: `kernel_relax_passes(target)`, after the int8 rewrite (`compile/passes/`)
and right before `PackInt8Weights`, which then packs the new matmul's weight for the target's
dot intrinsic. Input, as the int8 rewrite emits it (zero-point padding already applied, or
zero padding left to the conv):

    acc = R.nn.conv1d(x, W, strides, padding, dilation, groups=1, out_dtype="int32")   # NCW / OIW
    acc = R.nn.conv2d(...)                                                              # NCHW / OIHW

Output:

    cols = im2col(x)                       # [N, OW, C*KW] (conv2d: [N, OH*OW, C*KH*KW]), zero padded
    acc  = R.matmul(cols, W2, out_dtype="int32")    # W2 = W reshaped to [C*K..., O], a constant
    acc  = R.permute_dims(R.reshape(acc, ...))      # back to NCW / NCHW for the epilogue

TVM's legalized int8 conv is a scalar loop nest that the default schedule can only
parallelize; as a matmul it runs on the tensorized VNNI / AVX2 / sdot / NEON kernel
(the benchmark encoder's two subsampling convs went from 5 ms to well under 1 ms). Grouped and
depthwise convs stay convs (their reduction is too short for the dot intrinsics), and so does
anything the packed kernel cannot tile (output channels not a multiple of the intrinsic's lanes).
The reduction C*K is zero-padded to the intrinsic's k-step, with zero weight rows.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, te, tirx, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.schedules.intrinsics import DotIntrin

# NOTE: opaque to FuseOps: fused into its producer (e.g. a requantize), im2col would recompute
# the producer once per kernel tap; materializing the 8-bit input once is cheaper.
_OPAQUE = 8  # TVM OpPatternKind.kOpaque
_CONVS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW")}


def _rewritable(call, intrin: DotIntrin) -> bool:
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or call.op.name not in _CONVS:
        return False
    x, w = call.args
    attrs = call.attrs
    layouts = _CONVS[call.op.name]
    return (
        isinstance(w, tvm.ir.GenericConst)
        and str(attrs.out_dtype) == "int32"
        and str(x.ty.dtype) == intrin.act_dtype
        and str(w.ty.dtype) == "int8"
        and int(attrs.groups) == 1
        and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == (layouts[0], layouts[1], layouts[0])
        and int(w.ty.shape[0]) % intrin.lanes == 0
    )


def im2col_te(x: te.Tensor, kernel: tuple[int, ...], out_spatial, strides, dilation, padding):
    """[N, C, *S] -> [N, *out_spatial, C, *kernel]: cols[n, *o, c, *k] = x[n, c, *(o*stride + k*dilation - pad)].

    Positions outside the input (padding) read 0. No div/mod in the index: each output row is a
    plain strided gather the vectorizer handles.
    """
    batch, channels, *spatial = x.shape
    ndim = len(kernel)
    padding_before, padded = padding[:ndim], any(padding)

    def compute(n, *index):
        out_index, c, kernel_index = index[:ndim], index[ndim], index[ndim + 1:]
        position = [o * s + k * d - pad
                    for o, k, s, d, pad in zip(out_index, kernel_index, strides, dilation, padding_before)]
        if not padded:  # every position is inside the input
            return x[(n, c, *position)]
        inside = tirx.const(True, "bool")
        for i, extent in zip(position, spatial):
            inside = tirx.all(inside, i >= 0, i < extent)
        safe = [tirx.max(tirx.min(i, extent - 1), 0) for i, extent in zip(position, spatial)]
        return tirx.if_then_else(inside, x[(n, c, *safe)], tirx.const(0, x.dtype))

    return te.compute((batch, *out_spatial, channels, *kernel), compute, name="im2col")


@relax.expr_functor.mutator
class _ConvAsMatmul(relax.PyExprMutator):
    def __init__(self, mod, intrin: DotIntrin):
        super().__init__(mod)
        self.intrin = intrin
        self.rewritten = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not _rewritable(call, self.intrin):
            return call
        x, w = call.args
        attrs = call.attrs
        weight = w.value.numpy()  # [O, C, *K]
        out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
        reduction = int(np.prod(weight.shape[1:]))
        padded_reduction = -(-reduction // self.intrin.kstep) * self.intrin.kstep
        w2 = np.zeros((padded_reduction, out_channels), np.int8)
        w2[:reduction] = weight.reshape(out_channels, reduction).T
        ndim = len(kernel)
        out_shape = call.ty.shape.values  # [N, O, *out_spatial]
        out_spatial = list(out_shape[2:])
        padding = [int(p) for p in attrs.padding]
        cols = self.builder_.emit(
            self.builder_.call_te(
                im2col_te, x, kernel=kernel, out_spatial=out_spatial,
                strides=[int(s) for s in attrs.strides], dilation=[int(d) for d in attrs.dilation],
                padding=padding,
                primfunc_name_hint="im2col", primfunc_attrs={"op_pattern": _OPAQUE},
            )
        )
        rows = 1
        for extent in out_spatial:
            rows = rows * extent
        cols = relax.op.reshape(cols, [out_shape[0], rows, reduction])
        if padded_reduction != reduction:  # the dot intrinsic's k-step: zero columns x zero weight rows
            cols = relax.op.nn.pad(cols, [0, 0, 0, 0, 0, padded_reduction - reduction])
        acc = self.builder_.emit(relax.op.matmul(cols, relax.const(w2, "int8"), out_dtype="int32"))
        acc = relax.op.reshape(acc, [out_shape[0], *out_spatial, out_channels])
        self.rewritten += 1
        return relax.op.permute_dims(acc, [0, ndim + 1, *range(1, ndim + 1)])


@tvm.transform.module_pass(opt_level=0, name="nativeq.Int8ConvAsMatmul")
class Int8ConvAsMatmul:
    """Rewrite int8 convs with constant weights into im2col + int8 matmul (see the module docstring)."""

    def __init__(self, intrin: DotIntrin):
        self.intrin = intrin
        self.rewritten = 0

    def transform_module(self, mod, _ctx):
        mutator = _ConvAsMatmul(mod, self.intrin)
        new_mod = rewrite_functions(mutator)
        self.rewritten = mutator.rewritten
        return new_mod
