"""Progress display for `nativeq tune`: tasks done, trials of the current task, best latency so far.

Trials are counted by a MetaSchedule measure callback, called after each measured batch.
"""

from __future__ import annotations

import sys

from nativeq.compile._tvm import derived_object, meta_schedule as ms
from nativeq.tuning.database import FAILED_RUN_SECONDS


def _batch_best_seconds(runner_results) -> float | None:
    best = None
    for result in runner_results:
        if result.error_msg is not None or not result.run_secs:
            continue
        secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
        if secs < FAILED_RUN_SECONDS and (best is None or secs < best):
            best = secs
    return best


def _error_line(message: str) -> str:
    """The informative line of a builder/runner error (they carry Python tracebacks)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "[bt]", "^")) and not ln[:1].isdigit()]
    # the exception line is the last of a traceback
    return (useful[-1] if useful else lines[0] if lines else "unknown error")[:200]


class TuneProgress:
    """A rich progress display (stderr); plain lines when stderr is not a terminal; nothing when disabled
    or under `nativeq -q`."""

    def __init__(self, n_tasks: int, enabled: bool = True):
        from nativeq import _log

        self.n_tasks = n_tasks
        self.enabled = enabled and _log.verbosity() > _log.QUIET
        self.done = 0
        self.name = ""
        self.trials = 0
        self.todo = 0
        self.failed = 0
        self.first_error: str | None = None  # first line of the current task's first failed candidate
        self.best_seconds: float | None = None
        self._progress = None
        self._bar = None

    def __enter__(self):
        from nativeq._log import progress_enabled, rich_progress

        if progress_enabled(self.enabled):
            self._progress = rich_progress()
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def _describe(self) -> str:
        best = "-" if self.best_seconds is None else f"{self.best_seconds * 1e6:.1f} us"
        return f"task {self.done + 1}/{self.n_tasks} {self.name}  best {best}  failed {self.failed}"

    def _print(self, text: str) -> None:
        if self.enabled and self._progress is None:
            print(text, file=sys.stderr, flush=True)

    def start_task(self, name: str, todo: int, have: int) -> None:
        self.name, self.trials, self.todo, self.failed, self.best_seconds = name, 0, max(todo, 0), 0, None
        self.first_error = None
        if todo <= 0:
            self._print(f"[{self.done + 1}/{self.n_tasks}] {name}: {have} trials in the database, at budget; skipped")
        else:
            self._print(f"[{self.done + 1}/{self.n_tasks}] {name}: {have} trials in the database, tuning {todo} more")
        if self._progress is not None:
            self._bar = self._progress.add_task(self._describe(), total=max(todo, 1))

    def on_batch(self, runner_results, builder_results=()) -> None:
        self.trials += len(runner_results)
        self.failed += sum(1 for r in runner_results if r.error_msg is not None)
        if self.first_error is None:
            errors = [r.error_msg for r in (*builder_results, *runner_results) if r.error_msg]
            self.first_error = _error_line(errors[0]) if errors else None
        best = _batch_best_seconds(runner_results)
        if best is not None and (self.best_seconds is None or best < self.best_seconds):
            self.best_seconds = best
        if self._progress is not None:
            self._progress.update(self._bar, completed=self.trials, description=self._describe())
        else:
            best_text = "-" if self.best_seconds is None else f"{self.best_seconds * 1e6:.1f} us"
            self._print(f"    {self.name}: {self.trials}/{self.todo} trials, best {best_text}, failed {self.failed}")

    def warn(self, text: str) -> bool:
        """Print `warning: text` above a live display as one unwrapped line; False when no display is live
        (the caller then warns through `warnings`, as everywhere else)."""
        if self._progress is None:
            return False
        self._progress.console.print(f"warning: {text}", soft_wrap=True, markup=False, highlight=False)
        return True

    def fail_task(self, reason: str) -> None:
        """The current task failed (the caller warns with `reason`); the display moves on to the next."""
        if self._progress is not None and self._bar is not None:
            best = "-" if self.best_seconds is None else f"{self.best_seconds * 1e6:.1f} us"
            self._progress.update(self._bar, completed=max(self.todo, 1),
                                  description=f"task {self.done + 1}/{self.n_tasks} {self.name}  FAILED  best {best}")
        self.done += 1

    def finish_task(self, best_us: float | None) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=max(self.todo, 1), description=self._describe())
        self.done += 1

    def callback(self):
        return _ProgressCallback(self)


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, progress: TuneProgress):
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.progress.on_batch(runner_results, builder_results)
