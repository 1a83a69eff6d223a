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


PRETRAINED_DIR = PACKAGE_DIR / "pretrained"


def shipped_onnx_models() -> dict[str, Path]:
    """The quantized ONNX models shipped with nativeq, by name: `pretrained/<name>/model.onnx`."""
    if not PRETRAINED_DIR.is_dir():
        return {}
    return {p.name: p / "model.onnx" for p in sorted(PRETRAINED_DIR.iterdir()) if (p / "model.onnx").is_file()}


def onnx_model_path(path_or_name: str | os.PathLike) -> Path:
    """`path_or_name` as a path, or the file of the shipped ONNX model of that name when no such path exists
    (`nativeq compile conformer-tiny-int8 --target rpi5 ...`). A path that exists always wins."""
    path = Path(path_or_name)
    if not path.exists():
        shipped = shipped_onnx_models().get(str(path_or_name))
        if shipped is not None:
            return shipped
    return path


def missing_model_message(path: Path) -> str:
    """The error for a model file that does not exist; a bare name also lists the shipped models."""
    message = f"model file {path} does not exist"
    if len(path.parts) == 1 and path.suffix != ".onnx":
        message += f" (nor is it a shipped model: {', '.join(shipped_onnx_models()) or 'none'})"
    return message
