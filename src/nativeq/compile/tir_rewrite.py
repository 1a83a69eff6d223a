"""Rewrite a TIR statement tree bottom-up, and walk an expression tree (TVM 0.27 has no Python statement mutator
and no TIR expression visitor).

`rewrite_stmt(stmt, fn)` rebuilds every statement that holds other statements (sequences, loops,
attributes, whiles, branches, s-TIR blocks and their realizes) around its rewritten children, then
returns `fn(rebuilt)`; `fn` returns the statement to use (the same one to keep it).
`expr_nodes(node)` yields every expression node under an expression or a buffer store; `LOAD` is the class
of its buffer loads, `loaded_buffer(load)` the buffer one reads.
"""

from __future__ import annotations

from typing import Callable

from nativeq.compile._tvm import s_tir, tirx, tvm


def rewrite_stmt(stmt, fn: Callable):
    """`stmt` with `fn` applied to every statement, children first."""

    def visit(node):
        return rewrite_stmt(node, fn)

    if isinstance(stmt, tirx.SeqStmt):
        stmt = tirx.SeqStmt([visit(s) for s in stmt.seq])
    elif isinstance(stmt, tirx.For):
        stmt = tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, visit(stmt.body),
                        stmt.thread_binding, stmt.annotations, stmt.step)
    elif isinstance(stmt, tirx.AttrStmt):
        stmt = tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, visit(stmt.body))
    elif isinstance(stmt, tirx.stmt.While):
        stmt = tirx.stmt.While(stmt.condition, visit(stmt.body))
    elif isinstance(stmt, tirx.IfThenElse):
        else_case = None if stmt.else_case is None else visit(stmt.else_case)
        stmt = tirx.IfThenElse(stmt.condition, visit(stmt.then_case), else_case)
    elif isinstance(stmt, s_tir.SBlockRealize):
        stmt = s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, visit(stmt.block))
    elif isinstance(stmt, s_tir.SBlock):
        stmt = s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, visit(stmt.body), stmt.init,
                            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return fn(stmt)


# NOTE: TVM 0.27's buffer load node is `tvm.ir.TensorLoad` (`.source` is the buffer); `tirx.BufferLoad` is
# now a constructor function, not a class
LOAD = getattr(tvm.ir, "TensorLoad", None) or tirx.BufferLoad


def loaded_buffer(load):
    """The buffer a load node (`LOAD`) reads."""
    return load.source if hasattr(load, "source") else load.buffer


# The fields of TIR expression nodes (and of a block's store) that hold sub-expressions.
_EXPR_FIELDS = ("a", "b", "args", "value", "condition", "true_value", "false_value", "indices", "body")


def expr_nodes(node):
    """Every expression node in `node` (an expression or a buffer store), parents before children."""
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, (list, tuple)) or type(current).__name__ == "Array":
            pending.extend(current)
            continue
        if not isinstance(current, (tvm.ir.expr.Expr, tirx.BufferStore)):
            continue
        if isinstance(current, tvm.ir.expr.Expr):
            yield current
        for name in _EXPR_FIELDS:
            child = getattr(current, name, None)
            if child is not None:
                pending.append(child)
