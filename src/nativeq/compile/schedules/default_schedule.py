"""Module pass: apply nativeq's CPU schedule rules to every unscheduled PrimFunc.

Pipeline position: `schedule_passes(target)`, after FuseOps/FuseTIR, before `relax.build`
lowers TIR. Rules, first that applies wins:

1. `matmul.schedule_int8_matmul`: packed int8 matmul + fused epilogue, tensorized with the
   target's int8 dot intrinsic (`intrinsics.py`; a packed float32 matmul with its multiply-add
   one); `matmul.schedule_int8_pack`: the run-time pack of an activation operand
   (`pack_activations.py`) with its fused producers;
   `depthwise.schedule_depthwise`: an int8 depthwise conv (channels-last) + fused epilogue;
   `conv_as_matmul.schedule_im2col`: a conv's im2col gather (parallel rows, unrolled taps);
   `softmax.schedule_softmax` and `layer_norm.schedule_layer_norm`: MLAS-order softmax and ORT-order
   LayerNorm rows with their fused epilogues;
2. dlight's CPU `Reduction` rule: softmax / layer norm style reductions (not convolutions:
   blocks reducing over 2+ axes go to the generic rule, which vectorizes their output axis, and so do
   reductions to one value that a later block broadcasts, which the dlight rule recomputes per element,
   pools, small windows read along an output axis, and reductions whose result is not broadcast back
   (a mean over time), which it leaves scalar);
3. `generic.schedule_generic`: parallel outer loops, vectorized inner loops.

A kernel of static shape too small to pay for a parallel launch runs its schedule serially
(`parallel.py`).

A function no rule takes keeps TVM's default (naive, correct) code. Scheduled functions are
marked `tirx.is_scheduled`, so a later tuning database or dlight pass leaves them alone.
"""

from __future__ import annotations

import logging

from nativeq.compile._tvm import DlightCpuReduction, TVMTarget, tirx, tvm
from nativeq.compile.schedules.conv_as_matmul import schedule_im2col
from nativeq.compile.schedules.depthwise import DEPTHWISE_BLOCK, schedule_depthwise
from nativeq.compile.schedules.generic import (block_dtype, has_integer_matmul, has_multi_axis_reduction,
                                               has_unbroadcast_reduction, has_whole_tensor_reduction,
                                               has_window_reduction, schedule_generic)
from nativeq.compile.schedules.intrinsics import depthwise_quad_intrin_for, dot_intrin_for, fma_intrin_for
from nativeq.compile.schedules.layer_norm import schedule_layer_norm
from nativeq.compile.schedules.matmul import is_float_matmul, schedule_int8_matmul, schedule_int8_pack
from nativeq.compile.schedules.pack_activations import PACK_BLOCK
from nativeq.compile.schedules.parallel import without_parallel, worth_parallel
from nativeq.compile.schedules.softmax import schedule_softmax

logger = logging.getLogger(__name__)

_SCHEDULED = "tirx.is_scheduled"


def vector_bits(target) -> int:
    """Widest vector register the target's int8 family implies (the schedules' vector width)."""
    return {"avx512-vnni": 512, "avx2": 256}.get(target.int8, 128)


def _is_scheduled(func) -> bool:
    return func.attrs is not None and _SCHEDULED in func.attrs and int(func.attrs[_SCHEDULED]) == 1


@tvm.transform.module_pass(opt_level=0, name="nativeq.DefaultCpuSchedule")
class DefaultCpuSchedule:
    """Schedule every PrimFunc of the module for a nativeq `target` (see the module docstring)."""

    def __init__(self, target):
        self.target = target
        self.tvm_target = TVMTarget(target.tvm_dict())
        self.intrin = dot_intrin_for(target)
        self.fma = fma_intrin_for(target)
        self.depthwise_quad = depthwise_quad_intrin_for(target)
        self.applied: dict[str, str] = {}  # PrimFunc name -> rule that scheduled it

    def schedule(self, func):
        """(rule name, scheduled PrimFunc) or (None, func) when no rule applies.

        A kernel too small to pay for a parallel launch (`parallel.py`) gets its rule's schedule without
        the parallel loops.
        """
        rule, sch = self._rule_schedule(func)
        if sch is None:
            return None, func
        if not worth_parallel(func, vector_bits(self.target)):
            sch = without_parallel(sch, func)
        return rule, sch.mod["main"]

    def _rule_schedule(self, func):
        """(rule name, Schedule) of the first rule that applies, or (None, None)."""
        bits = vector_bits(self.target)
        if self.intrin is not None:
            if is_float_matmul(func):
                sch = schedule_int8_matmul(func, self.fma)
                if sch is not None:
                    return "float-matmul", sch
            sch = schedule_int8_matmul(func, self.intrin)
            if sch is not None:
                return "int8-matmul", sch
            sch = schedule_int8_pack(func)
            if sch is not None:
                return ("float-pack" if block_dtype(func, PACK_BLOCK) == "float32" else "int8-pack"), sch
        sch = schedule_depthwise(func, bits, self.depthwise_quad)
        if sch is not None:
            return ("float-depthwise" if block_dtype(func, DEPTHWISE_BLOCK) == "float32" else "depthwise"), sch
        sch = schedule_im2col(func, bits)
        if sch is not None:
            return "im2col", sch
        sch = schedule_softmax(func, bits)
        if sch is not None:
            return "softmax", sch
        sch = schedule_layer_norm(func, bits)
        if sch is not None:
            return "layer-norm", sch
        if (has_multi_axis_reduction(func) or has_integer_matmul(func) or has_whole_tensor_reduction(func)
                or has_window_reduction(func) or has_unbroadcast_reduction(func)):
            sch = schedule_generic(func, bits)
            if sch is not None:
                return "generic", sch
        with self.tvm_target:
            try:
                sch = DlightCpuReduction().apply(func, self.tvm_target, False)
            except (RuntimeError, ValueError) as err:
                logger.debug("dlight reduction rule failed: %s", err)
                sch = None
        if sch is not None:
            return "reduction", sch
        sch = schedule_generic(func, bits)
        if sch is not None:
            return "generic", sch
        return None, None

    def transform_module(self, mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            rule, new_func = self.schedule(func)
            self.applied[gvar.name_hint] = rule or "none"
            if rule is not None:
                updates[gvar] = new_func.with_attr(_SCHEDULED, True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
