"""Relax pass: rebuild a run-time activation pack whose operand's shape LegalizeOps wrote differently.

Pipeline position: right after LegalizeOps (`compile/pipeline.py`), before FuseOps and FuseTIR.

`PackInt8Activations` builds each pack PrimFunc before LegalizeOps, from its operand's inferred shape.
LegalizeOps then gives the operand's producer the shape its TE computation derives, which can be
another, equal expression of the same symbolic sizes: a time axis sliced with step 2 is inferred
as `(min(2^63 - 1, T) + 1) // 2` and legalized as `(min(2^63 - 1, T) + 1 - min(0, T)) // 2`. When FuseOps
then fuses the producer (a permute_dims) into the pack, FuseTIR finds two buffers of different
shapes for one tensor and stops with an internal error ("Inconsistent buffers ... mapped to the
same relax var"). A pack whose operand's shape is no longer its PrimFunc's input shape is built
again from the operand as it is now; the old PrimFunc, unused, is dropped.
"""

from __future__ import annotations

from nativeq.compile._tvm import Schedule, relax, tvm
from nativeq.compile.passes import rewrite_functions
from nativeq.compile.schedules.generic import has_block
from nativeq.compile.schedules.pack_activations import PACK_BLOCK, pack_activation_te

_CALL_TIR = "relax.call_tir"


def _pack_buffers(func):
    """(input, output) buffers of a pack PrimFunc's pack block."""
    sch = Schedule(func)
    block = sch.get(sch.get_sblock(PACK_BLOCK))
    return block.reads[0].source, block.writes[0].source


@relax.expr_functor.mutator
class _Repacker(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rebuilt: set = set()

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != _CALL_TIR:
            return call
        gvar, args = call.args[0], call.args[1]
        func = self.builder_.get()[gvar]
        if not isinstance(func, tvm.tirx.PrimFunc) or not has_block(func, PACK_BLOCK):
            return call
        operand = args.fields[0]
        if not isinstance(operand.ty, relax.TensorType) or not isinstance(operand.ty.shape, relax.ShapeExpr):
            return call
        source, packed = _pack_buffers(func)
        if [str(d) for d in operand.ty.shape.values] == [str(d) for d in source.shape]:
            return call
        lanes, kstep = (int(d) for d in packed.shape[-2:])
        self.rebuilt.add(gvar)
        return self.builder_.call_te(pack_activation_te, operand, lanes=lanes, kstep=kstep,
                                     primfunc_name_hint=gvar.name_hint, primfunc_attrs=dict(func.attrs))


@tvm.transform.module_pass(opt_level=0, name="nativeq.RepackAfterLegalize")
class RepackAfterLegalize:
    """Rebuild the activation packs whose operand's shape LegalizeOps rewrote (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        repacker = _Repacker(mod)
        new_mod = rewrite_functions(repacker)
        if not repacker.rebuilt:
            return mod
        return relax.transform.DeadCodeElimination()(new_mod)
