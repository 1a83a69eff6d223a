"""Shape conditions an artifact checks before it runs: the graph's needs that Relax does not check.

`nativeq compile` records in the manifest (`"shape_checks"`) every condition on the input sizes
that the graph needs and the compiled code does not verify, e.g. a Reshape whose target shape the
exporter traced at one length (`[T, B*4, 36] -> [50, B*4, 36]`): ONNX Runtime refuses other
lengths, while the compiled reshape would silently reinterpret the buffer. Each record is
`{"node", "op", "lhs", "rhs"}`, the two sides integer expressions over the inputs' symbolic dim
names in Python syntax (`+ - * // %`, `min`, `max`, integers), evaluated here with the sizes bound
by the call's inputs. Stdlib only: this runs on the device.
"""

from __future__ import annotations

import ast
import operator

from nativeq.errors import NativeqError

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CALLS = {"min": min, "max": max}
_LIMIT = 2**63  # sizes are int64 in the compiled code


def evaluate(text: str, dims: dict[str, int]) -> int:
    """The value of the size expression `text` with the symbolic sizes `dims`; ValueError if it is not one, or if
    a value in it (an intermediate one too) leaves int64."""
    return _evaluate(ast.parse(text, mode="eval").body, dims)


def _evaluate(node: ast.AST, dims: dict[str, int]) -> int:
    value = _value(node, dims)
    if abs(value) >= _LIMIT:
        raise ValueError(f"{ast.unparse(node)[:60]} is beyond int64")
    return value


def _value(node: ast.AST, dims: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in dims:
            raise ValueError(f"unknown size {node.id!r}")
        return dims[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, dims), _evaluate(node.right, dims)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, dims)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS
            and len(node.args) == 2 and not node.keywords):
        return _CALLS[node.func.id](*(_evaluate(a, dims) for a in node.args))
    raise ValueError(f"not a size expression: {ast.dump(node)}")


def check_shape_conditions(checks: list[dict], dims: dict[str, int]) -> None:
    """Raise a NativeqError naming the ONNX node if the input sizes `dims` break one of `checks`."""
    for check in checks:
        try:
            lhs, rhs = evaluate(check["lhs"], dims), evaluate(check["rhs"], dims)
        except (ValueError, SyntaxError, KeyError, TypeError, RecursionError, MemoryError) as e:
            # RecursionError, MemoryError: an expression nested too deep for Python's parser or for `_evaluate`
            shown = {k: (v[:60] + "...") if isinstance(v, str) and len(v) > 60 else v for k, v in check.items()}
            raise NativeqError(f"manifest field 'shape_checks' holds an invalid condition {shown!r}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if lhs == rhs:
            continue
        sizes = ", ".join(f"{name}={value}" for name, value in sorted(dims.items()))
        if check["op"] == "Reshape":
            what = f"it reshapes {check['lhs']} = {lhs} elements into {check['rhs']} = {rhs}"
        else:
            what = f"it needs {check['lhs']} = {lhs} to equal {check['rhs']} = {rhs}"
        raise NativeqError(
            f"input sizes {sizes} do not fit {check['op']} node {check['node']!r}: {what} "
            f"(the graph fixes a size, e.g. one traced at export; ONNX Runtime refuses these inputs too)"
        )
