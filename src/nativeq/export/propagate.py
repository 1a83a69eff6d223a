"""Quantized data movement, so ONNX Runtime's optimizer has no Q/DQ pair to insert.

Where it sits: the last graph rewrite of `export.qdq.to_qdq_onnx`, before shape inference.

Why: at ORT_ENABLE_BASIC and above, ONNX Runtime's QDQPropagationTransformer inserts a
QuantizeLinear -> DequantizeLinear pair on the edges of a data-movement chain (Reshape,
Transpose, Squeeze, Unsqueeze, Slice, MaxPool) that starts at a DequantizeLinear (after
giving each consumer its own copy of it) or ends at a QuantizeLinear. Its inserted
QuantizeLinear carries `output_dtype` (INT8); at ORT_ENABLE_EXTENDED its QDQS8ToU8Transformer
swaps the pair's zero point for a UINT8 one without touching that attribute, and the session
fails to load ("output_dtype INT8 does not match y_zero_point type UINT8").

What, until nothing changes:

    sink:     q -> DQ -> P -> y           becomes  q -> P -> DQ -> y       (P moves the integers)
    backward: X -> P -> Q(s, z)           becomes  X -> Q(s, z) -> DQ -> P -> Q(s, z)   (X not a DQ)
    forward:  DQ(s, z) -> P -> Y          becomes  DQ -> P -> Q(s, z) -> DQ -> Y        (Y not a Q)

Sinking leaves no DequantizeLinear in front of data movement; the other two are ORT's own
rules, inserted here without `output_dtype` for what sinking cannot reach (float data
movement into a QuantizeLinear). All three are exact: data movement commutes with
elementwise quantization, and requantizing a dequantized integer at its own scale and zero
point returns it. The compiler's FoldDequantizeQuantize folds the inserted pairs back into
integer data movement.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

PROPAGATING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool"}


def _is(node, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


class _Graph:
    """The nodes of a GraphProto as a list, with producer and consumer maps kept up to date."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = []
        for n in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            self.nodes.append(copy)
        self.scalars = {t.name for t in graph.initializer if all(d == 1 for d in t.dims)}
        self.outputs = {o.name for o in graph.output}
        self.names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        self.names |= {o for n in self.nodes for o in n.output} | {n.name for n in self.nodes}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers = defaultdict(list)  # tensor -> [(node, input index)]
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}{k}", k + 1
        self.names.add(name)
        return name

    def constant_qparams(self, node) -> bool:
        """QuantizeLinear/DequantizeLinear with a constant per-tensor scale (and zero point, if any)."""
        return len(node.input) >= 2 and all(name in self.scalars for name in node.input[1:3] if name)

    def single_edge(self, tensor: str) -> bool:
        return tensor not in self.outputs and len(self.consumers[tensor]) == 1

    def place(self, new: list, consumers: list) -> None:
        """Insert `new` right before the first of `consumers` (at the end if none).

        Late, not right after the producer: the node order is the order compilers import
        the graph in, and keeping each value's computation next to its use leaves the
        original order of everything else intact.
        """
        ids = {id(c) for c in consumers}
        at = next((i for i, n in enumerate(self.nodes) if id(n) in ids), len(self.nodes))
        self.nodes[at:at] = new

    def insert_pair(self, tensor: str, edges: list, qparams: list[str]) -> None:
        """Q(tensor) once and one DQ per consumer edge (or, for no edges, before the graph output `tensor`)."""
        src = self.producer.get(tensor)
        q_in = tensor
        if not edges:  # the tensor is a graph output: the pair ends in it
            q_in = self.fresh(f"{tensor}.pre_q")
            src.output[list(src.output).index(tensor)] = q_in
            self.producer[q_in] = src
        q_out = self.fresh(f"{tensor}.requant_q")
        q = helper.make_node("QuantizeLinear", [q_in, *qparams], [q_out], name=self.fresh(f"{tensor}.requant_Q"))
        new = [q]
        self.producer[q_out] = q
        self.consumers[q_in].append((q, 0))
        for dst, index in edges or [(None, None)]:
            dq_out = tensor if dst is None else self.fresh(f"{tensor}.requant_dq")
            dq = helper.make_node("DequantizeLinear", [q_out, *qparams], [dq_out], name=self.fresh(f"{tensor}.requant_DQ"))
            new.append(dq)
            self.producer[dq_out] = dq
            self.consumers[q_out].append((dq, 0))
            if dst is not None:
                dst.input[index] = dq_out
                self.consumers[tensor] = [(d, i) for d, i in self.consumers[tensor] if d is not dst or i != index]
                self.consumers[dq_out].append((dst, index))
        self.place(new, [dst for dst, _ in edges])


def _qparams(node) -> list[str]:
    return [name for name in node.input[1:3] if name]


def _backward(g: _Graph) -> bool:
    """One pass of Q propagation up data-movement chains; True if a pair was inserted."""
    for q in list(g.nodes):
        if not _is(q, "QuantizeLinear") or not g.constant_qparams(q):
            continue
        node = g.producer.get(q.input[0])
        if node is None or not g.single_edge(q.input[0]) or not _is_propagating(node):
            continue
        tensor = node.input[0]  # the chain continues from the inserted Q on a later pass
        src = g.producer.get(tensor)
        if src is not None and (_is(src, "DequantizeLinear") or not g.single_edge(tensor)):
            continue
        g.insert_pair(tensor, [(node, 0)], _qparams(q))
        return True
    return False


def _is_propagating(node) -> bool:
    return node is not None and node.op_type in PROPAGATING and node.domain in ("", "ai.onnx")


def _next_edges(g: _Graph, node) -> tuple[str, list] | None:
    """The consumer edges of a data-movement node's output that do not end in a QuantizeLinear."""
    tensor = node.output[0]
    edges = g.consumers[tensor]
    if tensor in g.outputs:
        return (tensor, []) if not edges else None
    edges = [(dst, i) for dst, i in edges if not _is(dst, "QuantizeLinear")]
    return (tensor, edges) if edges else None


def _forward(g: _Graph) -> bool:
    """One pass of DQ propagation down data-movement chains; True if a pair was inserted.

    Each inserted DequantizeLinear starts the next link of a chain on a later pass.
    """
    for dq in list(g.nodes):
        if not _is(dq, "DequantizeLinear") or not g.constant_qparams(dq) or not g.single_edge(dq.output[0]):
            continue
        node = g.consumers[dq.output[0]][0][0]
        found = _next_edges(g, node) if _is_propagating(node) else None
        if found is not None:
            g.insert_pair(found[0], found[1], _qparams(dq))
            return True
    return False


def _sink(g: _Graph) -> bool:
    """Move one DequantizeLinear below a data-movement node it feeds; True if one moved.

        q -> DQ -> P -> y   becomes   q -> P -> DQ -> y

    A DQ with other consumers stays for them and P gets its own (ORT gives every consumer its
    own DQ before propagating: EnsureUniqueDQForNodeUnit). P (not MaxPool: it has a second
    output) then moves the integers themselves.
    """
    for dq in list(g.nodes):
        if not _is(dq, "DequantizeLinear") or not g.constant_qparams(dq) or dq.output[0] in g.outputs:
            continue
        f = dq.output[0]
        for node, index in g.consumers[f]:
            if index == 0 and _is_propagating(node) and node.op_type != "MaxPool" and node.output[0] not in g.outputs:
                break
        else:
            continue
        q, y = dq.input[0], node.output[0]
        moved = g.fresh(f"{y}.q")
        node.input[0], node.output[0] = q, moved
        g.consumers[f] = [(n, i) for n, i in g.consumers[f] if n is not node]
        g.consumers[q].append((node, 0))
        if not g.consumers[f]:  # its last consumer: the DQ itself moves
            del g.consumers[f], g.producer[f]
            g.consumers[q] = [(n, i) for n, i in g.consumers[q] if n is not dq]
            g.nodes = [n for n in g.nodes if n is not dq]
            dq.input[0], dq.output[0] = moved, y
        else:
            dq = helper.make_node("DequantizeLinear", [moved, *_qparams(dq)], [y], name=g.fresh(f"{dq.name}.{y}"))
            dq.attribute.extend([a for a in g.producer[f].attribute])
        g.consumers[moved] = [(dq, 0)]
        g.producer[moved], g.producer[y] = node, dq
        g.place([dq], [n for n, _ in g.consumers[y]])
        return True
    return False


def requantize_data_movement(graph: onnx.GraphProto) -> int:
    """Rewrite `graph` in place so ORT's QDQ propagation finds nothing to insert; returns the rewrites.

    First every DequantizeLinear sinks below the data movement it feeds alone (`_sink`);
    then the Q/DQ pairs ORT would insert are inserted (`_backward`: float data movement
    into a QuantizeLinear; `_forward`: what sinking could not reach).
    """
    g = _Graph(graph)
    count = 0
    while _sink(g):
        count += 1
    while _backward(g) or _forward(g):
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(g.nodes)
    return count
