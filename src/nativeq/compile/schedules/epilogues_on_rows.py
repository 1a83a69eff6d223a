"""Relax pass: a 2-D conv's epilogue runs on the GEMM's rows, before the reshape to [N, *S, C].

Pipeline position: `kernel_relax_passes(target)`, right after `Int8ConvsChannelsLast`, before
`PackInt8Weights`. Input, as the channels-last pass leaves a 2-D conv (or a 1x1 conv over [N, H, W, C]):

    acc = R.matmul(cols, W, out_dtype="int32")          # [N, H x W, O]: one row per output position
    y   = R.reshape(acc, [N, H, W, O])
    q   = R.quantize(R.multiply(R.astype(R.subtract(y, b)), s), ...)   # requantize, per-channel constants
    r   = R.add(R.dequantize(q, ...), skip)              # a residual add, `skip` [N, H, W, O]

Output: the elementwise ops after the reshape compute on [N, H x W, O] (per-channel constants reshaped
to [1, 1, O], another operand of the full shape reshaped to rows: a view), and the reshape moves to
their end, where an op that needs the spatial axes (the next conv's im2col, a pool) reads it:

    acc = R.matmul(cols, W, out_dtype="int32")
    q   = R.quantize(R.multiply(R.astype(R.subtract(acc, b')), s), ...)
    r   = R.add(R.dequantize(q, ...), R.reshape(skip, [N, H x W, O]))
    y   = R.reshape(r, [N, H, W, O])

Why: FuseOps does not fuse an elementwise op into a matmul across a reshape, so each 2-D conv wrote
its int32 sums and a separate kernel read them back to requantize (a 1-D conv's GEMM rows are its
positions already, and its epilogue fused). With the epilogue fused the int32 tile is requantized
in registers.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.passes.qdq_sites import op_name
from nativeq.compile.schedules.channels_last import ELEMENTWISE, same_shape


def _dims(expr) -> list | None:
    shape = getattr(expr.ty, "shape", None)
    return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None


def _one_element(expr) -> bool:
    dims = _dims(expr)
    return dims is not None and all(isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in dims)


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst)


def _per_channel(dims, ndim: int) -> bool:
    """A static shape of rank 2..ndim that broadcasts along every axis but the last ([1, 1, 1, C], [1, C])."""
    return (dims is not None and 2 <= len(dims) <= ndim and all(isinstance(d, tvm.tirx.IntImm) for d in dims)
            and all(int(d) == 1 for d in dims[:-1]))


def _channel_constant(const, ndim: int):
    """A constant that broadcasts along every axis but the last against an `ndim`-D value, as the [1, 1, C]
    (or scalar) constant of the rows; None if it varies along another axis."""
    value = const.value.numpy()
    if value.ndim == 0:
        return const
    if value.ndim > ndim or any(d != 1 for d in value.shape[:-1]):
        return None
    return relax.const(np.ascontiguousarray(value.reshape(1, 1, value.shape[-1])), str(value.dtype))


@relax.expr_functor.mutator
class _EpiloguesOnRows(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rows: dict = {}  # [N, *S, C] var -> its [N, R, C] rows
        self.moved = 0

    def _bind(self, binding, value):
        var = binding.var
        emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        new_var = emit(value, name_hint=str(var.name))
        self.set_var_remap(var, new_var)
        return new_var

    def _rows_of(self, expr):
        return self.rows.get(expr) if isinstance(expr, relax.Var) else None

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        name = op_name(value)
        if name == "relax.reshape" and self._split(binding, value):
            return
        if name in ELEMENTWISE and any(self._rows_of(a) is not None for a in value.args) and self._elementwise(
                binding, value):
            return
        self._bind(binding, value)

    def _split(self, binding, call) -> bool:
        """reshape([N, R, C] -> [N, *S, C]), S of two or more axes: remember the rows."""
        source, dims, source_dims = call.args[0], _dims(call), _dims(call.args[0])
        if dims is None or source_dims is None or len(source_dims) != 3 or len(dims) < 4:
            return False
        if not same_shape([dims[0], dims[-1]], [source_dims[0], source_dims[-1]]):
            return False
        rows = self._rows_of(source)
        plain = self._bind(binding, call)
        self.rows[plain] = source if rows is None else rows
        return True

    def _elementwise(self, binding, call) -> bool:
        name = op_name(call)
        dims = _dims(call)
        if dims is None:
            return False
        # the rows of an operand of the result's own shape; one with rows that broadcasts (a squeeze-excite gate
        # [N, 1, 1, C] over [N, H, W, C]) does not say how the others' positions are laid out
        rows_dims = next((_dims(self._rows_of(a)) for a in call.args
                          if self._rows_of(a) is not None and same_shape(_dims(a), dims)), None)
        if rows_dims is None:
            return False
        qdq = name in ("relax.quantize", "relax.dequantize")
        if qdq and int(call.attrs.axis) % len(dims) != len(dims) - 1 and not all(
                _one_element(a) for a in call.args[1:3]):
            return False  # per-channel along a spatial axis
        args = []
        for arg in call.args[:1] if qdq else call.args:
            rows, arg_dims = self._rows_of(arg), _dims(arg)
            if rows is not None and same_shape(arg_dims, dims):
                args.append(rows)
            elif _is_const(arg) and _channel_constant(arg, len(dims)) is not None:
                args.append(_channel_constant(arg, len(dims)))
            elif _per_channel(arg_dims, len(dims)):  # e.g. a bias not folded yet: [1, 1, 1, C] -> [1, 1, C]
                args.append(self.builder_.emit(relax.op.reshape(arg, [1, 1, arg_dims[-1]])))
            elif tvm.ir.is_prim_expr(arg) or (arg_dims is not None and len(arg_dims) == 0):
                args.append(arg)
            elif arg_dims is not None and same_shape(arg_dims, dims):  # another full-shape operand: its rows
                args.append(self.builder_.emit(relax.op.reshape(arg, rows_dims)))
            else:
                return False
        if qdq:
            op = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
            value = op(args[0], call.args[1], call.args[2], axis=2, out_dtype=str(call.attrs.out_dtype))
        else:
            value = relax.Call(call.op, args, call.attrs, call.ty_args)
        rows = self.builder_.emit(value)
        plain = self._bind(binding, relax.op.reshape(rows, dims))
        self.rows[plain] = rows
        self.moved += 1
        return True


@tvm.transform.module_pass(opt_level=0, name="nativeq.EpiloguesOnRows")
class EpiloguesOnRows:
    """Move elementwise ops after a [N, R, C] -> [N, *S, C] reshape before it (see the module docstring)."""

    def __init__(self):
        self.moved = 0

    def transform_module(self, mod, _ctx):
        mutator = _EpiloguesOnRows(mod)
        new_mod = rewrite_functions(mutator, remove_unused=True)
        self.moved = mutator.moved
        return new_mod
