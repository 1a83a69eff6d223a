"""Autotuning: MetaSchedule search over the int8 kernels, records in `tuning_logs/<target>/`.

`tune_model(model, TuneConfig(...))` tunes (locally or on a device over TVM RPC) into a JSON
database directory; `nativeq compile` applies its best records (`apply.py`);
`tuning_status()` says what is tuned for which target and model.
"""

from nativeq.tuning.status import tuning_status
from nativeq.tuning.tune import FailedTask, TaskFailedWarning, TaskResult, TuneConfig, TuneResult, tune_model

__all__ = ["FailedTask", "TaskFailedWarning", "TaskResult", "TuneConfig", "TuneResult", "tune_model", "tuning_status"]
