"""FoldBiasIntoAccumulator: move a bias Add into the int32 accumulator when that is exact.

Where it sits: right after LowerQDQToInteger (it matches that pass's output), before FoldConstant.

    y = R.multiply(R.astype(R.subtract(acc, corr), "float32"), scale)     # LowerQDQToInteger
    z = R.add(y, bias)                                                    # bias: a compile-time constant
becomes
    z = R.multiply(R.astype(R.subtract(acc, corr - bias_q), "float32"), scale)

with bias_q = round(bias / scale), folded only when `bias_q * scale == bias` exactly in float32,
i.e. the bias is an integer in the accumulator's scale sx*sw. That is the case for QLinearConv's int32
bias and for exporters that quantize bias to int32 with scale sx*sw (ORT `quantize_static`): the fold
then adds no rounding at all and keeps the float epilogue one op shorter.

A float bias that is not on that grid stays a float add: rounding it into the accumulator moves each
output by up to 0.5*sx*sw, which flips QuantizeLinear ties vs ONNX Runtime's reference (unoptimized)
path. Measured on the float-bias QDQ models of tests/test_pass_int8_numerics.py (matmul, conv1d incl.
grouped, conv2d; u8 and s8): `require_exact=False` (always round) gives 99.84-99.95% int8-exact outputs
vs ORT_DISABLE_ALL instead of 100% (max 1 step). It does reproduce ORT's *optimized* graph (which fuses
into QLinearConv and rounds the bias to int32 the same way) bit-exactly on the conv models, which is why
the option exists.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions, use_counts
from nativeq.compile.passes.qdq_sites import CONTRACTION_OPS, const_array, op_name, resolve, static_value


def _channel_shape(contraction) -> tuple[int, ...] | None:
    """Shape of a per-output-channel vector against the contraction's output; None if the channel count is symbolic."""
    shape = list(contraction.ty.shape)
    channel_axis = len(shape) - 1 if op_name(contraction) == "relax.matmul" else 1
    if not isinstance(shape[channel_axis], tvm.tirx.IntImm):
        return None
    channels = int(shape[channel_axis])
    if op_name(contraction) == "relax.matmul":
        return (channels,)
    return (1, channels) + (1,) * (len(shape) - 2)


class _Epilogue:
    """The rescale chain LowerQDQToInteger emits after an integer contraction, if `expr` is one."""

    def __init__(self, expr, var2val, uses):
        self.matched = False
        multiply = resolve(expr, var2val)
        if op_name(multiply) != "relax.multiply" or uses.get(expr, 0) != 1:
            return
        self.scale = const_array(multiply.args[1])
        cast = resolve(multiply.args[0], var2val)
        if self.scale is None or op_name(cast) != "relax.astype" or uses.get(multiply.args[0], 0) != 1:
            return
        acc = cast.args[0]
        value = resolve(acc, var2val)
        self.correction = np.zeros((), np.int64)
        if op_name(value) == "relax.subtract":
            correction = const_array(value.args[1])
            if correction is None or uses.get(acc, 0) != 1:
                return
            self.correction = correction.astype(np.int64)
            acc = value.args[0]
            value = resolve(acc, var2val)
        if op_name(value) not in CONTRACTION_OPS or str(value.ty.dtype) != "int32":
            return
        self.accumulator, self.contraction = acc, value
        self.matched = True


def fold_bias(epilogue: _Epilogue, bias: np.ndarray, require_exact: bool) -> np.ndarray | None:
    """The new correction term (corr - round(bias / scale)) in the channel shape, or None if not foldable."""
    channel_shape = _channel_shape(epilogue.contraction)
    if channel_shape is None or bias.ndim > len(epilogue.contraction.ty.shape):  # the add would broadcast up
        return None
    while bias.ndim > len(channel_shape) and bias.shape[0] == 1:
        bias = bias[0]
    try:
        bias = np.broadcast_to(bias.astype(np.float32), channel_shape)
        scale = np.broadcast_to(epilogue.scale.astype(np.float32), channel_shape)
        correction = np.broadcast_to(epilogue.correction, channel_shape)
    except ValueError:  # the bias varies along a non-channel axis
        return None
    quantized = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if require_exact and not np.array_equal(quantized.astype(np.float32) * scale, bias):
        return None
    folded = correction - quantized.astype(np.int64)
    if np.abs(folded).max() > np.iinfo(np.int32).max:
        return None
    return folded.astype(np.int32)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, require_exact):
        super().__init__(mod)
        self.require_exact = require_exact

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)
        self.uses = use_counts(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def visit_call_(self, call):
        if op_name(call) == "relax.add":
            for rescaled, bias_expr in (call.args, call.args[::-1]):
                epilogue = _Epilogue(rescaled, self.var2val, self.uses)
                bias = static_value(bias_expr, self.var2val) if epilogue.matched else None
                folded = None if bias is None else fold_bias(epilogue, bias, self.require_exact)
                if folded is not None:
                    acc = relax.op.subtract(self.visit_expr(epilogue.accumulator), relax.const(folded))
                    rescaled_scale = relax.const(epilogue.scale.astype(np.float32))
                    return relax.op.multiply(relax.op.astype(acc, "float32"), rescaled_scale)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="nativeq.FoldBiasIntoAccumulator")
class FoldBiasIntoAccumulator:
    """Fold constant bias Adds into the int32 zero-point correction of integer contractions.

    require_exact: fold only biases that are integers in the accumulator scale (no new rounding).
    """

    def __init__(self, require_exact: bool = True):
        self.require_exact = require_exact

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod, self.require_exact).transform()
