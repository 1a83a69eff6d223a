"""Module pass: each recurrent input projection gets the register tile of the target.

Pipeline position: `schedule_passes(target)`, first (after FuseOps/FuseTIR, before the default schedules). The
ONNX import builds an LSTM / GRU / RNN's input projection as a scheduled PrimFunc (`compile/recurrent.py`) before
the target is known, with a tile of 4 rows x 16 columns that fits every target's registers; this pass rebuilds it
with `recurrent.projection_rows` for the target's vector width (8 rows on AVX-512: twice the independent FMA chains).
The sums and their order are the same, so the outputs are bit-identical.
"""

from __future__ import annotations

from nativeq.compile._tvm import tirx, tvm
from nativeq.compile.recurrent import PROJECTION_ATTR, projection_for_target


@tvm.transform.module_pass(opt_level=0, name="nativeq.RecurrentProjectionTiles")
class RecurrentProjectionTiles:
    """Rebuild every recurrent projection PrimFunc for the target's vector width (see the module docstring)."""

    def __init__(self, vector_bits: int):
        self.vector_bits = vector_bits
        self.rebuilt = 0

    def transform_module(self, mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and PROJECTION_ATTR in func.attrs:
                rebuilt = projection_for_target(func, self.vector_bits)
                if not rebuilt.same_as(func):
                    updates[gvar] = rebuilt
        for gvar, func in updates.items():
            mod[gvar] = func
        self.rebuilt = len(updates)
        return mod
