"""The aarch64 disassembly of a compiled artifact's library, for tests that check which instructions a kernel got."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def aarch64_disassembly(artifact, *, raw_bytes: bool = True) -> str:
    """`objdump -d` of `artifact`/model.so (Debian's cross binutils); `raw_bytes=False`: lines `address:\\tmnemonic\\targs`."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "aarch64-linux-gnu-objdump missing: apt-get install binutils-aarch64-linux-gnu"
    args = [objdump, "-d", *([] if raw_bytes else ["--no-show-raw-insn"]), str(Path(artifact) / "model.so")]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout
