"""The tuning database: TVM's MetaSchedule JSON database, validated before TVM reads it.

A database is a directory (`tuning_logs/<target>/` by default) holding TVM's two line-based
files plus nativeq's summary:

    database_workload.json        one workload per line: ["<structural hash>", "<IRModule as base64 JSON>"]
    database_tuning_record.json   one record per line:   [<workload line index>, [trace, run_secs, target, args]]
    nativeq_tuning.json           which models were tuned, per-task trial counts and best times (`tune --status`)

TVM appends a line per committed record, so a tuner killed mid-write can leave a truncated
last line, and a hand-edited file can hold any garbage. TVM's reader aborts on such a line;
`read_database` instead skips every line that does not parse (warning with file and line
number), drops records whose workload was skipped, and renumbers the rest. `repair_database`
rewrites the files with only the valid lines (atomically) so TVM can append to them again.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nativeq._fs import write_json_atomic, write_text_atomic
from nativeq.errors import NativeqError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
SUMMARY_FILE = "nativeq_tuning.json"
DATABASE_FILES = (WORKLOAD_FILE, RECORD_FILE)
# NOTE: tuning and compile must hash tasks the same way. "anchor-block" keys a task by its
# matmul/conv block only, so layers of one shape whose fused epilogues differ in baked
# requantize constants share one task and one record.
MODULE_EQUALITY = "anchor-block"
FAILED_RUN_SECONDS = 1e9  # TVM stores 1e10 s for a trial that failed to build or run


class DatabaseLineWarning(UserWarning):
    """A line of a tuning database file was skipped."""


@dataclass
class DatabaseLines:
    """The valid lines of a database directory, records renumbered to the kept workloads."""

    workloads: list[str] = field(default_factory=list)  # raw JSON lines
    records: list[tuple[int, str]] = field(default_factory=list)  # (workload index, raw JSON line)
    skipped: int = 0

    def record_counts(self) -> dict[str, int]:
        """Records (trials) per workload hash."""
        counts = {json.loads(w)[0]: 0 for w in self.workloads}
        for index, _ in self.records:
            counts[json.loads(self.workloads[index])[0]] += 1
        return counts

    def best_seconds(self) -> dict[str, float | None]:
        """Best measured mean run time per workload hash (None: no successful trial)."""
        best: dict[str, float | None] = {json.loads(w)[0]: None for w in self.workloads}
        for index, line in self.records:
            secs = _mean_run_seconds(json.loads(line)[1])
            key = json.loads(self.workloads[index])[0]
            if secs is not None and (best[key] is None or secs < best[key]):
                best[key] = secs
        return best


def _mean_run_seconds(record) -> float | None:
    run_secs = record[1] if len(record) > 1 else None
    if not run_secs:
        return None
    mean = sum(float(s) for s in run_secs) / len(run_secs)
    return None if mean >= FAILED_RUN_SECONDS else mean


def _warn(path: Path, line_no: int, why: str) -> None:
    warnings.warn(f"tuning database {path}:{line_no}: {why}; line skipped", DatabaseLineWarning, stacklevel=3)


def _valid_workload(obj) -> bool:
    return isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) and x for x in obj)


def _valid_record(obj) -> bool:
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
        return False
    rec = obj[1]
    return (isinstance(rec, list) and len(rec) == 4 and isinstance(rec[0], list)
            and (rec[1] is None or (isinstance(rec[1], list) and all(isinstance(s, (int, float)) for s in rec[1])))
            and isinstance(rec[2], dict) and isinstance(rec[3], list))


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    try:
        return path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise NativeqError(f"cannot read tuning database file {path}: {e.strerror}") from None


def _valid_lines(path: Path, is_valid, what: str, out: "DatabaseLines"):
    """(0-based line index, raw line, parsed JSON) of each valid line of `path`; a bad line is
    counted in `out.skipped` and warned about with its file and 1-based line number."""
    for index, raw in enumerate(_lines(path)):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            out.skipped += 1
            _warn(path, index + 1, "not valid JSON")
            continue
        if not is_valid(obj):
            out.skipped += 1
            _warn(path, index + 1, f"not a {what}")
            continue
        yield index, raw, obj


def read_database(directory: str | Path) -> DatabaseLines:
    """The valid lines of the database in `directory`; bad lines are skipped with a warning."""
    directory = Path(directory)
    out = DatabaseLines()
    index_map: dict[int, int] = {}  # workload line index in the file -> index among kept workloads
    seen_hashes: dict[str, int] = {}
    for file_index, raw, obj in _valid_lines(directory / WORKLOAD_FILE, _valid_workload, "[hash, module] workload", out):
        # NOTE: TVM numbers workloads by line; a blank line would shift the indices, so keep
        # the file index -> kept index map explicit.
        if obj[0] in seen_hashes and out.workloads[seen_hashes[obj[0]]] == raw:
            index_map[file_index] = seen_hashes[obj[0]]
            continue
        index_map[file_index] = len(out.workloads)
        seen_hashes.setdefault(obj[0], len(out.workloads))
        out.workloads.append(raw)
    for index, _, obj in _valid_lines(directory / RECORD_FILE, _valid_record, "[workload, record] tuning record", out):
        if obj[0] not in index_map:
            out.skipped += 1
            _warn(directory / RECORD_FILE, index + 1, f"refers to workload {obj[0]}, which is missing or was skipped")
            continue
        out.records.append((index_map[obj[0]], json.dumps([index_map[obj[0]], obj[1]], separators=(",", ":"))))
    return out


def _write_lines(directory: Path, lines: DatabaseLines) -> None:
    write_text_atomic(directory / WORKLOAD_FILE, "".join(w + "\n" for w in lines.workloads))
    write_text_atomic(directory / RECORD_FILE, "".join(r + "\n" for _, r in lines.records))


def repair_database(directory: str | Path) -> DatabaseLines:
    """Make `directory` a database TVM can load and append to; rewrite files only if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = read_database(directory)
    clean = all((directory / f).exists() for f in DATABASE_FILES) and lines.skipped == 0 and all(
        (directory / f).read_bytes().endswith(b"\n") or (directory / f).stat().st_size == 0 for f in DATABASE_FILES
    )
    if not clean:
        _write_lines(directory, lines)
    return lines


def open_database(directory: str | Path):
    """TVM's JSONDatabase on `directory` (repaired first), for tuning: new records are appended."""
    from nativeq.compile._tvm import meta_schedule as ms
    from nativeq.compile.schedules.intrinsics import register_intrinsics

    register_intrinsics()  # records that tensorize name nativeq's intrinsics
    repair_database(directory)
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=True, module_equality=MODULE_EQUALITY)


def workload_key(mod) -> str:
    """The database key of a kernel module (its `MODULE_EQUALITY` hash, as the files store it)."""
    from nativeq.compile._tvm import meta_schedule as ms

    return str(ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY).commit_workload(mod).as_json()[0])


def load_database(directory: str | Path, only: set[str] | None = None):
    """An in-memory TVM database with the valid records of `directory` (read-only use, e.g. compile).

    only: the workload keys (`workload_key`) worth decoding; None decodes all. Decoding a workload
    rebuilds its IRModule: for the shipped database, 4 s of every compile when done for all.
    """
    from nativeq.compile._tvm import meta_schedule as ms
    from nativeq.compile.schedules.intrinsics import register_intrinsics

    register_intrinsics()  # NOTE: a trace that tensorizes names nativeq's intrinsics; decoding it needs them
    directory = Path(directory)
    lines = read_database(directory)
    db = ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY)
    workloads = []
    for line_no, raw in enumerate(lines.workloads, start=1):
        obj = json.loads(raw)
        if only is not None and obj[0] not in only:
            workloads.append(None)
            continue
        try:
            workload = ms.database.Workload.from_json(obj)
        except Exception:  # noqa: BLE001  (TVM raises anything on a module it cannot decode)
            _warn(directory / WORKLOAD_FILE, line_no, "holds a module TVM cannot decode")
            workloads.append(None)
            continue
        workloads.append(db.commit_workload(workload.mod))
    for line_no, (index, raw) in enumerate(lines.records, start=1):
        if workloads[index] is None:
            continue
        try:
            record = ms.database.TuningRecord.from_json(json.loads(raw)[1], workloads[index])
        except Exception:  # noqa: BLE001
            _warn(directory / RECORD_FILE, line_no, "holds a record TVM cannot decode")
            continue
        db.commit_tuning_record(record)
    return db


def read_summary(directory: str | Path) -> dict:
    path = Path(directory) / SUMMARY_FILE
    if not path.exists():
        return {"models": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        warnings.warn(f"tuning summary {path} is not valid JSON; starting a new one", DatabaseLineWarning, stacklevel=2)
        return {"models": {}}
    return data if isinstance(data.get("models"), dict) else {"models": {}}


def write_summary(directory: str | Path, summary: dict) -> None:
    write_json_atomic(Path(directory) / SUMMARY_FILE, summary)
