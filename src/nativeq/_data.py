"""Where nativeq's package data lives, and the per-user places for what it fetches or builds.

The shipped tuning databases are package data under `nativeq/tuning_logs/<target>/`; in a
source checkout `src/nativeq/tuning_logs` is a link to the repository's `tuning_logs/`, so an
editable install reads the repository's files and a wheel carries copies of them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
LOCAL_TUNING_LOGS = Path("tuning_logs")  # relative: the user's own tuning, in the current directory


def shipped_tuning_logs() -> Path:
    """The directory of the tuning databases shipped with nativeq (one subdirectory per target)."""
    return PACKAGE_DIR / "tuning_logs"


def tuning_log_roots() -> list[tuple[Path, str]]:
    """The tuning database roots `compile` searches, in order, each with a label: local, then shipped."""
    return [(LOCAL_TUNING_LOGS, "local"), (shipped_tuning_logs(), "shipped with nativeq")]


def user_cache_dir() -> Path:
    """nativeq's per-user cache: `$XDG_CACHE_HOME/nativeq`, else `~/.cache/nativeq`."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "nativeq"


def in_writable_venv() -> bool:
    """Whether this Python runs in a virtual environment it may write to."""
    return sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK)
