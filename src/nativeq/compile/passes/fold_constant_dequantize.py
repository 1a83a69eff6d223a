"""FoldConstantDequantize: a dequantize of constants becomes the float32 constant it computes.

Where it sits: last of the int8 passes (after FoldQuantizeDequantize), before the kernel layout
passes (`kernel_relax_passes`). What reaches it is float math: every site the int8 rewrite could
turn into an integer kernel already reads the integer weight itself, so a weight still behind a
DequantizeLinear belongs to a matmul or conv that stays float32. Such sites come from models the
int8 kernels do not take: 16-bit activations (`quantize_static(activation_type=QUInt16)`, the
A16W8 recipe of NPU toolchains), a weight-only quantized conv, a site whose scales are refused.

    w  = R.dequantize(Wq, s, zp, axis=0, out_dtype="float32")   # every operand a constant
    y  = R.nn.conv1d(x, w, ...)                                 # float32

becomes `R.nn.conv1d(x, W, ...)` with W = float32(int32(Wq) - zp) * s, the product LegalizeOps
would build (and ONNX Runtime's DequantizeLinear computes): the subtraction is exact in int32, the
difference exact in float32 (|Wq - zp| < 2^24), one float32 multiply. TVM's FoldConstant would fold
it too, but only after legalization: the float conv routes of `Int8ConvsChannelsLast` (im2col +
packed float matmul, the float depthwise kernel) and the float weight packing look for a constant
weight before that, and a conv whose weight is not yet a constant ran TVM's scalar loop nest.
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.passes.qdq_sites import const_array


def dequantized(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """float32((data - zero_point) * scale) with per-axis or scalar parameters, as LegalizeOps computes it."""
    shape = [1] * data.ndim
    if scale.size > 1 or zero_point.size > 1:
        shape[axis % data.ndim] = -1
    difference = data.astype(np.int32) - zero_point.astype(np.int32).reshape(shape if zero_point.size > 1 else ())
    return difference.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ())


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.folded = 0
        self.constants: dict = {}  # dataflow var bound to a folded dequantize -> its constant

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        constant = _folded(value)
        if constant is not None and isinstance(binding.var, relax.DataflowVar):
            # NOTE: readers get the constant itself: the layout passes match a constant operand, not a var
            self.constants[binding.var] = constant
            self.folded += 1
            return
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, name_hint=str(binding.var.name)))

    def visit_dataflow_var_(self, var):
        constant = self.constants.get(var)
        return constant if constant is not None else super().visit_dataflow_var_(var)


def _folded(call):
    """The float32 constant `call` computes when it is a dequantize of integer constants, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.dequantize"):
        return None
    if str(call.attrs.out_dtype) != "float32":
        return None
    operands = [const_array(arg) for arg in call.args]
    if any(value is None for value in operands) or operands[0].dtype.kind not in "iu":
        return None
    return relax.const(dequantized(*operands, int(call.attrs.axis)), "float32")


@tvm.transform.module_pass(opt_level=0, name="nativeq.FoldConstantDequantize")
class FoldConstantDequantize:
    """Replace dequantizes of constants by their float32 values (see the module docstring)."""

    def __init__(self):
        self.folded = 0

    def transform_module(self, mod, _ctx):
        folder = _Folder(mod)
        new_mod = rewrite_functions(folder)
        self.folded = folder.folded
        return new_mod
