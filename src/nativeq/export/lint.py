"""QDQ lint: every MatMul/Gemm/Conv operand must come from a DequantizeLinear, and ONNX
Runtime loads the file at every graph optimization level.

Where it sits: run on the file `export` writes (and usable on any QDQ ONNX model) before
`nativeq compile`; the compiler lowers a product to int8 only when both operands are
dequantized integers, so a product fed by a float tensor would silently stay float.
Checked operands: MatMul A and B, Gemm A and B, Conv X and W (bias is float by design).
`export` refuses a file ONNX Runtime cannot load (`check_ort_loads`).
"""

from __future__ import annotations

import onnx

from nativeq._text import first_line
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


def _raise_first(problems: list[str], source: str, more: str) -> None:
    """A one-line NativeqError of the first problem, counting the others (`more` formats their count)."""
    if problems:
        rest = f" ({more.format(len(problems) - 1)})" if len(problems) > 1 else ""
        raise NativeqError(f"{source}: {problems[0]}{rest}")


def check_qdq(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise a one-line NativeqError naming the first non-quantized product operand."""
    _raise_first(lint_qdq(model), source, "and {} more")


ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def _ort_reason(e: Exception) -> str:
    text = first_line(e)
    return text.split(" : ", 3)[-1] if text.startswith("[ONNXRuntimeError]") else text


def ort_load_problems(model: onnx.ModelProto, levels: tuple[str, ...] = ORT_LEVELS) -> list[str]:
    """One line per ONNX Runtime graph optimization level at which `model` fails to load (empty = loads at all).

    ORT's optimizer rewrites QDQ graphs (propagation, S8->U8, fusions) only at BASIC and above,
    so a file that loads with optimizations off can still fail in a default session (ALL).
    """
    import onnxruntime as ort

    data = model.SerializeToString()
    problems = []
    for level in levels:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (ORT raises its own exception types)
            problems.append(f"ONNX Runtime {ort.__version__} cannot load it at {level}: {_ort_reason(e)}")
    return problems


def check_ort_loads(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise a one-line NativeqError if ONNX Runtime fails to load `model` at any optimization level."""
    _raise_first(ort_load_problems(model), source, "and at {} more level(s)")
