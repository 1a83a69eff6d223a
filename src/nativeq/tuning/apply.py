"""Relax pass: apply the best records of a nativeq tuning database (validated) to the PrimFuncs.

Pipeline position: right after FuseTIR, before nativeq's default schedules (`pipeline.py`).

1. nativeq's int8 matmul kernels: the winning knobs of their record (`template.knobs_for`) are
   applied to nativeq's int8 schedule. A kernel with a symbolic time axis is looked up by its
   static twin at the sizes the database was tuned at (`dims` of each model in
   `nativeq_tuning.json`, in file order; the first that has a record wins).
2. Everything else: TVM's `MetaScheduleApplyDatabase` replays the record's trace (static shapes),
   one kernel at a time: a record that no longer fits its kernel (a database from an older nativeq)
   is skipped with a warning naming the kernel, and the kernel keeps the default schedule.

The database is loaded through `tuning/database.py`, so a corrupt line is skipped with a warning
instead of aborting the build, and tasks are matched with the same `anchor-block` equality `tune`
used. Functions it schedules are marked `tirx.is_scheduled`; the default schedules leave those alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from nativeq.compile._tvm import relax, tirx, tvm
from nativeq._text import first_line
from nativeq.tuning.database import load_database, read_summary, workload_key

_SCHEDULED = "tirx.is_scheduled"


def tuned_dims(path: Path) -> list[dict[str, int]]:
    """The distinct symbolic-size bindings the database's models were tuned at, in file order."""
    options: list[dict[str, int]] = []
    for entry in read_summary(path)["models"].values():
        dims = {str(k): int(v) for k, v in (entry.get("dims") or {}).items()}
        if dims not in options:
            options.append(dims)
    return options


@tvm.transform.module_pass(opt_level=0, name="nativeq.ApplyTuningDatabase")
class ApplyTuningDatabase:
    """Schedule every PrimFunc that has a record in the database directory `path`.

    After it ran, `applied` maps each tuned kernel to what was applied: its knobs (nativeq's
    int8 schedule) or "trace" (a MetaSchedule trace replayed).
    """

    def __init__(self, path: str | Path, target=None):
        self.path = Path(path)
        self.target = target  # a nativeq Target: enables the int8 knobs (None: traces only)
        self.applied: dict[str, str] = {}

    def transform_module(self, mod, _ctx):
        from nativeq.tuning.template import static_twins, task_module

        dims_options = tuned_dims(self.path)
        twins = {gvar: static_twins(func, dims_options) for gvar, func in mod.functions_items()
                 if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func)}
        # only the workloads these kernels can match are decoded (all of them: seconds per compile)
        wanted = {workload_key(task_module(twin)) for candidates in twins.values() for twin in candidates}
        database = load_database(self.path, only=wanted)
        self.applied = self._apply_int8_knobs(mod, database, twins)
        with database:
            for gvar, func in list(mod.functions_items()):
                if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                    replayed = _replay_trace(gvar, func)
                    if replayed is not None:
                        mod[gvar] = replayed
                        self.applied[gvar.name_hint] = "trace"
        return mod

    def _apply_int8_knobs(self, mod, database, twins: dict) -> dict[str, str]:
        """Schedule the int8 matmuls that have template records (in place in `mod`); {kernel: knobs}."""
        from nativeq.compile.schedules.intrinsics import dot_intrin_for
        from nativeq.compile.schedules.matmul import (
            int8_matmul_n_blocks,
            kernel_intrin,
            register_tile,
            schedule_int8_matmul,
        )
        from nativeq.tuning.template import is_tunable_int8_matmul, knobs_for

        intrin = dot_intrin_for(self.target) if self.target is not None else None
        if intrin is None or not len(database):
            return {}
        applied, updates = {}, {}
        for gvar, candidates in twins.items():
            func = mod[gvar]
            if not is_tunable_int8_matmul(func, intrin):
                continue
            knobs = knobs_for(candidates, database, default=register_tile(int8_matmul_n_blocks(func, intrin),
                                                                      kernel_intrin(func, intrin)))
            sch = schedule_int8_matmul(func, intrin, knobs) if knobs is not None else None
            if sch is not None:
                updates[gvar] = sch.mod["main"].with_attr(_SCHEDULED, True)
                applied[gvar.name_hint] = knobs.as_text()
        for gvar, func in updates.items():
            mod[gvar] = func
        return applied


def _replay_trace(gvar, func):
    """`func` scheduled by the best record of the current database, or None (no record, or one that fails to replay)."""
    try:
        out = relax.transform.MetaScheduleApplyDatabase()(tvm.IRModule({gvar: func}))
    except Exception as e:  # noqa: BLE001  (TVM raises InternalError when a trace does not fit the function)
        warnings.warn(f"tuning record for kernel {gvar.name_hint} does not replay ({first_line(e)}); "
                      f"using the default schedule", stacklevel=2)
        return None
    scheduled = out[gvar.name_hint]
    return scheduled if _is_scheduled(scheduled) else None


def _is_scheduled(func) -> bool:
    return func.attrs is not None and _SCHEDULED in func.attrs
