"""Plain-text helpers for what nativeq prints: aligned tables and one-line error causes."""

from __future__ import annotations


def aligned_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def first_line(error: BaseException) -> str:
    """The first informative line of an exception message (TVM's carry tracebacks and frames)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith(("Traceback", "File ", "File:", "[bt]")) and not ln[:1].isdigit():
            return ln
    return lines[0] if lines else type(error).__name__


def nodes_text(names, width: int = 40) -> str:
    """A kernel's ONNX nodes in one table cell: the first (cut in the middle to `width`) and how many more."""
    if not names:
        return "-"
    first = names[0]
    if len(first) > width:
        first = first[:width // 2 - 2] + "..." + first[-(width - width // 2 - 1):]
    return first + (f" +{len(names) - 1}" if len(names) > 1 else "")
