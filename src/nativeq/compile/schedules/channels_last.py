"""Relax pass: int8 convolutions run channels-last, and the layout is carried between them.

Pipeline position: `kernel_relax_passes(target)`, first: after the int8 rewrite (`compile/passes/`),
before `PackInt8Weights` packs the matmuls this pass creates. Input, as ONNX models and the int8
rewrite give it (channels first):

    xq  = R.quantize(R.permute_dims(feats, [0, 2, 1]), ...)        # [N, C, T] (the model's transpose)
    xp  = R.nn.pad(xq, ..., pad_value=zero_point)
    acc = R.nn.conv1d(xp, W, groups=1 or C, out_dtype="int32")     # NCW / NCHW, W constant
    y   = R.quantize(R.multiply(R.astype(R.subtract(acc, b)), s))  # requantize epilogue, per-channel constants

Output: every such conv works on channels-last tensors `[N, *S, C]`: a full conv as im2col + int8
matmul (`conv_as_matmul.py`) with its producer's zero-point `nn.pad` folded into the im2col (which
`PackInt8Weights` makes implicit where the channels fill whole vectors: the matmul gathers its rows), a grouped
conv as one such matmul per group on its slice of the channels, a depthwise conv as the `depthwise.py`
kernel reading one channels-last padded copy of its input.
The ops around them (requantize epilogues, quantize/dequantize, residual adds, activations, pads,
a mean over all spatial axes to [N, C], max and average pools, the 8-bit table lookups of
`LutElementwise`, GroupNorm with one group between its [N, 1, C x S] reshapes) are rewritten to
channels-last too, with their constants permuted, so consecutive convs exchange
channels-last tensors and no transpose is left between them. Where a channels-first value is
still needed (an op this pass does not know, a graph output), a `permute_dims` back is emitted;
`permute_dims` pairs that cancel (the model's own [N, T, C] <-> [N, C, T] transposes) vanish.

Float32 convs with a constant weight (a model's float stem, every conv a `quantize_dynamic` model
keeps in float) take the same routes: groups 1 (and each group of a grouped conv) as im2col + float matmul
on the packed kernel with the float multiply-add intrinsic, depthwise as the depthwise kernel with float32
accumulators, instead of TVM's scalar conv loop nest over a symbolic time axis.

Why: channels-last is the layout both int8 kernels want. The im2col rows are contiguous
C-vectors and the matmul result is already the next layer's input (no int32 transpose kernel
between the matmul and its requantize, which then fuses into the matmul); a depthwise conv
vectorizes over channels, where channels-first gives it only the (often tiny) width.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import Analyzer, relax, topi, tvm
from nativeq.compile.passes import result_dtype, rewrite_functions
from nativeq.compile.passes.lut_elementwise import call_lut, lut_call_operands
from nativeq.compile.provenance import with_span
from nativeq.compile.schedules.conv_as_matmul import OPAQUE, ConvGeometry, conv_as_matmul
from nativeq.compile.schedules.depthwise import (
    call_depthwise, call_interleave_taps, call_pad_channels_last, extra_rows, pair_taps_weight, quad_extra_rows,
    quad_taps_weight,
)
from nativeq.compile.schedules.intrinsics import VNNI, DotIntrin

_CONVS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW")}
# Elementwise ops (operands broadcast against each other): they compute the same in any layout.
ELEMENTWISE = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.astype", "relax.clip", "relax.nn.relu", "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh",
    "relax.sigmoid", "relax.tanh", "relax.exp", "relax.negative", "relax.round", "relax.abs", "relax.sqrt",
    "relax.erf", "relax.where", "relax.quantize", "relax.dequantize", "relax.less", "relax.less_equal",
    "relax.greater", "relax.greater_equal", "relax.equal", "relax.not_equal", "relax.nn.leakyrelu",
    "relax.nn.softplus", "relax.log", "relax.power", "relax.floor", "relax.ceil", "relax.sign", "relax.square",
    "relax.rsqrt", "relax.sin", "relax.cos", "relax.logical_not",
}
_SPATIAL_MEANS = {"relax.mean", "relax.variance", "relax.sum", "relax.max"}
# Windowed pooling: channels-first layout -> its channels-last twin (TOPI's pool takes either).
_POOLS = {
    "relax.nn.max_pool1d": (relax.op.nn.max_pool1d, "NCW", "NWC"),
    "relax.nn.max_pool2d": (relax.op.nn.max_pool2d, "NCHW", "NHWC"),
    "relax.nn.avg_pool1d": (relax.op.nn.avg_pool1d, "NCW", "NWC"),
    "relax.nn.avg_pool2d": (relax.op.nn.avg_pool2d, "NCHW", "NHWC"),
}
# Taps along the last axis from which a depthwise conv multiplies 4 per `vpdpbusd` lane. Measured on AVX-512 VNNI:
# QuartzNet's k = 33..63 0.85-0.92x time, DS-CNN's 3x3 1.18x (a word serves one output position there).
QUAD_TAPS_FROM = 8


def to_channels_last(ndim: int) -> list[int]:
    """permute_dims axes [N, C, *S] -> [N, *S, C]."""
    return [0, *range(2, ndim), 1]


def to_channels_first(ndim: int) -> list[int]:
    """permute_dims axes [N, *S, C] -> [N, C, *S]."""
    return [0, ndim - 1, *range(1, ndim - 1)]


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _ndim(expr) -> int:
    return int(expr.ty.ndim) if hasattr(expr.ty, "ndim") else -1


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst)


def _int_list(values) -> list[int]:
    return [int(v) for v in values]


def _conv_kind(call, intrin: DotIntrin, fma: DotIntrin | None = None) -> str | None:
    """"matmul" / "depthwise" / "grouped" for an int8 conv this pass rewrites, "float-matmul" / "depthwise" /
    "float-grouped" for a float32 one (with the float intrinsic `fma`), else None."""
    layouts = _CONVS.get(_op_name(call))
    if layouts is None:
        return None
    x, w = call.args
    attrs = call.attrs
    if not _is_const(w) or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != (layouts[0], layouts[1], layouts[0]):
        return None
    groups = int(attrs.groups)
    out_channels, in_per_group = (int(d) for d in w.ty.shape.values[:2])
    depthwise = in_per_group == 1 and out_channels == groups
    if fma is not None and str(x.ty.dtype) == str(w.ty.dtype) == result_dtype(call) == "float32":
        return "float-matmul" if groups == 1 else "depthwise" if depthwise else "float-grouped"
    if result_dtype(call) != "int32" or str(x.ty.dtype) != intrin.act_dtype or str(w.ty.dtype) != "int8":
        return None
    if groups == 1:
        return "matmul"
    if depthwise:
        return "depthwise"
    return "grouped"


@relax.expr_functor.mutator
class _ChannelsLast(relax.PyExprMutator):
    def __init__(self, mod, intrin: DotIntrin, fma: DotIntrin | None):
        super().__init__(mod)
        self.intrin, self.fma = intrin, fma
        self.rewritten = 0
        self.channels_last: dict = {}  # new channels-first var -> its channels-last twin
        self.padded: dict = {}  # var made by nn.pad -> (source, spatial pad pairs, pad value, channels_last)
        self.with_constants_only: set = set()  # vars whose every reader is elementwise with constant other operands
        # channels-first var [N, 1, X] flattened from a [N, C, *S] value -> (the same flattening of its twin, the
        # twin's [N, *S, C] shape): the elements in another order, which a whole-tensor normalization does not see
        self.flat: dict = {}
        self.batch_norms: dict = {}  # channels-first BatchNorm tuple var -> the BatchNorm of its data's twin

    def prepare(self, func) -> None:
        """Find the vars of `func` that only elementwise ops with constant other operands (a quantize's scale, a
        per-channel multiplier) or reshapes read: such a value is never broadcast against another tensor."""
        readers: dict = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                args = list(value.args) if isinstance(value, relax.Call) else []
                name = _op_name(value)
                for arg in args:
                    if isinstance(arg, relax.Var):
                        others = [a for a in args if not a.same_as(arg)]
                        ok = name in ELEMENTWISE | {"relax.reshape"} and all(not isinstance(a, relax.Var) for a in others)
                        readers.setdefault(arg, set()).add(ok)
                relax.analysis.post_order_visit(value, lambda e: readers.setdefault(e, set()).add(False) if (
                    isinstance(e, relax.Var) and not any(e.same_as(a) for a in args)) else None)
        relax.analysis.post_order_visit(func.body.body, lambda e: readers.setdefault(e, set()).add(False)
                                        if isinstance(e, relax.Var) else None)
        self.with_constants_only = {var for var, oks in readers.items() if oks == {True}}

    # -- helpers ---------------------------------------------------------------------------------------
    def _twin(self, expr):
        """The channels-last twin of a (visited) expr, or None."""
        return self.channels_last.get(expr) if isinstance(expr, relax.Var) else None

    def _as_channels_last(self, expr):
        twin = self._twin(expr)
        if twin is not None:
            return twin
        return self.builder_.emit(relax.op.permute_dims(expr, to_channels_last(_ndim(expr))))

    def _define(self, binding, channels_last_value):
        """Bind the channels-last value and, for channels-first users, its transpose back as `binding.var`;
        returns the channels-last var."""
        twin = channels_last_value if isinstance(channels_last_value, relax.Var) else self.builder_.emit(channels_last_value)
        back = self._bind_plain(binding, relax.op.permute_dims(twin, to_channels_first(_ndim(twin))))
        self.channels_last[back] = twin
        return twin

    def _bind_plain(self, binding, value):
        var = binding.var
        emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        new_var = emit(value, name_hint=str(var.name))
        self.set_var_remap(var, new_var)
        return new_var

    # -- the rewrite -----------------------------------------------------------------------------------
    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        if isinstance(value, relax.Var) and isinstance(binding.var, relax.DataflowVar):
            self.set_var_remap(binding.var, value)  # an alias (left by an earlier fold): its users read the value
            return
        name = _op_name(value)
        kind = _conv_kind(value, self.intrin, self.fma) if name in _CONVS else None
        if kind is not None:
            self._define(binding, self._conv(value, kind))
            self.rewritten += 1
            return
        if name == "relax.permute_dims" and self._permute(binding, value):
            return
        if name == "relax.reshape" and self._reshape(binding, value):
            return
        if any(self._flat(arg) is not None for arg in getattr(value, "args", ())) and self._flat_op(binding, value):
            return
        if name in ELEMENTWISE and self._elementwise(binding, value):
            return
        if name == "relax.nn.pad" and self._pad(binding, value):
            return
        if name in _SPATIAL_MEANS and self._spatial_reduction(binding, value):
            return
        if name in _POOLS and self._pool(binding, value):
            return
        if name == "relax.call_tir" and self._table_lookup(binding, value):
            return
        if name == "relax.nn.batch_norm" and self._batch_norm(binding, value):
            return
        if name == "relax.strided_slice" and self._channel_slice(binding, value):
            return
        if name == "relax.concat" and self._channel_concat(binding, value):
            return
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.batch_norms and value.index == 0:
            self._define(binding, relax.TupleGetItem(self.batch_norms[value.tuple_value], 0))
            return
        self._bind_plain(binding, value)

    def _channel_slice(self, binding, call) -> bool:
        """A slice of the channels alone (Res2Net's channel chunks) slices the twin's last axis."""
        data, axes, begin, end, *strides = call.args
        twin, ndim = self._twin(data), _ndim(data)
        if twin is None or ndim < 3 or not all(hasattr(a, "fields") for a in (axes, begin, end, *strides)):
            return False
        if [int(a) % ndim for a in axes.fields] != [1]:
            return False
        self._define(binding, relax.op.strided_slice(
            twin, axes=[ndim - 1], begin=list(begin.fields), end=list(end.fields),
            strides=list(strides[0].fields) if strides else None, assume_inbound=bool(call.attrs.assume_inbound)))
        return True

    def _channel_concat(self, binding, call) -> bool:
        """A concat of channels-last values along the channels (Res2Net's chunks joined again, ECAPA's multi-layer
        aggregation) concatenates the twins along their last axis."""
        (tensors,) = call.args
        ndim = _ndim(call)
        if not hasattr(tensors, "fields") or ndim < 3 or int(call.attrs.axis) % ndim != 1:
            return False
        twins = [self._twin(t) for t in tensors.fields]
        if any(t is None for t in twins):
            return False
        self._define(binding, relax.op.concat(twins, axis=ndim - 1))
        return True

    def _batch_norm(self, binding, call) -> bool:
        """An inference BatchNorm over the channels of a channels-last source (a speaker model's conv -> ReLU -> BN,
        which cannot fold into the conv) normalizes the twin along its last axis; its output (item 0 of the tuple)
        is that value's twin."""
        data = call.args[0]
        twin, ndim = self._twin(data), _ndim(data)
        if twin is None or ndim < 3 or int(call.attrs.axis) % ndim != 1 or bool(call.attrs.training):
            return False
        attrs = call.attrs
        normalized = relax.op.nn.batch_norm(twin, *call.args[1:], axis=ndim - 1, epsilon=float(attrs.epsilon),
                                            center=bool(attrs.center), scale=bool(attrs.scale),
                                            momentum=float(attrs.momentum), training=False)
        self.batch_norms[self._bind_plain(binding, call)] = self.builder_.emit(normalized)
        return True

    def _table_lookup(self, binding, call) -> bool:
        """An 8-bit table lookup (`LutElementwise`: an elementwise chain such as GELU as one gather)."""
        operands = lut_call_operands(call, self.builder_.get())
        if operands is None or self._twin(operands[0]) is None:
            return False
        x, table, offset = operands
        self._define(binding, call_lut(self.builder_, self._twin(x), table, offset))
        return True

    def _permute(self, binding, call) -> bool:
        (source,) = call.args
        ndim = _ndim(source)
        if ndim < 3 or call.attrs.axes is None:
            return False
        axes = _int_list(call.attrs.axes)
        twin = self._twin(source)
        if twin is not None and axes == to_channels_last(ndim):  # back to channels-last: the twin itself
            if isinstance(binding.var, relax.DataflowVar):
                self.set_var_remap(binding.var, twin)
            else:
                self._bind_plain(binding, twin)
            return True
        if axes == to_channels_first(ndim):  # a channels-last source: it is this value's twin
            self.channels_last[self._bind_plain(binding, call)] = source
            return True
        return False

    def _flat(self, expr):
        """(flat twin, twin shape) of a flattened channels-first var, or None."""
        return self.flat.get(expr) if isinstance(expr, relax.Var) else None

    def _bind_flat(self, binding, flat_twin, twin_shape) -> None:
        """Bind `flat_twin` and, for channels-first users, the flattening of the channels-first tensor as
        `binding.var`."""
        twin = flat_twin if isinstance(flat_twin, relax.Var) else self.builder_.emit(flat_twin)
        first = relax.op.permute_dims(relax.op.reshape(twin, twin_shape), to_channels_first(len(twin_shape)))
        plain = self._bind_plain(binding, relax.op.reshape(first, binding.var.ty.shape))
        self.flat[plain] = (twin, twin_shape)

    def _reshape(self, binding, call) -> bool:
        """GroupNorm with one group, as torch exports it: [N, C, *S] -> [N, 1, C x S] -> normalized -> [N, C, *S].
        The statistics are over the whole tensor and the ops between the reshapes are elementwise, so the
        flattening of the channels-last twin ([N, 1, S x C], another element order) goes through them instead of
        a transpose to channels first and one back."""
        source = call.args[0]
        shape = getattr(call.ty, "shape", None)
        if not isinstance(shape, relax.ShapeExpr):
            return False
        dims = list(shape.values)
        twin, flat = self._twin(source), self._flat(source)
        if twin is not None and _ndim(source) >= 3 and len(dims) == 3 and _is_one(dims[1]) and _same_dim(
                dims[0], source.ty.shape.values[0]):
            self._bind_flat(binding, relax.op.reshape(twin, dims), list(twin.ty.shape.values))
            return True
        if flat is not None and len(dims) >= 3 and _same_dim(dims[0], flat[1][0]):
            twin_shape = [dims[0], *dims[2:], dims[1]]
            if same_shape(twin_shape, flat[1]):
                self._define(binding, relax.op.reshape(flat[0], twin_shape))
                return True
        return False

    def _flat_op(self, binding, call) -> bool:
        """An op on a flattened value (`_reshape`) that does not see the element order: elementwise with other
        operands of one element per batch (a scalar, the statistics), a per-tensor quantize / dequantize, or a
        mean / variance / sum / max / min over the flattened axis (whose result is the same [N, 1, 1])."""
        name = _op_name(call)
        (twin, twin_shape) = next(self._flat(a) for a in call.args if self._flat(a) is not None)
        if name in _SPATIAL_MEANS | {"relax.min"}:
            axes = None if call.attrs.axis is None else sorted(int(a) % 3 for a in call.attrs.axis)
            if axes not in ([2], [1, 2]) or not bool(call.attrs.keepdims):
                return False
            self._bind_plain(binding, relax.Call(call.op, [twin], call.attrs, call.ty_args))
            return True
        qdq = name in ("relax.quantize", "relax.dequantize")
        if name not in ELEMENTWISE or (qdq and not all(_one_value(a) for a in call.args[1:])):
            return False
        args = []
        for arg in call.args[:1] if qdq else call.args:
            if self._flat(arg) is not None:
                if not same_shape(self._flat(arg)[1], twin_shape):
                    return False
                args.append(self._flat(arg)[0])
            elif _one_value(arg) or tvm.ir.is_prim_expr(arg):
                args.append(arg)
            else:
                return False
        args += list(call.args[1:]) if qdq else []
        self._bind_flat(binding, relax.Call(call.op, args, call.attrs, call.ty_args), twin_shape)
        return True

    def _elementwise(self, binding, call) -> bool:
        """Rewrite when some operand has a twin and every other operand is a constant, a scalar or a twin.
        (Quantize/dequantize: only the data operand; their scale and zero point are per tensor or 1-D.)"""
        name = _op_name(call)
        qdq = name in ("relax.quantize", "relax.dequantize")
        operands = call.args[:1] if qdq else call.args
        ndim = _ndim(call)
        if ndim < 3 or not any(self._twin(a) is not None for a in operands):
            return False
        args = []
        for arg in operands:
            twin = self._twin(arg)
            if twin is not None and _ndim(arg) == ndim:
                args.append(twin)
            elif _is_const(arg):
                args.append(_permute_constant(arg, ndim))
            elif _ndim(arg) == 0 or tvm.ir.is_prim_expr(arg):  # a scalar, a clip's bound
                args.append(arg)
            elif _is_per_channel(arg, ndim):  # e.g. a bias not folded yet, a squeeze-excite gate: tiny to move
                shape = [int(d) for d in arg.ty.shape.values]
                full = relax.op.reshape(arg, [1] * (ndim - len(shape)) + shape)
                args.append(self.builder_.emit(relax.op.permute_dims(full, to_channels_last(ndim))))
            else:
                return False
        if qdq:
            axis = int(call.attrs.axis) % ndim
            op = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
            value = op(args[0], call.args[1], call.args[2], axis=to_channels_last(ndim).index(axis),
                       out_dtype=str(call.attrs.out_dtype))
        else:
            value = relax.Call(call.op, args, call.attrs, call.ty_args)
        self._define(binding, value)
        return True

    def _pad(self, binding, call) -> bool:
        """A constant pad: channels-last when its source is; either way a conv reading it may fold it in."""
        source = call.args[0]
        if str(call.attrs.pad_mode) != "constant" or len(call.args) != 1 or _ndim(source) < 3:
            return False
        ndim = _ndim(source)
        pairs = np.array(_int_list(call.attrs.pad_width)).reshape(ndim, 2)
        pad_value = float(call.attrs.pad_value)
        spatial_only = not pairs[:2].any()
        twin = self._twin(source)
        if twin is None:
            padded = self._bind_plain(binding, call)
            if spatial_only:
                self.padded[padded] = (source, pairs[2:], pad_value, False)
            return True
        pairs = pairs[to_channels_last(ndim)]
        padded = self._define(binding, relax.op.nn.pad(twin, [int(p) for p in pairs.reshape(-1)], "constant", pad_value))
        if spatial_only:
            self.padded[padded] = (twin, pairs[1:-1], pad_value, True)
        return True

    def _spatial_reduction(self, binding, call) -> bool:
        """A reduction over every spatial axis to [N, C] (global average pooling) reads the twin as well.

        With keepdims ([N, C, 1, ...], as ONNX's GlobalAveragePool gives it) a mean is reshaped to that, where
        only elementwise ops with constant other operands read it (`prepare`).
        NOTE: not a normalization's statistics: fused with the broadcast that consumes it, a reduction over a
        non-innermost axis gets a schedule that recomputes it per element; and the reshape would stop the ops
        after a variance (+ eps, sqrt) from fusing into the reduction, leaving them to run per element of the
        normalized tensor (wav2vec2's GroupNorm: 1.7x slower)."""
        (source,) = call.args
        twin = self._twin(source)
        ndim = _ndim(source)
        if twin is None or call.attrs.axis is None:
            return False
        keepdims = bool(call.attrs.keepdims)
        if keepdims and (_op_name(call) != "relax.mean" or binding.var not in self.with_constants_only):
            return False
        axes = sorted(int(a) % ndim for a in call.attrs.axis)
        if axes != list(range(2, ndim)):
            return False
        spatial = list(range(1, ndim - 1))
        op = {"relax.mean": relax.op.mean, "relax.variance": relax.op.variance, "relax.sum": relax.op.sum,
              "relax.max": relax.op.max}[_op_name(call)]
        pooled = op(twin, spatial, keepdims=False)
        if keepdims:
            pooled = relax.op.reshape(self.builder_.emit(pooled), [*source.ty.shape.values[:2], *[1] * (ndim - 2)])
        self._bind_plain(binding, pooled)
        return True

    def _pool(self, binding, call) -> bool:
        """A max / average pool over a channels-last source pools the twin (channels innermost: the window's
        reduction vectorizes over channels) instead of transposing back for it and forward after it."""
        op, channels_first, channels_last = _POOLS[_op_name(call)]
        twin = self._twin(call.args[0])
        attrs = call.attrs
        if twin is None or str(attrs.layout) != channels_first or str(attrs.out_layout) != channels_first:
            return False
        self._define(binding, op(twin, _int_list(attrs.pool_size), _int_list(attrs.strides), _int_list(attrs.padding),
                                 _int_list(attrs.dilation), bool(attrs.ceil_mode), bool(attrs.count_include_pad),
                                 layout=channels_last, out_layout=channels_last))
        return True

    def _quad_taps(self, x, weight) -> bool:
        """Whether an int8 depthwise conv runs 4 taps per `vpdpbusd` lane (`depthwise_te(quad_taps=True)`): AVX-512
        VNNI, uint8 activations, int8 weights, channels a multiple of its 16 lanes, `QUAD_TAPS_FROM` taps or more
        along the last axis."""
        return (self.intrin is VNNI and str(x.ty.dtype) == "uint8" and str(weight.dtype) == "int8"
                and weight.shape[0] % 16 == 0 and weight.shape[-1] >= QUAD_TAPS_FROM)

    def _conv(self, call, kind: str):
        """The channels-last lowering of a conv `_conv_kind` called `kind`."""
        x, w = call.args
        attrs = call.attrs
        weight = w.value.numpy()  # [O, C/groups, *K]
        ndim = weight.ndim - 2
        padding = _int_list(attrs.padding)
        geometry = ConvGeometry(tuple(_int_list(attrs.strides)), tuple(_int_list(attrs.dilation)), tuple(padding))
        x_cl = self._twin(x)
        folded = self.padded.get(x if x_cl is None else x_cl)
        if folded is not None and not any(padding):  # the zero-point pad in front of the conv: read, not copied
            source, pairs, pad_value, channels_last = folded
            geometry = ConvGeometry(geometry.strides, geometry.dilation,
                                    tuple(int(p) for p in (*pairs[:, 0], *pairs[:, 1])), pad_value)
            x_cl = source if channels_last else self._as_channels_last(source)
        elif x_cl is None:
            x_cl = self._as_channels_last(x)
        out_spatial = list(call.ty.shape.values[2:])
        if kind == "depthwise":
            w_taps = np.ascontiguousarray(weight[:, 0].transpose(*range(1, ndim + 1), 0))  # [*K, C]
            # ARM (int8 activations): neighbouring taps' products summed in int16 where the weights allow it; x86
            # keeps its kernel (AVX-512 VNNI multiplies int16 pairs with `vpdpwssd` already)
            arm = self.intrin is not None and self.intrin.act_dtype == "int8" and str(x.ty.dtype) == "int8"
            paired = pair_taps_weight(w_taps) if arm else None
            if self._quad_taps(x, weight):
                before, after = list(geometry.padding[:ndim]), list(geometry.padding[ndim:])
                after[-1] += quad_extra_rows(w_taps.shape[-2], geometry.strides[-1], geometry.dilation[-1],
                                             out_spatial[-1])
                x4 = self.builder_.emit(call_interleave_taps(self.builder_, x_cl, before, after, geometry.pad_value,
                                                             geometry.dilation[-1]))
                geometry = ConvGeometry(geometry.strides, geometry.dilation, (0,) * (2 * ndim))
                return call_depthwise(self.builder_, x4, relax.const(quad_taps_weight(w_taps), "int8"), out_spatial,
                                      geometry, rows_past_end=True, quad_taps=True)
            w_cl = relax.const(w_taps if paired is None else paired, str(weight.dtype))
            copied = geometry.padded or paired is not None
            copy_padding = None
            if copied:
                # NOTE: one padded copy of the input (a cheap vectorized kernel) rather than a bounds check
                # per tap in the depthwise kernel's inner loop, which keeps it branch-free; it also holds the
                # rows the kernel's last block of outputs reads past the end (no clamped reads either).
                before, after = list(geometry.padding[:ndim]), list(geometry.padding[ndim:])
                after[-1] += extra_rows(w_taps.shape[-2], geometry.strides[-1], geometry.dilation[-1], out_spatial[-1],
                                        pair_taps=paired is not None)
                # A 2-D conv copies each row of outputs' input rows inside its kernel (kernel rows / stride copies
                # of a small input, no kernel launch); a 1-D one reads a block of 4 outputs' taps per task, which
                # would copy its input kernel / 4 times: it keeps a pad kernel of its own.
                if ndim >= 2:
                    copy_padding = [*before, *after]
                else:
                    x_cl = self.builder_.emit(call_pad_channels_last(self.builder_, x_cl, before, after,
                                                                     geometry.pad_value))
                geometry = ConvGeometry(geometry.strides, geometry.dilation, (0,) * (2 * ndim), geometry.pad_value)
            return call_depthwise(self.builder_, x_cl, w_cl, out_spatial, geometry, pair_taps=paired is not None,
                                  rows_past_end=copied, copy_padding=copy_padding)
        intrin = self.fma if kind.startswith("float-") else self.intrin
        if kind.endswith("grouped"):
            return self._grouped(x_cl, weight, int(attrs.groups), out_spatial, geometry, intrin, call.span)
        return conv_as_matmul(self.builder_, x_cl, weight, out_spatial, geometry, intrin)

    def _grouped(self, x_cl, weight: np.ndarray, groups: int, out_spatial, geometry: ConvGeometry, intrin, span):
        """A grouped conv (1 < groups < channels: wav2vec2 / HuBERT's positional conv) as one im2col + matmul per
        group on its slice of the channels, the groups' results side by side along the channels. One matmul over
        all channels with a block-diagonal weight would multiply `groups` times as many zeros as values."""
        out_channels, per_group = weight.shape[:2]
        per_group_out = out_channels // groups
        ndim = weight.ndim - 2
        results = []
        for g in range(groups):
            channels = relax.op.strided_slice(x_cl, axes=[ndim + 1], begin=[g * per_group], end=[(g + 1) * per_group])
            x_g = self.builder_.emit(with_span(channels, span))
            w_g = np.ascontiguousarray(weight[g * per_group_out:(g + 1) * per_group_out])
            result = self.builder_.emit(conv_as_matmul(self.builder_, x_g, w_g, out_spatial, geometry, intrin, span))
            results.append(self.builder_.emit(relax.op.expand_dims(result, 0)))
        # NOTE: stacked along a new first axis (each group's sums one contiguous copy), then the groups moved next to
        # their channels: a concat along the channel axis picks its input by a chain of selects per element
        # (9 ns an element for 16 groups). The stack is opaque to FuseOps: with static shapes it fused the move and
        # the requantize after it into the stack, which then selected among the groups per element again (a
        # static-length HuBERT-style positional conv: 0.44 ms, against 0.07 ms for the stack and the rest apart).
        stacked = self.builder_.emit(self.builder_.call_te(  # [G, N, *S', O / G]
            topi.concatenate, results, 0, primfunc_name_hint="stack_groups", primfunc_attrs={"op_pattern": OPAQUE}))
        moved = self.builder_.emit(relax.op.permute_dims(stacked, [*range(1, ndim + 2), 0, ndim + 2]))  # [N, *S', G, O/G]
        return relax.op.reshape(moved, [*list(moved.ty.shape.values)[:-2], out_channels])


def _is_one(dim) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == 1


def _same_dim(a, b) -> bool:
    """Two shape dims the analyzer proves equal."""
    return bool(Analyzer().can_prove_equal(a, b))


def same_shape(a, b) -> bool:
    """Two shapes whose dims the analyzer proves equal."""
    return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _one_value(expr) -> bool:
    """An operand that broadcasts against a flattened [N, 1, X] value as one value per batch element: [], [1],
    [1, 1] or [N, 1, 1] (whatever order the X elements are in)."""
    shape = getattr(expr.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or len(shape.values) > 3:
        return False
    return all(_is_one(d) for d in list(shape.values)[-2:])


def _is_per_channel(expr, ndim: int) -> bool:
    """A static-shaped operand of rank <= ndim that broadcasts along every spatial axis ([C, 1], [1, C, 1, 1], ...)."""
    shape = getattr(expr.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return False
    dims = [1] * (ndim - len(shape.values)) + [int(d) for d in shape.values]
    return len(dims) == ndim and all(d == 1 for d in dims[2:])


def _permute_constant(const, ndim: int):
    """A constant operand of a channels-first op, for the channels-last op (broadcast rank first)."""
    value = const.value.numpy()
    if value.ndim == 0:
        return const
    value = value.reshape((1,) * (ndim - value.ndim) + value.shape)
    return relax.const(np.ascontiguousarray(value.transpose(to_channels_last(ndim))), str(value.dtype))


@tvm.transform.module_pass(opt_level=0, name="nativeq.Int8ConvsChannelsLast")
class Int8ConvsChannelsLast:
    """Run int8 convs channels-last and carry the layout between them (see the module docstring).

    `fma`: the target's float multiply-add intrinsic; with it, float32 convs run channels-last too (groups 1
    as im2col + float matmul, depthwise as the depthwise kernel)."""

    def __init__(self, intrin: DotIntrin, fma: DotIntrin | None = None):
        self.intrin, self.fma = intrin, fma
        self.rewritten = 0

    def transform_module(self, mod, _ctx):
        mutator = _ChannelsLast(mod, self.intrin, self.fma)
        new_mod = rewrite_functions(mutator, prepare=mutator.prepare, remove_unused=True)
        self.rewritten = mutator.rewritten
        return new_mod
