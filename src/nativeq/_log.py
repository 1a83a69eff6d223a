"""How much nativeq says on stderr: the verbosity the command line sets (`nativeq -q` / `-v`), the
progress display of long commands, and the filter for what TVM's C++ code prints straight to fd 2.

QUIET: errors and the command's result only. NORMAL: also warnings and progress (on a terminal).
VERBOSE: also nativeq's debug logging and TVM's C++ log lines.
Library code asks `progress_enabled(flag)`; it never reads the command line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time

QUIET, NORMAL, VERBOSE = 0, 1, 2

_verbosity = NORMAL

# What TVM's C++ logging (LOG(INFO/WARNING), DLOG) prints: `[18:07:05] /path/file.cc:65: Warning: ...`.
# LOG(FATAL) raises a TVMError instead, so an error never takes this form.
TVM_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (?!Error)")


def set_verbosity(level: int) -> None:
    """Set the verbosity for this process: `logging` of the `nativeq` logger and Python warnings follow it."""
    global _verbosity
    _verbosity = level
    logger = logging.getLogger("nativeq")
    logger.setLevel({QUIET: logging.ERROR, NORMAL: logging.WARNING}.get(level, logging.DEBUG))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if level <= QUIET:
        import warnings

        warnings.simplefilter("ignore")


def verbosity() -> int:
    return _verbosity


def progress_enabled(flag: bool = True) -> bool:
    """Show a progress display: the caller wants one, stderr is a terminal and the command is not `-q`."""
    return bool(flag) and _verbosity > QUIET and sys.stderr.isatty()


def rich_progress(*columns):
    """A rich Progress on stderr with a description, a bar, done/total, elapsed time and `columns`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    *columns, console=Console(stderr=True), transient=False)


class Bar:
    """A progress bar over `iterable` (or updated by hand); nothing at all when disabled.

    `set_postfix(key=value, ...)` shows values after the bar (as tqdm does)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", enabled: bool = True):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self._progress = None
        if progress_enabled(enabled):
            from rich.progress import TextColumn

            self._progress = rich_progress(TextColumn("{task.fields[post]}"))
            self._progress.start()
            self._task = self._progress.add_task(desc, total=self.total, post="")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set_postfix(self, **values) -> None:
        if self._progress is not None:
            self._progress.update(self._task, post=" ".join(f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class Stages:
    """Named stages of one long call on stderr (`compile: import ... 1.2 s`), when progress is enabled."""

    def __init__(self, name: str, enabled: bool = True):
        self.name = name
        self.enabled = progress_enabled(enabled)

    @contextlib.contextmanager
    def stage(self, text: str):
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        print(f"{self.name}: {text} ...", file=sys.stderr, flush=True)
        yield
        print(f"{self.name}: {text} done ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


class HeldOutput:
    """What `held_native_output` holds; set `failed = True` inside the region to drop it."""

    failed = False


def _show_stderr_line(line: str) -> bool:
    return _verbosity >= VERBOSE or not TVM_LOG_LINE.match(line)


@contextlib.contextmanager
def held_native_output():
    """Run a noisy TVM call with its output held.

    Python's stdout is held and printed after the region unless it failed (TVM's importer prints
    the failing operator there; the caller's one-line error says what failed). File descriptor 2
    goes to a pipe that a thread passes on line by line as it comes, so a crash message still
    reaches the terminal: TVM's C++ log lines are dropped unless verbose, every other line (Python
    warnings, a crash) is always shown.
    """
    held = HeldOutput()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    pending: list[str] = []

    def forward() -> None:
        buffer = b""
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                _emit(raw.decode(errors="replace"))
        if buffer:
            _emit(buffer.decode(errors="replace"))

    def _emit(line: str) -> None:
        if TVM_LOG_LINE.match(line):
            pending.append(line)  # shown after the region when verbose and it did not fail
        else:
            os.write(saved, (line + "\n").encode())

    thread = threading.Thread(target=forward, daemon=True, name="nativeq-stderr")
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # closes the last write end: the thread reads to the end and stops
            thread.join(timeout=10)  # a child process that inherited fd 2 may hold the pipe open
            if not thread.is_alive():
                os.close(read_end)
            os.close(saved)
    if not held.failed:
        sys.stdout.write(printed.getvalue())
    if _verbosity >= VERBOSE:
        for line in pending:
            print(line, file=sys.stderr)
        sys.stderr.flush()
