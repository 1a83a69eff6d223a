"""RemoveIdentityReshapes: a reshape to the shape its input already has is replaced by its input.

Where it sits: first in the int8 passes, right after ONNX import. Exporters emit such reshapes
around normalizations (GroupNorm with one group per channel: `Reshape [N, C, T] -> [N, C, -1]`),
and with a symbolic size TVM cannot tell that the target shape is the same: the reshape then
becomes a copy kernel whose every index is a division and a modulo by the symbolic length (a
wav2vec2 feature extractor spent a quarter of its time in two of them), and it separates the ops
around it (the QDQ folds, the channels-last layout) that would otherwise meet.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, relax, tvm
from nativeq.compile.passes import rewrite_functions


def _same_shape(shape, target) -> bool:
    if not isinstance(shape, relax.ShapeExpr) or not isinstance(target, relax.ShapeExpr):
        return False
    if len(shape.values) != len(target.values):
        return False
    analyzer = Analyzer()
    return all(analyzer.can_prove_equal(a, b) for a, b in zip(shape.values, target.values))


@relax.expr_functor.mutator
class _Remover(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.removed = 0

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        is_reshape = isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.reshape"
        if (is_reshape and isinstance(binding.var, relax.DataflowVar) and isinstance(value.args[0], relax.Var)
                and _same_shape(getattr(value.args[0].ty, "shape", None), value.ty.shape)):
            self.set_var_remap(binding.var, value.args[0])  # users read the input itself: no alias binding
            self.removed += 1
            return
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, name_hint=str(binding.var.name)))


@tvm.transform.module_pass(opt_level=0, name="nativeq.RemoveIdentityReshapes")
class RemoveIdentityReshapes:
    """Replace reshapes to their input's own shape by the input (see the module docstring)."""

    def __init__(self):
        self.removed = 0

    def transform_module(self, mod, _ctx):
        remover = _Remover(mod)
        new_mod = rewrite_functions(remover)
        self.removed = remover.removed
        return new_mod
