"""CanonicalShapeFunc: the host shape function's stores in one fixed order, so a model compiles to the same bytes.

Where it sits: right after TVM's `VMShapeLower` (compile/pipeline.py), which writes every symbolic size the
VM needs into a shape heap with one store per slot:

    H[14] = 4 * ((H[0] - 1) // 2 + 1) * 32
    H[3]  = (H[0] - 1) // 2 + 1
    ...

It emits those stores in the order of a hash map keyed by expression pointers, so two compiles of one
model ordered them differently and `model.so` (and the hash its manifest records) differed between
builds of the same model with the same nativeq; every other function was byte-identical.

Here each run of consecutive stores into one buffer at constant indices is reordered by slot, every store
kept after the stores of the slots it reads (the lowest ready slot first: a stable topological order).
"""

from __future__ import annotations

from nativeq.compile._tvm import tirx, tvm
from nativeq.compile.tir_rewrite import LOAD, expr_nodes, loaded_buffer, rewrite_stmt


def _slot(store) -> int | None:
    """The constant index of a store into a 1-D buffer, else None."""
    if not isinstance(store, tirx.BufferStore) or len(store.indices) != 1:
        return None
    index = store.indices[0]
    return int(index) if isinstance(index, tirx.IntImm) else None


def _loaded_slots(store) -> set:
    """The (buffer, slot) pairs the stored value loads (slot None: an index not known at compile time)."""
    slots = set()
    for node in expr_nodes(store.value):
        if isinstance(node, LOAD):
            index = node.indices[0] if len(node.indices) == 1 else None
            slots.add((loaded_buffer(node).name, int(index) if isinstance(index, tirx.IntImm) else None))
    return slots


def _ordered(stores: list) -> list:
    """`stores` (into one buffer, at distinct constant slots) by slot, each after the stores it reads."""
    name = stores[0].buffer.name
    writer = {_slot(s): i for i, s in enumerate(stores)}
    reads = [_loaded_slots(s) for s in stores]
    if any(b == name and slot is None for r in reads for b, slot in r):
        return stores  # a load of a computed index: any store could be its source
    needs = [{writer[slot] for b, slot in r if b == name and slot in writer and writer[slot] != i}
             for i, r in enumerate(reads)]
    # a store reading a slot written after it reads the value from before the run: keep such runs as they are
    if any(j > i for i, n in enumerate(needs) for j in n):
        return stores
    done, order = set(), []
    while len(order) < len(stores):
        ready = [i for i in range(len(stores)) if i not in done and needs[i] <= done]
        i = min(ready, key=lambda k: _slot(stores[k]))
        done.add(i)
        order.append(stores[i])
    return order


def _canonical_seq(stmt):
    if not isinstance(stmt, tirx.SeqStmt):
        return stmt
    out, run = [], []

    def flush():  # a run holds stores into one buffer (the loop below starts a new run at another buffer)
        slots = [_slot(s) for s in run]
        if len(run) > 1 and len(set(slots)) == len(slots):
            out.extend(_ordered(run))
        else:
            out.extend(run)
        run.clear()

    for s in stmt.seq:
        if _slot(s) is not None and (not run or s.buffer.name == run[0].buffer.name):
            run.append(s)
            continue
        flush()
        if _slot(s) is not None:
            run.append(s)
        else:
            out.append(s)
    flush()
    return tirx.SeqStmt(out)


def _is_host_func(func) -> bool:
    return func.attrs is not None and "tirx.is_host_func" in func.attrs and int(func.attrs["tirx.is_host_func"]) == 1


@tvm.transform.module_pass(opt_level=0, name="nativeq.CanonicalShapeFunc")
class CanonicalShapeFunc:
    """Reorder the stores of host shape functions (`VMShapeLower`'s) by slot (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        host_funcs = [(gvar, func) for gvar, func in mod.functions_items()
                      if isinstance(func, tirx.PrimFunc) and _is_host_func(func)]
        for gvar, func in host_funcs:
            mod[gvar] = func.with_body(rewrite_stmt(func.body, _canonical_seq))
        return mod
