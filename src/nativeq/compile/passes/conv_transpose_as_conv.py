"""ConvTransposeAsConv: a transposed convolution becomes a stride-1 convolution, then an interleave and a crop.

Where it sits: first in the int8 passes, right after ONNX import, so that the convolution it writes meets the
int8 lowering (`LowerQDQToInteger`) like any other: a QDQ ConvTranspose runs as an int8 GEMM, a float one as
the float convolution kernels.

TVM computes conv{1,2}d_transpose as a convolution over the input dilated by the stride (stride - 1 zeros
between samples, most of its products zero) on the generic path: a speech separation model's decoder
(ConvTranspose1d, 16 taps, stride 8) spent 70% of its time there. Polyphase form, per spatial axis with stride
s and K taps (zero taps appended so that m = ceil((K + output_padding) / s) taps cover each phase):

    y[n, o, q*s + r] = sum_c sum_j x[n, c, q - j] * w[c, o, j*s + r]             (j < m, r < s)
                     = conv(x, w')[n, (r, o), q],  w'[(r, o), c, m-1-j] = w[c, o, j*s + r],  padding m - 1

then the s phases (r, o) interleave into [n, o, q*s + r] and the result is cropped to ONNX's output
(`pads` at the start, the output length `(T - 1) s + K - pads + output_padding`). The same products: a float
model gets its float sums in another order, a quantized one exact int32 sums. The weight must be a constant
or a dequantized constant (per tensor or per output channel): the phases of an output channel share its scale
and zero point. Grouped and dilated transposed convolutions are left to TVM.

The conv's output channels are phase-major, (r, o): once the conv runs channels-last (a GEMM whose columns are its
channels), an output position's channels o are one contiguous run of a phase's columns, so the interleave reads
whole vectors (channel-major, (o, r), it gathered every s-th column).
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, te, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.passes.qdq_sites import op_name, resolve, static_value

_TRANSPOSED = {"relax.nn.conv1d_transpose": ("NCW", "IOW", relax.op.nn.conv1d),
               "relax.nn.conv2d_transpose": ("NCHW", "IOHW", relax.op.nn.conv2d)}


def _ints(values) -> list[int]:
    return [int(v) for v in values]


class _Weight:
    """A constant transposed-convolution weight [C, O, *K]: float32, or integers with their dequantization."""

    def __init__(self, values: np.ndarray, scale=None, zero_point=None):
        self.values, self.scale, self.zero_point = values, scale, zero_point

    @classmethod
    def of(cls, expr, var2val) -> "_Weight | None":
        value = resolve(expr, var2val)
        if op_name(value) != "relax.dequantize" or str(value.attrs.out_dtype) != "float32":
            array = static_value(value, var2val)
            return cls(array) if array is not None and array.dtype == np.float32 else None
        data, scale, zero_point = (static_value(a, var2val) for a in value.args)
        if data is None or scale is None or zero_point is None:
            return None
        axis = int(value.attrs.axis) % data.ndim
        for param in (scale, zero_point):
            if param.size > 1 and (param.ndim != 1 or axis != 1 or param.size != data.shape[1]):
                return None  # per channel along an axis other than the output channels
        return cls(data, scale, zero_point)

    def zero_taps_value(self) -> np.ndarray:
        """The stored value of a zero tap, broadcastable to [C, O, 1...]: 0, or the zero point per output channel."""
        if self.zero_point is None:
            return np.zeros((), self.values.dtype)
        shape = [1, -1] + [1] * (self.values.ndim - 2) if self.zero_point.size > 1 else ()
        return self.zero_point.reshape(shape).astype(self.values.dtype)

    def as_conv(self, polyphase: np.ndarray, phases: int, builder):
        """The convolution's weight expression: `polyphase` [(phases, O), C, *m], dequantized like the original."""
        if self.scale is None:
            return relax.const(polyphase)

        def per_phase(param):
            return relax.const(np.tile(param.reshape(-1), phases) if param.size > 1 else param)

        return builder.emit(relax.op.dequantize(relax.const(polyphase), per_phase(self.scale),
                                                per_phase(self.zero_point), axis=0, out_dtype="float32"))


def polyphase_weight(weight: np.ndarray, strides: list[int], taps: list[int], fill) -> np.ndarray:
    """w[c, o, *k] -> w'[(*r, o), c, *(m - 1 - j)] with k = j * s + r per axis (missing taps = `fill`)."""
    channels_in, channels_out, *kernel = weight.shape
    padded = np.broadcast_to(fill, (channels_in, channels_out, *[m * s for m, s in zip(taps, strides)])).copy()
    padded[(slice(None), slice(None), *[slice(0, k) for k in kernel])] = weight
    # [C, O, j0, r0, j1, r1, ...] -> [r0, r1, ..., O, C, j0, j1, ...], taps j reversed
    split = padded.reshape(channels_in, channels_out, *[d for m, s in zip(taps, strides) for d in (m, s)])
    spatial = len(strides)
    order = [3 + 2 * i for i in range(spatial)] + [1, 0] + [2 + 2 * i for i in range(spatial)]
    phased = split.transpose(order)[(Ellipsis, *[slice(None, None, -1)] * spatial)]
    return np.ascontiguousarray(phased.reshape(channels_out * int(np.prod(strides)), channels_in, *taps))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        replacement = self._rewrite(call)
        if replacement is None:
            return call
        self.rewritten += 1
        return replacement

    def _rewrite(self, call):
        layouts = _TRANSPOSED.get(op_name(call))
        if layouts is None:
            return None
        data_layout, kernel_layout, conv = layouts
        attrs = call.attrs
        if (str(attrs.data_layout) != data_layout or str(attrs.kernel_layout) != kernel_layout
                or str(attrs.out_layout) not in (data_layout, "") or int(attrs.groups) != 1
                or any(d != 1 for d in _ints(attrs.dilation)) or str(call.ty.dtype) != "float32"):
            return None
        if not isinstance(getattr(call.ty, "shape", None), relax.ShapeExpr):
            return None  # the output shape is not known here (e.g. the input a concat of unprovably equal lengths)
        weight = _Weight.of(call.args[1], self.var2val)
        if weight is None or weight.values.ndim != len(data_layout):
            return None
        x = call.args[0]
        strides, output_padding = _ints(attrs.strides), _ints(attrs.output_padding)
        spatial = len(strides)
        padding = _ints(attrs.padding)
        begin = padding[:spatial]
        kernel = list(weight.values.shape[2:])
        taps = [-(-(k + p) // s) for k, p, s in zip(kernel, output_padding, strides)]
        phases = int(np.prod(strides))
        polyphase = polyphase_weight(weight.values, strides, taps, weight.zero_taps_value())
        builder = self.builder_
        w = weight.as_conv(polyphase, phases, builder)
        y = builder.emit(conv(x, w, strides=1, padding=[m - 1 for m in taps] * 2, out_dtype="float32"))
        return builder.call_te(interleave_phases_te, y, list(call.ty.shape.values), strides=strides, begin=begin,
                               primfunc_name_hint="interleave_phases")


def interleave_phases_te(y, shape, strides: list[int], begin: list[int]):
    """out[n, o, *t] = y[n, (*((t + begin) % s), o), *((t + begin) // s)]: the phases of a polyphase convolution
    interleaved along each spatial axis, from `begin` on, for the output `shape`."""
    channels = shape[1]

    def value(n, o, *t):
        shifted = [ti + b for ti, b in zip(t, begin)]
        phase = 0
        for ti, s in zip(shifted, strides):
            phase = phase * s + ti % s
        return y(n, phase * channels + o, *[ti // s for ti, s in zip(shifted, strides)])

    return te.compute(shape, value, name="interleave_phases")


@tvm.transform.module_pass(opt_level=0, name="nativeq.ConvTransposeAsConv")
class ConvTransposeAsConv:
    """Rewrite transposed convolutions with constant weights as stride-1 convolutions (see the module docstring)."""

    def __init__(self):
        self.rewritten = 0

    def transform_module(self, mod, _ctx):
        rewriter = _Rewriter(mod)
        new_mod = rewriter.transform()
        self.rewritten = rewriter.rewritten
        return new_mod
