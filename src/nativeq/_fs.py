"""Atomic writes: every file nativeq writes goes to a temporary path first, then is renamed.

An interrupted run therefore never leaves a half-written file or directory behind, and an
existing output is replaced only by a complete new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from nativeq.errors import NativeqError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, then rename.

    The file gets the usual mode for new files (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an impossible pid): never take it for dead
    return True


def _flock(fd: int, blocking: bool) -> bool | None:
    """Lock `fd` exclusively: True if locked, False if another process holds it, None if the fs cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK, EOPNOTSUPP on some network filesystems
        return None
    return True


def _remove_stale(out: Path) -> None:
    """Remove `.OUT.<pid>.<random>.partial` and `.OUT.old.<pid>.<random>` beside `out` left by dead processes.

    NOTE: a partial directory is removed only if its owner pid is not running *and* the flock its writer
    holds on it is free; either alone keeps it (pid reuse, another pid namespace, a filesystem without locks).
    """
    partial = re.compile(re.escape(f".{out.name}.") + r"(\d+)\.[A-Za-z0-9_]+\.partial")
    old = re.compile(re.escape(f".{out.name}.old.") + r"(\d+)\.[0-9a-f]+")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        path = out.parent / name
        if match := old.fullmatch(name):  # a replaced output whose removal was cut short: nobody writes it
            if not _pid_alive(int(match[1])):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            continue
        match = partial.fullmatch(name)
        if match is None or int(match[1]) == os.getpid() or _pid_alive(int(match[1])):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone already, or not a directory: not ours to remove
            continue
        try:
            if _flock(fd, blocking=False):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


# The partial directories this process holds (real paths): private to it, so a nested atomic_directory
# committing into one needs no parent lock (and must not take one: flock would wait for our own lock).
_HELD: set[str] = set()


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """An exclusive flock on the directory `parent`, held only around the renames into it."""
    if os.path.realpath(parent) in _HELD:
        yield
        return
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it is renamed to `out`.

    An existing `out` is refused unless `force`; with `force` it is replaced only after the
    new directory is complete. On any error the temporary directory is removed.

    The temporary directory is `.OUT.<pid>.<random>.partial`, flock'd by this process while it
    writes; entering removes such directories (and `.OUT.old.<pid>.<random>`) left by processes
    that died. Without `force`, if another process created `out` while this one was writing,
    this one fails and leaves `out` as the other wrote it: of two concurrent writers one wins.
    """
    out = Path(out)
    if out.exists() and not force:
        raise NativeqError(f"output {out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    held = os.path.realpath(tmp)
    try:
        _flock(lock, blocking=False)
        _HELD.add(held)
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        with _parent_lock(out.parent):
            # NOTE: every atomic_directory commits under the parent's lock, so this check and the renames
            # below are one step for any other nativeq writer of `out`.
            if os.path.lexists(out):
                if not force:
                    raise NativeqError(
                        f"output {out} was created by another process while this one was writing; "
                        f"use --force to replace it"
                    )
                old = out.with_name(f".{out.name}.old.{os.getpid()}.{secrets.token_hex(4)}")
                os.replace(out, old)
            os.replace(tmp, out)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _HELD.discard(held)
        os.close(lock)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
