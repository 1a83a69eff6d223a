"""The text table `nativeq targets` prints: one line per target, TVM target dict last, then descriptions."""

from __future__ import annotations

import json

from nativeq._text import aligned_table


def targets_table(targets) -> str:
    header = ("name", "arch", "int8", "cores", "cross compiler", "needs CPU features", "TVM target")
    rows = [
        (
            t.name,
            t.arch,
            t.int8,
            str(t.cores),
            t.cross_compiler or "-",
            ",".join(t.cpu_features) or "-",
            json.dumps(t.tvm_dict(), separators=(",", ":")),
        )
        for t in targets
    ]
    lines = [aligned_table(header, rows), ""]
    for t in targets:
        source = "" if t.source == "builtin" or t.source.startswith("detected") else f" (from {t.source})"
        lines.append(f"{t.name}: {t.description}{source}")
    return "\n".join(lines)
