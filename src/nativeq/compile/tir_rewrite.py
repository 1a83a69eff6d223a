"""Rewrite a TIR statement tree bottom-up (TVM 0.27 has no Python statement mutator).

`rewrite_stmt(stmt, fn)` rebuilds every statement that holds other statements (sequences, loops,
attributes, whiles, branches, s-TIR blocks and their realizes) around its rewritten children, then
returns `fn(rebuilt)`; `fn` returns the statement to use (the same one to keep it).
"""

from __future__ import annotations

from typing import Callable

from nativeq.compile._tvm import s_tir, tirx


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
