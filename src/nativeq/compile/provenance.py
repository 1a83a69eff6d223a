"""Which ONNX nodes each kernel computes: provenance from the import to the built kernels.

The ONNX import gives every Relax call it emits a span naming the ONNX node it converts
(`onnx_import`, through `node_span`; a node the legalization rewrote is named as the user's
node). `NodeProvenance`, a pass instrument, follows those nodes through every Relax pass of the
compile up to the kernel schedules, binding by binding, in each Relax function (not the fused
ones), without touching the IR:

| after a pass, a binding of variable v ...                  | computes the nodes of                      |
|------------------------------------------------------------|--------------------------------------------|
| kept v (the same variable)                                 | v before the pass                          |
| recomputes a binding b of before: same op, its operands    | b (passes that rebuild every binding       |
|   recomputing b's (`_Matcher`), else b's place among the   |   rename them: `lv4` comes back as `lv42`) |
|   rebuilt bindings in op order (`_aligned_in_order`)       |                                            |
| calls a group FuseOps made, whose bindings recompute some  | those bindings (call site by call site:    |
|   bindings of before                                       |   FuseOps shares one function among equal  |
|                                                            |   groups)                                  |
| has a call with a node's span                              | that node too                              |
| is new and stands where a binding nothing recomputes      | that binding too                           |
|   stood (between the bindings recomputing its neighbours:  |                                            |
|   an int8 matmul where a dequantize and a float matmul     |                                            |
|   were)                                                    |                                            |
| is the first recomputed user of such a binding, when no    | that binding too                           |
|   new binding stands where it stood                        |                                            |
| is new and stands right before a kept v bound to another   | v before the pass too                      |
|   op (the float conv's variable now holds the requantize   |                                            |
|   of the int8 conv before it)                              |                                            |
| is none of these (a rewrite's new intermediate)            | its users' nodes (what it is computed for) |

After FuseTIR each binding is a `call_tir` of one kernel: `kernel_nodes` gives, per kernel, the
nodes of all its call sites in graph order (a kernel FuseTIR shared between layers lists each
layer's nodes). `compile_model` writes them into the manifest's kernel table (`onnx_nodes`),
where `compile --explain` and `nativeq profile` read them.
"""

from __future__ import annotations

import bisect
import difflib

from nativeq.compile._tvm import relax, tvm, with_type_of
from nativeq.compile.kernels import called_kernel
from nativeq.runtime.manifest import QDQ_OPS

_SPAN_PREFIX = "onnx:"  # spans nativeq sets (TVMScript-parsed functions carry spans of their own)
_ANY = object()  # an operand any operand matches (`_Matcher.find`)


def node_span(node: tuple[str, str]):
    """The span naming ONNX node `node` = (op type, node name)."""
    op, name = node
    return tvm.ir.Span(tvm.ir.SourceName(f"{_SPAN_PREFIX}{op}:{name}"), 0, 0, 0, 0)


def with_span(call, span):
    """`call` carrying `span` (a rewrite's call computing the node a replaced call's span names; None: as it is)."""
    return call if span is None else relax.Call(call.op, call.args, call.attrs, call.ty_args, span=span)


def span_node(span) -> tuple[str, str] | None:
    """The ONNX node (op type, node name) a span names, or None (no span, or not one of `node_span`'s)."""
    if span is None:
        return None
    text = str(span.source_name.name)
    if not text.startswith(_SPAN_PREFIX):
        return None
    op, _, name = text[len(_SPAN_PREFIX):].partition(":")
    return op, name


def with_node_spans(func, node_of: dict):
    """`func` with each top-level call that has no node span given one: the node `node_of` names for its variable,
    else the node of the next binding that has one (the importer binds a node's size computations, which its
    result reads through a symbolic size rather than a variable, before the node's own calls)."""
    node_of, following = dict(node_of), None
    for var, value in reversed(_bindings(func)):
        node = node_of.get(var) or span_node(getattr(value, "span", None))
        if node is None:
            node_of[var] = following
        following = node or following
    blocks, changed = [], False
    for block in func.body.blocks:
        bindings = []
        for binding in block.bindings:
            value, node = binding.value, node_of.get(binding.var)
            if node is not None and isinstance(value, relax.Call) and span_node(value.span) is None:
                spanned = with_type_of(relax.Call(value.op, value.args, value.attrs, value.ty_args, span=node_span(node)),
                                       value)
                binding = relax.MatchCast(binding.var, spanned, binding.ty) if isinstance(binding, relax.MatchCast) \
                    else relax.VarBinding(binding.var, spanned)
                changed = True
            bindings.append(binding)
        blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(bindings))
    if not changed:
        return func
    return relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs)


def _bindings(func) -> list:
    return [(b.var, b.value) for block in func.body.blocks for b in block.bindings]


def used_vars(value) -> list:
    """The variables an expression reads (with repeats)."""
    found = []
    relax.analysis.post_order_visit(value, lambda e: found.append(e) if isinstance(e, relax.Var) else None)
    return found


def _users(bindings, params=()) -> dict:
    """variable (bound, or a parameter) -> the variables of the bindings that read it (bindings in order)."""
    users = {var: [] for var in [*params, *(var for var, _ in bindings)]}
    for var, value in bindings:
        for used in used_vars(value):
            if used in users and used is not var:
                users[used].append(var)
    return users


def _is_tracked(func) -> bool:
    """A Relax function the compile keeps calling (FuseOps' groups are followed through their call sites)."""
    return isinstance(func, relax.Function) and not (func.attrs is not None and "Primitive" in func.attrs)


def initial_nodes(func) -> dict:
    """variable -> frozenset of ONNX nodes, from the node spans of `func`'s calls (as imported)."""
    return {var: frozenset([n]) if (n := span_node(getattr(value, "span", None))) else frozenset()
            for var, value in _bindings(func)}


def _op_key(value) -> str | None:
    """What a binding computes, short of its operands: the op or callee (for call_tir, the kernel)."""
    if not isinstance(value, relax.Call):
        return type(value).__name__ if isinstance(value, (relax.TupleGetItem, relax.Tuple)) else None
    op = value.op
    name = str(getattr(op, "name", None) or getattr(op, "name_hint", "?"))
    kernel = called_kernel(value)
    return name if kernel is None else f"{name}:{kernel}"


def _operands(value) -> list:
    """The operands of a binding's value, tuples flattened (call_tir's argument tuple)."""
    if isinstance(value, relax.TupleGetItem):
        return [value.tuple_value, value.index]
    items = list(value.args) if isinstance(value, relax.Call) else list(value.fields) if isinstance(value, relax.Tuple) else []
    flat = []
    for item in items:
        flat.extend(item.fields if isinstance(item, relax.Tuple) else [item])
    return flat


class _Matcher:
    """Finds the binding of `before` each binding of `after` recomputes (same op, operands recomputed alike)."""

    def __init__(self, before, kept: set):
        self.old = dict(_bindings(before))
        self.users = _users(_bindings(before), before.params)
        self.kept = kept
        self.taken: set = set()
        self._by_key: dict[str, list] = {}  # op key -> bindings without variable operands, in order
        for var, value in self.old.items():
            if var not in kept and not any(isinstance(o, relax.Var) for o in _operands(value)):
                self._by_key.setdefault(_op_key(value), []).append(var)

    def find(self, value, old_of: dict, bound: set):
        """The unmatched binding of `before` computing `value`, or None. Operands are read through `old_of`;
        one that is not a variable of `bound` (a parameter, a shape variable) or maps to `_ANY` (a fused group's
        parameter bound to a constant) matches any operand."""
        key, operands = _op_key(value), _operands(value)
        if key is None:
            return None
        mapped = [old_of.get(o) if isinstance(o, relax.Var) and (o in old_of or o in bound) else _ANY for o in operands]
        if any(m is None for m in mapped):
            return None
        anchors = [m for m in mapped if m is not _ANY]
        for candidate in self.users.get(anchors[0], ()) if anchors else self._by_key.get(key, ()):
            if candidate in self.kept or candidate in self.taken:
                continue
            theirs = _operands(self.old[candidate])
            if _op_key(self.old[candidate]) != key or len(theirs) != len(operands):
                continue
            if all(m is _ANY or (isinstance(t, relax.Var) and t.same_as(m)) for m, t in zip(mapped, theirs)):
                self.taken.add(candidate)
                return candidate
        return None

    def group(self, func, args: list, old_of: dict) -> tuple[list, object]:
        """The bindings of `before` a new function `func` (a fused group) recomputes when called on `args`,
        and the one its result recomputes."""
        inner = {param: old_of.get(arg) if isinstance(arg, relax.Var) else _ANY for param, arg in zip(func.params, args)}
        found, bindings = [], _bindings(func)
        bound = {var for var, _ in bindings}
        for var, value in bindings:
            match = self.find(value, inner, bound)
            if match is not None:
                inner[var] = match
                found.append(match)
        result = func.body.body
        return found, inner.get(result) if isinstance(result, relax.Var) else None


def _aligned_in_order(old: list, new: list) -> dict:
    """new variable -> old variable, where the two binding sequences agree in op (a pass that rebuilds every
    binding keeps their order; their names it does not keep: `lv4` comes back as `lv42`)."""
    old_keys = [_op_key(value) for _, value in old]
    new_keys = [_op_key(value) for _, value in new]
    aligned = {}
    for block in difflib.SequenceMatcher(None, old_keys, new_keys, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            aligned[new[block.b + k][0]] = old[block.a + k][0]
    return aligned


def carry_nodes(before, nodes: dict, after, functions: dict | None = None) -> dict:
    """The nodes of each binding of `after`, given `nodes` of `before` (the table in the module docstring).

    functions: name -> function of the module `after` is in (to look into the groups FuseOps made).
    """
    old, new = _bindings(before), _bindings(after)
    kept = {var for var, _ in new} & set(nodes)
    matcher = _Matcher(before, kept)
    old_of, result, bound = {}, {}, {var for var, _ in new}
    old_of.update((param, param) for param in after.params if any(param.same_as(p) for p in before.params))
    in_order = _aligned_in_order([b for b in old if b[0] not in kept], [b for b in new if b[0] not in kept])
    for var, value in new:
        result[var] = set(nodes.get(var, ()))
        if var in kept:
            old_of[var] = var
            continue
        callee = value.op if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar) else None
        if callee is not None and functions is not None and callee.name_hint in functions \
                and not _is_tracked(functions[callee.name_hint]):
            group, output = matcher.group(functions[callee.name_hint], list(value.args), old_of)
            for member in group:
                result[var] |= nodes.get(member, frozenset())
            if output is not None:
                old_of[var] = output
            continue
        match = matcher.find(value, old_of, bound)
        if match is None and (aligned := in_order.get(var)) is not None and aligned not in matcher.taken:
            match = aligned
            matcher.taken.add(aligned)
        if match is not None:
            old_of[var] = match
            result[var] |= nodes.get(match, frozenset())
        if node := span_node(getattr(value, "span", None)):
            result[var].add(node)
    # a binding of `before` nothing recomputes: its nodes go to the new bindings where it stood (between the ones
    # recomputing the bindings before and after it: what a rewrite put in its place), else to the first of its
    # users something recomputes
    new_of = {old_var: new_var for new_var, old_var in old_of.items()}
    accounted = set(matcher.taken) | kept
    users = _users(old)
    reach: dict = {}
    for var, _ in reversed(old):
        reach[var] = {new_of[var]} if var in new_of else set().union(*(reach[user] for user in users[var]))
    position = {var: k for k, (var, _) in enumerate(new)}
    anchors = [k for k, (var, _) in enumerate(old) if var in new_of]
    for k, (var, _) in enumerate(old):
        if var in accounted or not nodes.get(var):
            continue
        at = bisect.bisect_left(anchors, k)
        low = position[new_of[old[anchors[at - 1]][0]]] if at > 0 else -1
        high = position[new_of[old[anchors[at]][0]]] if at < len(anchors) else len(new)
        for target in [target for target, _ in new[low + 1:high] if target not in old_of] or reach[var]:
            result[target] |= nodes[var]
    # a kept variable bound to another op (the float conv's variable now holds the int8 conv's requantize): the new
    # bindings right before it compute its nodes too
    old_values = dict(old)
    previous = -1
    for k, (var, value) in enumerate(new):
        if var not in old_of:
            continue
        if var in kept and _op_key(value) != _op_key(old_values[var]):
            for target, _ in new[previous + 1:k]:
                result[target] |= nodes.get(var, frozenset())
        previous = k
    # a new binding none of them reached computes for its users
    new_users = _users(new)
    for var, _ in reversed(new):
        if not result[var]:
            result[var] = set().union(*(result[user] for user in new_users[var]))
    return {var: frozenset(found) for var, found in result.items()}


@tvm.instrument.pass_instrument
class NodeProvenance:
    """Pass instrument following the ONNX nodes of every binding through the Relax passes (see the module
    docstring), up to and including the pass named `stop_after`; then `kernel_nodes()`."""

    def __init__(self, stop_after: str):
        self.stop_after = stop_after
        self.nodes: dict[str, dict] = {}  # Relax function name -> {variable: frozenset of ONNX nodes (op, name)}
        self.order: dict[tuple, int] = {}  # ONNX node -> its first binding's position at import (graph order)
        self.final = None  # the module after `stop_after`
        self._open: list[list] = []  # the passes running: [module before, whether a nested pass ran]

    def run_before_pass(self, mod, info):
        if self.final is not None:
            return
        for entry in self._open:
            entry[1] = True
        self._open.append([mod, False])

    def run_after_pass(self, mod, info):
        if self.final is not None or not self._open:
            return
        before, nested = self._open.pop()
        if not nested:  # a pass made of passes (Sequential) was followed pass by pass
            self._follow(before, mod)
        if info.name == self.stop_after:
            self.final = mod
            self._open.clear()

    def _follow(self, before, after) -> None:
        previous_functions = {g.name_hint: f for g, f in before.functions_items()}
        functions = {g.name_hint: f for g, f in after.functions_items()}
        for name, func in functions.items():
            if not _is_tracked(func):
                continue
            previous = previous_functions.get(name)
            if name not in self.nodes:
                self.nodes[name] = initial_nodes(previous if previous is not None else func)
                self._record_order(self.nodes[name], previous if previous is not None else func)
            if previous is None or previous.same_as(func):
                continue
            self.nodes[name] = carry_nodes(previous, self.nodes[name], func, functions)

    def _record_order(self, nodes: dict, func) -> None:
        for var, _ in _bindings(func):
            for node in sorted(nodes.get(var, ())):
                self.order.setdefault(node, len(self.order))

    def kernel_nodes(self) -> dict[str, list[dict]]:
        """Kernel (PrimFunc) name -> the ONNX nodes its call sites compute ({"op", "name"}; {} before the stop pass):
        in graph order, the quantize/dequantize nodes after the others."""
        if self.final is None:
            return {}
        found: dict[str, set] = {}
        for gvar, func in self.final.functions_items():
            nodes = self.nodes.get(gvar.name_hint)
            if not _is_tracked(func) or nodes is None:
                continue
            for var, value in _bindings(func):
                if (kernel := called_kernel(value)) is not None:
                    found.setdefault(kernel, set()).update(nodes.get(var, ()))
        return {kernel: [{"op": op, "name": name} for op, name in sorted(
                    nodes, key=lambda n: (n[0] in QDQ_OPS, self.order.get(n, len(self.order)), n))]
                for kernel, nodes in found.items()}
