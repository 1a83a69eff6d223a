"""`compile/provenance.py`: the ONNX nodes of each binding, carried across a pass (`carry_nodes`), on small
Relax functions built before and after a hand-written "pass". Whole compiles are checked in
`test_explain_kernels.py` (nodes per kernel) and `test_zoo.py` (every contraction named, every architecture)."""

from __future__ import annotations

from nativeq.compile._tvm import relax
from nativeq.compile.provenance import carry_nodes, initial_nodes, node_span, span_node

X = relax.Var("x", relax.TensorType((4,), "float32"))


def _chain(ops, nodes):
    """main(x): each op applied to the previous result (add: + x), its call spanned as the ONNX node named."""
    bb = relax.BlockBuilder()
    with bb.function("main", [X]):
        with bb.dataflow():
            value = X
            for op, node in zip(ops, nodes):
                call = op(value, X) if op is relax.op.add else op(value)
                if node is not None:
                    call = relax.Call(call.op, call.args, call.attrs, call.ty_args, span=node_span(("Op", node)))
                value = bb.emit(call)
            out = bb.emit_output(value)
        bb.emit_func_output(out)
    return bb.get()["main"]


def _names(nodes: dict, func) -> list[list[str]]:
    """The node names of each call binding (the output alias `gv = lv2` computes nothing)."""
    calls = [b.var for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    return [sorted(name for _, name in nodes[var]) for var in calls]


def test_spans_name_nodes_and_nothing_else():
    assert span_node(node_span(("MatMul", "/blocks.0/ff/MatMul:0"))) == ("MatMul", "/blocks.0/ff/MatMul:0")
    assert span_node(None) is None


def test_a_rebuilt_function_keeps_each_bindings_nodes():
    before = _chain([relax.op.nn.relu, relax.op.exp, relax.op.add], ["A", "B", "C"])
    after = _chain([relax.op.nn.relu, relax.op.exp, relax.op.add], [None, None, None])  # new variables, no spans
    assert _names(carry_nodes(before, initial_nodes(before), after), after) == [["A"], ["B"], ["C"]]


def test_a_rewrite_gives_its_replacement_the_nodes_it_removed():
    """relu -> exp becomes one sigmoid: the sigmoid, standing where they stood, computes A and B; the add, recomputed,
    keeps C."""
    before = _chain([relax.op.nn.relu, relax.op.exp, relax.op.add], ["A", "B", "C"])
    after = _chain([relax.op.sigmoid, relax.op.add], [None, None])
    assert _names(carry_nodes(before, initial_nodes(before), after), after) == [["A", "B"], ["C"]]


def test_a_replacement_with_a_span_of_its_own_keeps_both():
    before = _chain([relax.op.nn.relu, relax.op.exp, relax.op.add], ["A", "B", "C"])
    after = _chain([relax.op.nn.relu, relax.op.sigmoid, relax.op.add], [None, "S", None])
    assert _names(carry_nodes(before, initial_nodes(before), after), after) == [["A"], ["B", "S"], ["C"]]


def test_a_removed_binding_with_nothing_in_its_place_goes_to_its_first_recomputed_user():
    before = _chain([relax.op.nn.relu, relax.op.exp, relax.op.add], ["A", "B", "C"])
    after = _chain([relax.op.nn.relu, relax.op.add], [None, None])
    assert _names(carry_nodes(before, initial_nodes(before), after), after) == [["A"], ["B", "C"]]


def test_kernel_costs_sum_by_the_op_of_their_first_node():
    from nativeq.runtime.manifest import by_onnx_op, by_onnx_op_line, kernel_onnx_op

    records = [{"onnx_nodes": [{"op": "MatMul", "name": "a"}, {"op": "Add", "name": "b"}]},
               {"onnx_nodes": [{"op": "Softmax", "name": "s"}]}, {"onnx_nodes": []}, {}]
    assert [kernel_onnx_op(r) for r in records] == ["MatMul", "Softmax", None, None]
    totals = by_onnx_op(zip((kernel_onnx_op(r) for r in records), (3.0, 1.0, 0.5, 0.5)))
    assert totals == {"MatMul": 3.0, "-": 1.0, "Softmax": 1.0}  # largest first, then by name
    assert by_onnx_op_line(totals, "time") == "time by ONNX op (each kernel under its first node's op): " \
                                              "MatMul 60.0%, - 20.0%, Softmax 20.0%"
    assert by_onnx_op_line({"-": 2.0}, "time") is None
