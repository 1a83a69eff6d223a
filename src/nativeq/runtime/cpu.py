"""What this CPU can execute: feature names as Linux spells them in /proc/cpuinfo.

x86-64 reads the `flags` line of /proc/cpuinfo. aarch64 asks the kernel directly with
`getauxval(AT_HWCAP)` / `getauxval(AT_HWCAP2)`: under qemu-user /proc/cpuinfo is the
*host's* file, while the auxiliary vector is what the emulated CPU model provides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import lru_cache
from pathlib import Path

_AT_HWCAP = 16
_AT_HWCAP2 = 26

# Bit positions from linux/arch/arm64/include/uapi/asm/hwcap.h.
_ARM64_HWCAP = {
    "fp": 0, "asimd": 1, "evtstrm": 2, "aes": 3, "pmull": 4, "sha1": 5, "sha2": 6, "crc32": 7,
    "atomics": 8, "fphp": 9, "asimdhp": 10, "cpuid": 11, "asimdrdm": 12, "jscvt": 13, "fcma": 14,
    "lrcpc": 15, "dcpop": 16, "sha3": 17, "sm3": 18, "sm4": 19, "asimddp": 20, "sha512": 21,
    "sve": 22, "asimdfhm": 23, "dit": 24, "uscat": 25, "ilrcpc": 26, "flagm": 27, "ssbs": 28,
    "sb": 29, "paca": 30, "pacg": 31,
}
_ARM64_HWCAP2 = {
    "dcpodp": 0, "sve2": 1, "sveaes": 2, "svepmull": 3, "svebitperm": 4, "svesha3": 5, "svesm4": 6,
    "flagm2": 7, "frint": 8, "svei8mm": 9, "svef32mm": 10, "svef64mm": 11, "svebf16": 12,
    "i8mm": 13, "bf16": 14, "dgh": 15, "rng": 16, "bti": 17,
}

# What users know the features as, for error messages.
_FRIENDLY = {
    "asimd": "NEON (asimd)",
    "asimddp": "dotprod (asimddp)",
    "i8mm": "int8 matrix multiply (i8mm)",
    "avx512_vnni": "avx512_vnni",
    "avx2": "avx2",
}


def machine_arch() -> str:
    """`x86_64` or `aarch64` (normalized `platform.machine()`)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _getauxval(kind: int) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return int(libc.getauxval(kind))


def _decode_hwcaps(hwcap: int, hwcap2: int) -> frozenset[str]:
    names = {name for name, bit in _ARM64_HWCAP.items() if hwcap >> bit & 1}
    names |= {name for name, bit in _ARM64_HWCAP2.items() if hwcap2 >> bit & 1}
    return frozenset(names)


def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU features of the machine (or emulated CPU) this process runs on."""
    if machine_arch() == "aarch64":
        try:
            return _decode_hwcaps(_getauxval(_AT_HWCAP), _getauxval(_AT_HWCAP2))
        except (OSError, AttributeError):
            pass
    return _cpuinfo_flags()


def missing_cpu_features(required) -> list[str]:
    """The features of `required` this CPU lacks, in the order given."""
    have = cpu_features()
    return [f for f in required if f not in have]


def describe_features(names) -> str:
    """`dotprod (asimddp)`, `avx512_vnni`: how a user recognizes each feature."""
    return ", ".join(_FRIENDLY.get(n, n) for n in names)
