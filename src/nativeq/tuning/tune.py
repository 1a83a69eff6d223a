"""`tune_model`: MetaSchedule search over the int8 kernels of a (QDQ) ONNX model.

Same front half as `nativeq compile` (read, legalize, import, the target's pass list up to
FuseTIR), so the tuned PrimFuncs are exactly the ones `compile` looks up in the database.
Each contraction kernel (matmul/conv: a PrimFunc with a reduction block) is one task; tasks
are tuned one after another, each up to its trial budget, and every measured candidate is
appended to the database as soon as it is measured. A rerun counts the records a task
already has and tunes only the missing trials, so an interrupted run resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

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
class TuneResult:
    work_dir: Path
    target: str
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    symbolic: list[str] = field(default_factory=list)  # kernels not tuned: symbolic shapes

    def summary(self) -> str:
        lines = [f"tuned {len(self.tasks)} task(s) for {self.target} in {self.seconds:.0f} s; database {self.work_dir}"]
        width = max([len(t.name) for t in self.tasks] + [4])
        lines.append(f"  {'task'.ljust(width)}  kernels  trials  new  best")
        for t in self.tasks:
            best = "-" if t.best_us is None else f"{t.best_us:.1f} us"
            lines.append(f"  {t.name.ljust(width)}  {t.weight:7d}  {t.trials:6d}  {t.new_trials:3d}  {best}")
        if self.symbolic:
            lines.append(f"  not tuned (symbolic shapes, MetaSchedule tunes static shapes only): {', '.join(self.symbolic)}")
        return "\n".join(lines)


def default_work_dir(target: Target) -> Path:
    return Path("tuning_logs") / target.name


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


def lower_for_tuning(model_path: Path, target: Target, int8: bool = True):
    """(Relax module right before scheduling, TVM target): what `compile` applies the database to."""
    from nativeq.compile.api import import_model, load_onnx, make_tvm_target
    from nativeq.compile._tvm import tvm
    from nativeq.compile.pipeline import compile_passes

    mod = import_model(load_onnx(model_path), model_path)
    passes = compile_passes(target, int8=int8, tuning_database=None)
    names = [p.info.name for p in passes]
    # NOTE: the database is applied right after FuseTIR in compile's pipeline (pipeline.py);
    # tasks must be extracted from the same point or their hashes never match.
    before_schedules = passes[: names.index("FuseTIR") + 1]
    tvm_target = make_tvm_target(target)
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(before_schedules, name="nativeq_before_schedules")(mod)
    return mod, tvm_target


def extract_tasks(mod, tvm_target) -> tuple[list, list]:
    """(tunable tasks, names of symbolic-shape tasks) among the contraction kernels.

    A contraction kernel is a PrimFunc with a reduction block (matmul/conv). MetaSchedule
    tunes static shapes only (its DisallowDynamicLoop postproc rejects every candidate of a
    kernel with a symbolic extent), so those are reported, not tuned.
    """
    from nativeq.compile._tvm import meta_schedule as ms, s_tir

    tasks = ms.relax_integration.extract_tasks(mod, tvm_target, module_equality=dbfiles.MODULE_EQUALITY)
    contractions = [t for t in tasks if _has_reduction(t.dispatched[0], s_tir)]
    static = [t for t in contractions if _is_static(t.dispatched[0])]
    return static, [t.task_name for t in contractions if t not in static]


def _is_static(mod) -> bool:
    from nativeq.compile._tvm import tirx

    for func in mod.functions.values():
        for param in func.params:  # NOTE: TVM 0.27 PrimFunc params are the buffers (no buffer_map)
            shape = getattr(param, "shape", None) or []
            if not all(isinstance(d, tirx.IntImm) for d in shape):
                return False
    return True


def _has_reduction(mod, s_tir) -> bool:
    block = s_tir.analysis.find_anchor_sblock(mod)
    return block is not None and any(int(iv.iter_type) == 2 for iv in block.iter_vars)  # 2: kCommReduce


def task_budgets(total: int, n_tasks: int, minimum: int) -> int:
    return max(minimum, math.ceil(total / max(n_tasks, 1)))


def tune_model(model_path, cfg: TuneConfig) -> TuneResult:
    """Tune the kernels of the ONNX model at `model_path` for `cfg.target` into the database directory."""
    started = time.perf_counter()
    model_path = Path(model_path)
    target = get_target(cfg.target)
    if cfg.trials < 1:
        raise NativeqError(f"--trials {cfg.trials}: must be at least 1")
    remote = remote_spec(cfg)
    if remote is None and target.is_cross:
        raise NativeqError(
            f"target {target.name} is {target.arch}: tune it on the device, e.g. "
            f"--rpc-tracker HOST:PORT --rpc-key {target.name} (this machine cannot run its code)"
        )
    work_dir = Path(cfg.work_dir) if cfg.work_dir else default_work_dir(target)
    if remote is not None:
        check_remote(remote)
    cross_compiler = None
    if target.is_cross:
        from nativeq.compile.api import check_cross_compiler

        cross_compiler = check_cross_compiler(target)

    mod, tvm_target = lower_for_tuning(model_path, target, cfg.int8)
    tasks, symbolic = extract_tasks(mod, tvm_target)
    if not tasks and symbolic:
        raise NativeqError(
            f"{model_path}: every matmul/conv kernel has a symbolic shape ({len(symbolic)} kernels); MetaSchedule tunes "
            f"static shapes only: export the model with fixed input dims"
        )
    if not tasks:
        raise NativeqError(f"{model_path} has no matmul/conv kernel to tune")

    from nativeq.compile._tvm import meta_schedule as ms
    from nativeq.tuning.progress import TuneProgress
    from nativeq.tuning.space import space_generator

    database = dbfiles.open_database(work_dir)
    existing = dbfiles.read_database(work_dir).record_counts()
    budget = task_budgets(cfg.trials, len(tasks), cfg.min_trials_per_task)
    keys = [_workload_key(database, t.dispatched[0]) for t in tasks]
    summary = dbfiles.read_summary(work_dir)
    model_entry = {"target": target.name, "tvm_target": str(tvm_target), "budget_per_task": budget, "tasks": {}}
    summary["models"][model_path.name] = model_entry

    builder = make_builder(cross_compiler)
    runner = make_runner(remote)
    results: list[TaskResult] = []
    progress = TuneProgress(len(tasks), enabled=cfg.progress)
    try:
        with progress:
            for task, key in zip(tasks, keys):
                have = existing.get(key, 0)
                todo = budget - have
                progress.start_task(task.task_name, todo, have)
                if todo > 0:
                    _tune_one(ms, task, tvm_target, target, todo, cfg, work_dir, database, builder, runner, progress)
                lines = dbfiles.read_database(work_dir)
                best = lines.best_seconds().get(key)
                trials = lines.record_counts().get(key, 0)
                results.append(TaskResult(task.task_name, key, int(task.weight), budget, trials, trials - have,
                                          None if best is None else best * 1e6))
                model_entry["tasks"][task.task_name] = {"workload": key, "kernels": int(task.weight),
                                                        "trials": trials, "best_us": results[-1].best_us}
                dbfiles.write_summary(work_dir, summary)
                progress.finish_task(results[-1].best_us)
    finally:
        dbfiles.write_summary(work_dir, summary)
    return TuneResult(work_dir=work_dir, target=target.name, tasks=results, seconds=time.perf_counter() - started,
                      symbolic=symbolic)


def _workload_key(database, mod) -> str:
    return str(database.commit_workload(mod).as_json()[0])


def _tune_one(ms, task, tvm_target, target, todo, cfg, work_dir, database, builder, runner, progress) -> None:
    from nativeq.tuning.space import space_generator

    context = ms.TuneContext(
        mod=task.dispatched[0],
        target=tvm_target,
        space_generator=space_generator(target),
        search_strategy="evolutionary",
        task_name=task.task_name,
        num_threads=1,
        rand_state=cfg.seed,
    )
    try:
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
        from nativeq.compile.api import first_line

        raise NativeqError(f"tuning task {task.task_name} for {target.name} failed: {first_line(e)}") from None
