"""Relax pass: apply the best records of a nativeq tuning database (validated) to the PrimFuncs.

Pipeline position: right after FuseTIR, before nativeq's default schedules (`pipeline.py`).
It wraps TVM's `MetaScheduleApplyDatabase` with a database loaded through
`tuning/database.py`, so a corrupt line is skipped with a warning instead of aborting the
build, and tasks are matched with the same `anchor-block` equality `tune` used. Functions it
schedules are marked `tirx.is_scheduled`; the default schedules leave those alone.
"""

from __future__ import annotations

from pathlib import Path

from nativeq.compile._tvm import relax, tvm
from nativeq.tuning.database import load_database


@tvm.transform.module_pass(opt_level=0, name="nativeq.ApplyTuningDatabase")
class ApplyTuningDatabase:
    """Schedule every PrimFunc that has a record in the database directory `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def transform_module(self, mod, _ctx):
        database = load_database(self.path)
        with database:
            return relax.transform.MetaScheduleApplyDatabase()(mod)
