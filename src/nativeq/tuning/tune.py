"""`tune_model`: MetaSchedule search over the int8 kernels of a (QDQ) ONNX model.

Same front half as `nativeq compile` (read, legalize, import, the target's pass list up to
FuseTIR), so the tuned PrimFuncs are exactly the ones `compile` looks up in the database.
Each contraction kernel (matmul/conv: a PrimFunc with a reduction block) is one task; tasks
are tuned one after another, each up to its trial budget, and every measured candidate is
appended to the database as soon as it is measured. A rerun counts the records a task
already has and tunes only the missing trials, so an interrupted run resumes.

One task never ends the run: a task MetaSchedule fails on (no design space for the kernel, a
search that raises) or whose candidates all fail to build or run is reported (a `TaskFailedWarning`
naming the kernel and the first line of the reason), listed as `failed` in the result and in
`nativeq_tuning.json`, and the next task is tuned. Only when every task failed is the run an error.
Ctrl-C still stops it.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nativeq._data import LOCAL_TUNING_LOGS, PACKAGE_DIR, onnx_model_path
from nativeq.errors import NativeqError
from nativeq.targets import Target, get_target
from nativeq.tuning import database as dbfiles
from nativeq.tuning.rpc import RemoteSpec, check_remote, make_builder, make_runner, parse_address


@dataclass(frozen=True)
class TuneConfig:
    """How to tune.

    target: target name (see `nativeq targets`).
    trials: trial budget for the whole model, split evenly across its tasks (at least
        `min_trials_per_task` each). Trials already in the database count.
    work_dir: database directory; default `tuning_logs/<target>/`.
    rpc_tracker / rpc_key: measure on devices registered at a TVM RPC tracker under a key.
    rpc: measure on one TVM RPC server HOST:PORT directly.
    rpc_workers: measurements in flight at once (servers under the key share them).
    rpc_timeout: seconds one RPC measurement session may take.
    int8: tune the int8-lowered kernels (False: TVM's float QDQ path, as `compile --no-int8`).
    dims: the values to tune symbolic sizes at, by name (e.g. {"T": 300}: tune at the length you
        deploy); unnamed ones get `template.default_dims` (1 for batch, 256 otherwise).
    input_shapes / input_values: as `CompileConfig` takes them, so the tuned kernels are the ones compile makes.
    threads: threads a local measurement runs with (default: the target's cores); an RPC device
        measures with its own default.
    progress: show a progress display on stderr.
    """

    target: str
    trials: int = 64
    work_dir: str | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    rpc: str | None = None
    rpc_workers: int = 1
    rpc_timeout: float = 60.0
    int8: bool = True
    dims: dict[str, int] = field(default_factory=dict)
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    input_values: dict[str, tuple] = field(default_factory=dict)
    threads: int | None = None
    min_trials_per_task: int = 8
    trials_per_iter: int = 32
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class TaskResult:
    name: str
    workload: str  # structural hash, the database key
    weight: int  # how many kernels of the model use it
    budget: int
    trials: int  # records in the database after this run
    new_trials: int
    best_us: float | None


@dataclass(frozen=True)
class FailedTask:
    """A task that produced no usable record this run (the other tasks were still tuned)."""

    name: str
    workload: str
    weight: int  # how many kernels of the model it stands for
    reason: str  # one line: MetaSchedule's error, or why no candidate succeeded

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


class TaskFailedWarning(UserWarning):
    """A tuning task failed; the run goes on with the next task."""


@dataclass(frozen=True)
class TuneResult:
    work_dir: Path
    target: str
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    dims: dict[str, int] = field(default_factory=dict)  # the values symbolic sizes were tuned at
    skipped: list[str] = field(default_factory=list)  # kernels not tuned (unsupported shape), with the reason
    failed: list[FailedTask] = field(default_factory=list)  # tasks whose tuning failed this run

    def summary(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        lines = [f"tuned {len(self.tasks)} task(s){failed} for {self.target} in {self.seconds:.0f} s; "
                 f"database {self.work_dir}"]
        if self.dims:
            lines.append("  symbolic sizes tuned at " + ", ".join(f"{k}={v}" for k, v in self.dims.items()))
        width = max([len(t.name) for t in self.tasks] + [4])
        lines.append(f"  {'task'.ljust(width)}  kernels  trials  new  best")
        for t in self.tasks:
            best = "-" if t.best_us is None else f"{t.best_us:.1f} us"
            lines.append(f"  {t.name.ljust(width)}  {t.weight:7d}  {t.trials:6d}  {t.new_trials:3d}  {best}")
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else "")
            lines.append(f"  not tuned ({len(self.skipped)} kernels with a reduction): {shown}")
        for t in self.failed:
            lines.append(f"  failed: {t.name} ({t.weight} kernel{'s' if t.weight != 1 else ''}): {t.reason}")
        return "\n".join(lines)


def default_work_dir(target: Target) -> Path:
    """`./tuning_logs/<target>/` in the current directory (never the database shipped inside the package)."""
    return LOCAL_TUNING_LOGS / target.name


def remote_spec(cfg: TuneConfig) -> RemoteSpec | None:
    if cfg.rpc_tracker and cfg.rpc:
        raise NativeqError("give either --rpc-tracker HOST:PORT (with --rpc-key) or --rpc HOST:PORT, not both")
    if cfg.rpc_workers < 1:
        raise NativeqError(f"--rpc-workers {cfg.rpc_workers}: must be at least 1")
    if cfg.rpc_tracker:
        if not cfg.rpc_key:
            raise NativeqError("--rpc-tracker needs --rpc-key KEY (the key the device's rpc_server registered)")
        host, port = parse_address(cfg.rpc_tracker, "--rpc-tracker")
        return RemoteSpec(host, port, cfg.rpc_key, cfg.rpc_workers, cfg.rpc_timeout)
    if cfg.rpc_key:
        raise NativeqError("--rpc-key needs --rpc-tracker HOST:PORT")
    if cfg.rpc:
        host, port = parse_address(cfg.rpc, "--rpc")
        return RemoteSpec(host, port, None, cfg.rpc_workers, cfg.rpc_timeout)
    return None


def lower_for_tuning(model_path: Path, target: Target, int8: bool = True, input_shapes: dict | None = None,
                     input_values: dict | None = None):
    """(Relax module right before scheduling, TVM target): what `compile` applies the database to."""
    from nativeq.compile.api import import_model, load_onnx, make_tvm_target
    from nativeq.compile._tvm import tvm
    from nativeq.compile.input_shapes import fix_input_shapes, fix_input_values
    from nativeq.compile.pipeline import compile_passes

    model = fix_input_values(fix_input_shapes(load_onnx(model_path), {}, input_shapes), input_values or {})
    mod = import_model(model, model_path)
    passes = compile_passes(target, int8=int8, tuning_database=None)
    names = [p.info.name for p in passes]
    # NOTE: the database is applied right after FuseTIR in compile's pipeline (pipeline.py);
    # tasks must be extracted from the same point or their hashes never match.
    before_schedules = passes[: names.index("FuseTIR") + 1]
    tvm_target = make_tvm_target(target)
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(before_schedules, name="nativeq_before_schedules")(mod)
    return mod, tvm_target


@dataclass
class Task:
    """One tuning task: a static kernel module and the model kernels that share it."""

    name: str
    mod: object  # tvm.IRModule with the kernel as "main" (`template.task_module`)
    weight: int  # how many kernels of the model it stands for
    choices: int | None  # nativeq int8 matmul: the number of knob settings; None: MetaSchedule's generic rules


def size_names(mod) -> list[str]:
    """The names of the symbolic sizes the model's kernels take (e.g. `T`)."""
    from nativeq.compile._tvm import tirx
    from nativeq.tuning.template import size_vars

    return sorted({name for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) for name in size_vars(f)})


def extract_tasks(mod, target: Target, dims: dict[str, int]) -> tuple[list[Task], list[str]]:
    """(tasks, kernels not tuned with the reason) among the contraction kernels of `mod`.

    A contraction kernel is a PrimFunc with a reduction block (matmul/conv). nativeq's int8 matmuls
    are tuned through their schedule's knobs (`template.py`), symbolic sizes bound to `dims`; other
    contractions get MetaSchedule's generic rules, which need static shapes (its DisallowDynamicLoop
    postproc rejects every candidate with a symbolic extent). Kernels that share a workload
    (`database.MODULE_EQUALITY`) share one task.
    """
    from nativeq.compile._tvm import meta_schedule as ms, s_tir, tirx
    from nativeq.compile.schedules.intrinsics import dot_intrin_for
    from nativeq.compile.schedules.matmul import int8_matmul_n_blocks, is_int8_matmul, kernel_intrin, tile_choices
    from nativeq.tuning.template import is_tunable_int8_matmul, size_vars, specialize, task_module

    intrin = dot_intrin_for(target)
    scratch = ms.database.MemoryDatabase(module_equality=dbfiles.MODULE_EQUALITY)
    tasks: dict[str, Task] = {}
    skipped: list[str] = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or not _has_reduction(task_module(func), s_tir):
            continue
        name, choices = gvar.name_hint, None
        if intrin is not None and is_int8_matmul(func):
            if not is_tunable_int8_matmul(func, intrin):
                skipped.append(f"{name} (symbolic N: padded schedule, no knobs)")
                continue
            static = specialize(func, dims)
            if static is None:
                skipped.append(f"{name} (symbolic sizes that cannot be bound)")
                continue
            choices = len(tile_choices(int8_matmul_n_blocks(func, intrin), kernel_intrin(func, intrin)))
        else:
            static = func if not size_vars(func) else None
            if static is None:
                skipped.append(f"{name} (symbolic shape)")
                continue
        module = task_module(static)
        key = str(scratch.commit_workload(module).as_json()[0])
        if key in tasks:
            tasks[key].weight += 1
        else:
            tasks[key] = Task(name, module, 1, choices)
    return list(tasks.values()), skipped


def _has_reduction(mod, s_tir) -> bool:
    block = s_tir.analysis.find_anchor_sblock(mod)
    return block is not None and any(int(iv.iter_type) == 2 for iv in block.iter_vars)  # 2: kCommReduce


def summary_key(model_path: Path, dims: dict[str, int]) -> str:
    """The model's entry in `nativeq_tuning.json`: its file name, plus the sizes when it has symbolic ones
    (one model tuned at two lengths is two entries)."""
    if not dims:
        return model_path.name
    return f"{model_path.name} [{', '.join(f'{k}={v}' for k, v in dims.items())}]"


def task_budgets(total: int, n_tasks: int, minimum: int) -> int:
    return max(minimum, math.ceil(total / max(n_tasks, 1)))


def tune_model(model_path, cfg: TuneConfig) -> TuneResult:
    """Tune the kernels of the ONNX model at `model_path` for `cfg.target` into the database directory."""
    started = time.perf_counter()
    model_path = onnx_model_path(model_path)
    target = get_target(cfg.target)
    if cfg.trials < 1:
        raise NativeqError(f"--trials {cfg.trials}: must be at least 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise NativeqError(f"--threads {cfg.threads}: must be at least 1")
    remote = remote_spec(cfg)
    if remote is None and target.is_cross:
        raise NativeqError(
            f"target {target.name} is {target.arch}: tune it on the device, e.g. "
            f"--rpc-tracker HOST:PORT --rpc-key {target.name} (this machine cannot run its code)"
        )
    work_dir = Path(cfg.work_dir) if cfg.work_dir else default_work_dir(target)
    if work_dir.resolve().is_relative_to(PACKAGE_DIR):
        raise NativeqError(f"refusing to write tuning records into the installed nativeq package ({work_dir}): "
                           f"run tune from your project directory or pass --work-dir")
    if remote is not None:
        check_remote(remote)
    cross_compiler = None
    if target.is_cross:
        from nativeq.compile.api import check_cross_compiler

        cross_compiler = check_cross_compiler(target)

    from nativeq.tuning.template import default_dims

    mod, tvm_target = lower_for_tuning(model_path, target, cfg.int8, cfg.input_shapes, cfg.input_values)
    names = size_names(mod)
    unknown = sorted(set(cfg.dims) - set(names))
    if unknown:
        raise NativeqError(f"--dim {unknown[0]}: {model_path} has no symbolic size {unknown[0]} "
                           f"(its kernels' symbolic sizes: {', '.join(names) or 'none'})")
    bad = [f"{k}={v}" for k, v in cfg.dims.items() if v < 1]
    if bad:
        raise NativeqError(f"--dim {bad[0]}: a size to tune at must be at least 1")
    dims = default_dims(names, cfg.dims)
    tasks, skipped = extract_tasks(mod, target, dims)
    if not tasks and skipped:
        raise NativeqError(
            f"{model_path}: no matmul/conv kernel can be tuned ({len(skipped)} have a symbolic shape, e.g. {skipped[0]}); "
            f"MetaSchedule's generic rules tune static shapes only: export the model with fixed input dims"
        )
    if not tasks:
        raise NativeqError(f"{model_path} has no matmul/conv kernel to tune")

    from nativeq.compile._tvm import meta_schedule as ms
    from nativeq.tuning.progress import TuneProgress
    from nativeq.tuning.space import space_generator

    database = dbfiles.open_database(work_dir)
    existing = dbfiles.read_database(work_dir).record_counts()
    budget = task_budgets(cfg.trials, len(tasks), cfg.min_trials_per_task)
    keys = [_workload_key(database, t.mod) for t in tasks]
    summary = dbfiles.read_summary(work_dir)
    model_entry = {"target": target.name, "tvm_target": str(tvm_target), "dims": dims, "budget_per_task": budget,
                   "tasks": {}, "failed": {}, "skipped": list(skipped)}
    summary["models"][summary_key(model_path, dims)] = model_entry

    threads = cfg.threads or target.cores
    model_entry["threads"] = threads if remote is None else "device default"
    # NOTE: the local runner's worker processes inherit this environment when the pool starts them
    # (set before it exists); without it TVM's thread pool takes half the hardware threads on x86
    # (it assumes hyper-threading): 1 on a 2-core VM, which ranks 1-thread timings.
    saved_threads = os.environ.get("TVM_NUM_THREADS")
    if remote is None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    builder = make_builder(cross_compiler)
    runner = make_runner(remote)
    results: list[TaskResult] = []
    failed: list[FailedTask] = []
    progress = TuneProgress(len(tasks), enabled=cfg.progress)
    try:
        with progress, _SigintWatch() as interrupt:
            for task, key in zip(tasks, keys):
                have = existing.get(key, 0)
                # a knob space smaller than the budget is measured exhaustively, once
                task_budget = budget if task.choices is None else min(budget, task.choices)
                todo = task_budget - have
                progress.start_task(task.name, todo, have)
                error = None
                if todo > 0:
                    error = _tune_one(ms, task, tvm_target, target, todo, cfg, work_dir, database, builder, runner,
                                      progress, interrupt)
                lines = dbfiles.read_database(work_dir)
                best = lines.best_seconds().get(key)
                trials = lines.record_counts().get(key, 0)
                reason = error or _no_record_reason(best, trials, trials - have, progress.first_error)
                if error is not None and best is not None:
                    reason += f" ({trials} records kept)"
                if reason is not None:
                    failed.append(FailedTask(task.name, key, task.weight, reason))
                    model_entry["failed"][task.name] = {"workload": key, "kernels": task.weight, "budget": task_budget,
                                                        "trials": trials, "reason": reason}
                    dbfiles.write_summary(work_dir, summary)
                    progress.fail_task(reason)
                    message = f"tuning task {task.name} failed, skipped: {reason}"
                    # NOTE: a live progress display would hard-wrap a warning written to stderr
                    if not progress.warn(message):
                        warnings.warn(message, TaskFailedWarning, stacklevel=2)
                    continue
                results.append(TaskResult(task.name, key, task.weight, task_budget, trials, trials - have,
                                          None if best is None else best * 1e6))
                model_entry["tasks"][task.name] = {"workload": key, "kernels": task.weight, "budget": task_budget,
                                                   "trials": trials, "best_us": results[-1].best_us}
                dbfiles.write_summary(work_dir, summary)
                progress.finish_task(results[-1].best_us)
    finally:
        dbfiles.write_summary(work_dir, summary)
        if saved_threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = saved_threads
    if not results:
        first = failed[0]
        more = f"; {len(failed) - 1} more in {work_dir / dbfiles.SUMMARY_FILE}" if len(failed) > 1 else ""
        raise NativeqError(f"{model_path}: every tuning task failed ({len(failed)} of {len(tasks)}), e.g. "
                           f"{first.name}: {first.reason}{more}")
    return TuneResult(work_dir=work_dir, target=target.name, tasks=results, seconds=time.perf_counter() - started,
                      dims=dims, skipped=skipped, failed=failed)


def _no_record_reason(best: float | None, trials: int, new_trials: int, first_error: str | None) -> str | None:
    """Why a task that ran without an error still has no usable record, or None when it has one."""
    if best is not None:
        return None
    if trials == 0:
        return "MetaSchedule found no candidate to measure"
    detail = f": {first_error}" if first_error else ""
    if new_trials > 0:
        return f"all {new_trials} measured candidates failed to build or run{detail}"
    return f"all {trials} trials in the database failed (delete its records to tune it again)"


def _workload_key(database, mod) -> str:
    return str(database.commit_workload(mod).as_json()[0])


def _tune_one(ms, task, tvm_target, target, todo, cfg, work_dir, database, builder, runner, progress,
              interrupt: "_SigintWatch") -> str | None:
    """Tune `task` for `todo` more trials; the first line of the error if MetaSchedule fails on it, else None.

    Ctrl-C stops the run (KeyboardInterrupt propagates); any other failure is the task's alone.
    """
    from nativeq._text import first_line
    from nativeq.tuning.space import space_generator

    try:
        context = ms.TuneContext(
            mod=task.mod,
            target=tvm_target,
            space_generator=space_generator(target, int8_template=task.choices is not None),
            search_strategy="evolutionary",
            task_name=task.name,
            num_threads=1,
            rand_state=cfg.seed,
        )
        ms.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=str(work_dir),
            max_trials_global=todo,
            max_trials_per_task=todo,
            num_trials_per_iter=min(cfg.trials_per_iter, todo),
            builder=builder,
            runner=runner,
            database=database,
            cost_model="xgb",
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress.callback()],
            task_scheduler="round-robin",
            module_equality=dbfiles.MODULE_EQUALITY,
        )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  (TVM raises TVMError/ValueError/RuntimeError from deep inside)
        if interrupt.hit:  # a Ctrl-C that TVM turned into an error on its way through C++
            raise KeyboardInterrupt from None
        return _failure_reason(first_line(e))
    return None


class _SigintWatch:
    """Notes a Ctrl-C (SIGINT) during tuning, handled as before (KeyboardInterrupt).

    NOTE: a KeyboardInterrupt raised inside a Python callback that TVM calls from C++ (the cost model, the
    measure callbacks, nativeq's design-space function) comes out of `tune_tasks` as a RuntimeError with an
    empty message: without this flag, Ctrl-C would skip a task instead of stopping the run.
    """

    def __init__(self):
        self.hit = False
        self._previous = None

    def __enter__(self):
        try:
            previous = signal.getsignal(signal.SIGINT)
        except ValueError:
            return self
        if previous is None or previous == signal.SIG_IGN:
            return self
        chained = previous if callable(previous) else signal.default_int_handler

        def handler(signum, frame):
            self.hit = True
            chained(signum, frame)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: TVM's conversion cannot be told apart, nothing to watch
            return self
        self._previous = previous
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _failure_reason(line: str) -> str:
    line = line.rstrip(": ")
    if "design_spaces.empty()" in line:
        # the int8 template (`template.int8_matmul_space`) or the generic rules found no schedule for the kernel
        return f"no design space: the schedule rules do not apply to this kernel ({line})"
    return line
