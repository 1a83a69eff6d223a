"""QDQ lint: every MatMul/Gemm/Conv operand must come from a DequantizeLinear.

Where it sits: run on the file `export` writes (and usable on any QDQ ONNX model) before
`nativeq compile`; the compiler lowers a product to int8 only when both operands are
dequantized integers, so a product fed by a float tensor would silently stay float.
Checked operands: MatMul A and B, Gemm A and B, Conv X and W (bias is float by design).
"""

from __future__ import annotations

import onnx

from nativeq.errors import NativeqError

PRODUCTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1), "ConvTranspose": (0, 1)}


def lint_qdq(model: onnx.ModelProto) -> list[str]:
    """One line per product operand that is not produced by a DequantizeLinear (empty = clean)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    problems = []
    for node in model.graph.node:
        for i in PRODUCTS.get(node.op_type, ()):
            if i >= len(node.input):
                continue
            src = producer.get(node.input[i])
            if src is None or src.op_type != "DequantizeLinear":
                what = "a graph input/initializer" if src is None else f"{src.op_type} node {src.name!r}"
                problems.append(f"{node.op_type} node {node.name!r} input {i} ({node.input[i]!r}) comes from {what}, not DequantizeLinear")
    return problems


def check_qdq(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise a one-line NativeqError naming the first non-quantized product operand."""
    problems = lint_qdq(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise NativeqError(f"{source}: {problems[0]}{more}")
