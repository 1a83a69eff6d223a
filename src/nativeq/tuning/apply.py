"""Relax pass: apply the best records of a nativeq tuning database (validated) to the PrimFuncs.

Pipeline position: right after FuseTIR, before nativeq's default schedules (`pipeline.py`).
It wraps TVM's `MetaScheduleApplyDatabase` with a database loaded through
`tuning/database.py`, so a corrupt line is skipped with a warning instead of aborting the
build, and tasks are matched with the same `anchor-block` equality `tune` used. Functions it
schedules are marked `tirx.is_scheduled`; the default schedules leave those alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from nativeq.compile._tvm import relax, tirx, tvm
from nativeq.tuning.database import load_database


@tvm.transform.module_pass(opt_level=0, name="nativeq.ApplyTuningDatabase")
class ApplyTuningDatabase:
    """Schedule every PrimFunc that has a record in the database directory `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def transform_module(self, mod, _ctx):
        database = load_database(self.path)
        before = _scheduled(mod)
        with database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        self.applied = sorted(_scheduled(mod) - before)
        if len(database) and not self.applied:
            # NOTE: records are keyed on the exact kernel IR: a change to the int8 passes or
            # kernel layouts makes older records miss (a rerun of `nativeq tune` refreshes them).
            warnings.warn(f"tuning database {self.path} has records but none matches a kernel of this model "
                          f"(tuned for other shapes, or by an older nativeq); using the default schedules",
                          stacklevel=2)
        return mod


def _scheduled(mod) -> set[str]:
    return {gv.name_hint for gv, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "tirx.is_scheduled" in func.attrs}
