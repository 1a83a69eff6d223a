"""Bounded memory per call: an artifact's memory formula, the limit, and the check before a run.

`nativeq compile` records in the manifest an upper bound of the memory one call allocates, as a
polynomial in the model's symbolic sizes (`compile/memory_bound.py`)::

    "memory": {"method": "sum of intermediate tensors",
               "bytes": [{"coef": 1024.0, "dims": {"T": 1}}, {"coef": 16.0, "dims": {"T": 2}}, ...]}

The bound is the sum of the sizes of every tensor the imported Relax graph computes (each op's
output, as if none were freed): the Relax VM's memory plan is not exposed, and it never keeps more
alive than that. Against the peak RSS growth of one call (threads=1) it is 4.3-6.1x for the
ORT-quantized transformer encoder of the tests (T = 1000, 4000, 16000; tests/test_memory.py) and
3.9-6.8x for the shipped conformer-tiny (T = 1000, 6000, 24000).

`CompiledModel.run` refuses a call whose bound, plus the copies it makes of strided, misaligned or
read-only inputs, exceeds the limit before running it (and before reading any input element). The limit is
`nativeq.load(path, max_memory=...)`: bytes, or a string "512MB", "4GB" (powers of 1000), "4GiB" /
"4G" (powers of 1024); by default `NATIVEQ_MAX_MEMORY` (same forms) if set, else the memory
available when the model was loaded (`MemAvailable` of /proc/meminfo, else sysconf) minus
`MARGIN`. Stdlib only.
"""

from __future__ import annotations

import math
import os
import re

from nativeq.errors import NativeqError

MARGIN_FRACTION = 0.10  # of the available memory, kept for the caller (at least MARGIN_MIN)
MARGIN_MIN = 256 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNBOUNDED = 2**63  # bytes: what `MemoryFormula.bytes` gives when the bound overflows a float
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*")


def parse_memory(value) -> int:
    """Bytes of `value`: an int, or a string like "4GB" (10^9), "4GiB" or "4G" (2^30), "512MB", "1000000"."""
    if isinstance(value, bool):
        raise NativeqError(f"max_memory must be bytes (an int) or a size like '4GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise NativeqError(f"max_memory must be positive, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.lower())
        if match and match.group(2) in _UNITS:
            size = math.floor(float(match.group(1)) * _UNITS[match.group(2)])
            if size > 0:
                return size
    raise NativeqError(f"max_memory must be bytes (an int) or a size like '4GB', '512MiB', got {value!r}")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations: /proc/meminfo MemAvailable, else sysconf; None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_limit() -> int | None:
    """`NATIVEQ_MAX_MEMORY` if set, else the available memory minus the margin; None if unknown."""
    env = os.environ.get("NATIVEQ_MAX_MEMORY")
    if env:
        return parse_memory(env)
    available = available_memory()
    if available is None:
        return None
    return max(available - max(MARGIN_MIN, int(available * MARGIN_FRACTION)), 0)


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


class MemoryFormula:
    """Bytes one call allocates at most, a polynomial in the symbolic sizes (the manifest's `memory.bytes`)."""

    def __init__(self, terms: list[dict]):
        self.terms = [(float(t["coef"]), tuple(sorted(t.get("dims", {}).items()))) for t in terms]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "MemoryFormula | None":
        memory = manifest.get("memory")
        return None if memory is None else cls(memory["bytes"])

    def bytes(self, sizes: dict[str, int]) -> int:
        """The bound for these sizes (a dim the formula names but `sizes` lacks counts as 1).

        A bound beyond float range (a huge coefficient or power) is `UNBOUNDED`, more than any machine has."""
        total = 0.0
        for coef, dims in self.terms:
            if coef == 0:
                continue
            term = coef
            for name, power in dims:
                try:
                    term *= float(sizes.get(name, 1)) ** power
                except OverflowError:
                    return UNBOUNDED
            total += term
        return math.ceil(total) if total < UNBOUNDED else UNBOUNDED


def check_memory(formula: MemoryFormula | None, sizes: dict[str, int], limit: int | None, where: str,
                 copies: int = 0) -> None:
    """Refuse (one-line NativeqError) a call whose bound (plus `copies` bytes of input copies the runtime makes)
    exceeds `limit`; nothing when the limit is unknown, or when there is neither a formula nor a copy."""
    if (formula is None and not copies) or limit is None:
        return
    need = (0 if formula is None else formula.bytes(sizes)) + copies
    if need > limit:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items())) or "static shapes"
        if copies:
            shown += f", {format_bytes(copies)} of input copies"
        raise NativeqError(f"{where}: a call with {shown} needs up to {format_bytes(need)} ({need} bytes, estimated) "
                           f"and the limit is {format_bytes(limit)} ({limit} bytes): use smaller inputs or raise "
                           f"max_memory (NATIVEQ_MAX_MEMORY)")
