"""`nativeq tune --status`: what is tuned for which target and model, from the databases on disk."""

from __future__ import annotations

from pathlib import Path

from nativeq._data import tuning_log_roots
from nativeq.tuning import database as dbfiles


def _database_dirs(root: Path) -> list[Path]:
    if all((root / f).exists() for f in dbfiles.DATABASE_FILES):
        return [root]
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / dbfiles.WORKLOAD_FILE).exists())


def _labelled_dirs(root: str | Path | None) -> list[tuple[Path, str]]:
    if root is not None:
        return [(d, "") for d in _database_dirs(Path(root))]
    out, seen = [], {}
    for base, label in tuning_log_roots():
        for d in _database_dirs(base):
            real = d.resolve()
            if real in seen:  # a source checkout: ./tuning_logs is the shipped database
                index = seen[real]
                out[index] = (out[index][0], f"{out[index][1]}, {label}")
                continue
            seen[real] = len(out)
            out.append((d, label))
    return out


def tuning_status(root: str | Path | None = None) -> str:
    """A table per database directory under `root` (or `root` itself if it is one).

    root None: the databases under `./tuning_logs/` (local) and those shipped with nativeq,
    each labelled with where it comes from.
    """
    dirs = _labelled_dirs(root)
    if not dirs:
        where = root if root is not None else " or ".join(str(base) for base, _ in tuning_log_roots())
        return f"no tuning database under {where} (run: nativeq tune MODEL.onnx --target TARGET)"
    out = []
    for d, label in dirs:
        lines = dbfiles.read_database(d)
        counts, best = lines.record_counts(), lines.best_seconds()
        tuned = sum(1 for n in counts.values() if n)
        origin = f" ({label})" if label else ""
        out.append(f"{d}{origin}: {len(counts)} workloads ({tuned} with records), {len(lines.records)} records")
        summary = dbfiles.read_summary(d)
        for model, entry in sorted(summary["models"].items()):
            tasks = entry.get("tasks", {})
            budget = entry.get("budget_per_task", 0)
            done = sum(1 for t in tasks.values() if counts.get(t.get("workload"), 0) >= t.get("budget", budget))
            threads = f", {entry['threads']} threads" if "threads" in entry else ""
            failed = entry.get("failed") or {}
            failed_text = f", {len(failed)} failed" if failed else ""
            out.append(f"  model {model} (target {entry.get('target', '?')}{threads}): {done}/{len(tasks)} tasks at their "
                       f"budget{failed_text} (up to {budget or '?'} trials; a tile space smaller than that is measured whole)")
            width = max([len(n) for n in tasks] + [4])
            for name, t in tasks.items():
                key = t.get("workload")
                secs = best.get(key)
                best_text = "-" if secs is None else f"{secs * 1e6:.1f} us"
                out.append(f"    {name.ljust(width)}  kernels {t.get('kernels', '?')}  trials {counts.get(key, 0)}  "
                           f"best {best_text}")
            for name, t in (entry.get("failed") or {}).items():
                out.append(f"    {name}  kernels {t.get('kernels', '?')}  FAILED: {t.get('reason', '?')}")
    return "\n".join(out)
