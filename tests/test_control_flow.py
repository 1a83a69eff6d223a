"""ONNX If nodes, as published models carry them: conditions on shapes or ranks (TorchScript's `if x.dim() == 3`,
a squeeze when a size is 1), decided once the sizes are known, and conditions on run-time values (a wake-word
verifier that runs when the first score passes 0.5, a sample-rate input choosing the 16 kHz or 8 kHz weights),
where both branches run and the result is selected. Also graphs whose nodes come out of order (ONNX Runtime's
quantizer writes them so around If nodes) and old-opset per-channel QDQ files."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.api import load_onnx, topologically_sorted
from nativeq.compile.input_shapes import fix_input_shapes
from nativeq.compile.onnx_legalize import legalize
from nativeq.errors import NativeqError
from nativeq.runtime import load

D_IN, D_OUT = 16, 8


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _branch(name: str, weight: str, out: str, extra: list | None = None) -> onnx.GraphProto:
    """A branch computing `out = MatMul(x, weight)` (x and weight from the graph around it)."""
    nodes = [helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}_matmul")] + (extra or [])
    last = nodes[-1].output[0]
    nodes.append(helper.make_node("Identity", [last], [out], name=f"{name}_out"))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _shape_if_model(cond_nodes: list, cond: str) -> onnx.ModelProto:
    """x [1, T, 16] -> y [1, T, 8]: one weight if `cond` holds, another otherwise (both branches read outer x)."""
    rng = np.random.default_rng(0)
    then_g = _branch("then", "w_then", "then_y")
    else_g = _branch("else", "w_else", "else_y",
                     [helper.make_node("Relu", ["else_mm"], ["else_relu"], name="else_relu")])
    nodes = cond_nodes + [helper.make_node("If", [cond], ["y"], name="choose", then_branch=then_g, else_branch=else_g)]
    inits = [_const("w_then", rng.standard_normal((D_IN, D_OUT)).astype(np.float32)),
             _const("w_else", rng.standard_normal((D_IN, D_OUT)).astype(np.float32)),
             _const("one", np.array(1, np.int64)), _const("three", np.array(3, np.int64))]
    graph = helper.make_graph(nodes, "shape_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", D_OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _length_is_one() -> onnx.ModelProto:
    return _shape_if_model([helper.make_node("Shape", ["x"], ["shape"], name="shape"),
                            helper.make_node("Gather", ["shape", "one"], ["length"], name="length"),
                            helper.make_node("Equal", ["length", "one"], ["is_one"], name="is_one")], "is_one")


def _rank_is_three() -> onnx.ModelProto:
    return _shape_if_model([helper.make_node("Shape", ["x"], ["shape"], name="shape"),
                            helper.make_node("Size", ["shape"], ["rank"], name="rank"),
                            helper.make_node("Equal", ["rank", "three"], ["is_3d"], name="is_3d")], "is_3d")


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _compile_and_compare(model: onnx.ModelProto, tmp_path, feeds_list, dims=None, rtol=1e-5):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False, dims=dims or {}))
    compiled = load(tmp_path / "art")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds in feeds_list:
        expected = session.run(None, feeds)
        got = compiled.run(feeds)
        for out, want in zip(session.get_outputs(), expected):
            assert got[out.name].shape == want.shape
            np.testing.assert_allclose(got[out.name], want, rtol=rtol, atol=rtol)
    return result


@pytest.mark.parametrize("length, taken", [(1, "w_then"), (5, "w_else")])
def test_an_if_on_a_fixed_size_keeps_only_the_branch_taken(length, taken):
    model = legalize(fix_input_shapes(_length_is_one(), {"T": length}, {}))
    assert "If" not in _ops(model)
    weights = {i.name for i in model.graph.initializer if i.name.startswith("w_")}
    assert weights == {taken}, weights


def test_an_if_on_the_rank_is_decided_with_the_length_symbolic():
    model = legalize(_rank_is_three())  # T stays symbolic: `x.dim()` is known anyway
    assert "If" not in _ops(model) and "Relu" not in _ops(model), _ops(model)


@pytest.mark.parametrize("length", [1, 5])
def test_an_if_on_a_fixed_size_matches_onnxruntime(length, tmp_path):
    x = np.random.default_rng(1).standard_normal((1, length, D_IN)).astype(np.float32)
    _compile_and_compare(_length_is_one(), tmp_path, [{"x": x}], dims={"T": length})


def _verifier_model() -> onnx.ModelProto:
    """A wake-word head and its verifier (openWakeWord's pattern): score = sigmoid(x w); if score >= 0.5 the
    verifier's sigmoid(relu(x v) u) is returned, else the score itself."""
    rng = np.random.default_rng(2)
    verify = helper.make_graph(
        [helper.make_node("MatMul", ["x", "v"], ["hidden"], name="verifier_matmul"),
         helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="verifier_relu"),
         helper.make_node("MatMul", ["hidden_relu", "u"], ["logit2"], name="verifier_out"),
         helper.make_node("Sigmoid", ["logit2"], ["verified"], name="verifier_sigmoid")],
        "verify", [], [helper.make_tensor_value_info("verified", TensorProto.FLOAT, [1, 1])])
    keep = helper.make_graph([helper.make_node("Identity", ["score"], ["kept"], name="keep")], "keep", [],
                             [helper.make_tensor_value_info("kept", TensorProto.FLOAT, [1, 1])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logit"], name="head"),
             helper.make_node("Sigmoid", ["logit"], ["score"], name="score"),
             helper.make_node("GreaterOrEqual", ["score", "half"], ["passed"], name="passed"),
             helper.make_node("If", ["passed"], ["y"], name="verify_if", then_branch=verify, else_branch=keep)]
    inits = [_const("w", rng.standard_normal((D_IN, 1)).astype(np.float32)),
             _const("v", rng.standard_normal((D_IN, 32)).astype(np.float32)),
             _const("u", rng.standard_normal((32, 1)).astype(np.float32) * 0.3),
             _const("half", np.array(0.5, np.float32))]
    graph = helper.make_graph(nodes, "wake_word", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_if_on_a_value_runs_both_branches_and_selects(tmp_path):
    model = _verifier_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(-1)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, D_IN)).astype(np.float32)} for _ in range(16)]
    scores = [(f["x"] @ w).item() for f in feeds]
    assert min(scores) < 0 < max(scores)  # both branches are taken among the inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile_and_compare(model, tmp_path, feeds)
    assert any("If node 'verify_if'" in str(w.message) and "both branches run" in str(w.message) for w in caught)


def test_an_if_on_a_value_with_branches_of_different_shapes_is_refused():
    model = _length_is_one()
    choose = model.graph.node[-1]
    else_g = next(a.g for a in choose.attribute if a.name == "else_branch")
    else_g.node[-1].CopyFrom(  # the else branch returns [1, T, 8, 1]
        helper.make_node("Unsqueeze", ["else_relu", "minus_one"], ["else_y"], name="else_out"))
    model.graph.initializer.append(_const("minus_one", np.array([-1], np.int64)))
    with pytest.raises(NativeqError, match=r"If node 'choose': its condition 'is_one' is computed at run time .*"
                                           r"float\[1, T, 8\] and float\[1, T, 8, 1\]"):
        legalize(model)


def test_an_if_in_a_branch_is_decided_once_the_branch_is_inlined():
    outer = _rank_is_three()
    inner_then = _branch("inner_then", "w_then", "inner_then_y")
    inner_else = _branch("inner_else", "w_else", "inner_else_y")
    then_g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["inner_shape"], name="inner_shape"),
         helper.make_node("Gather", ["inner_shape", "one"], ["inner_length"], name="inner_length"),
         helper.make_node("Equal", ["inner_length", "one"], ["inner_is_one"], name="inner_is_one"),
         helper.make_node("If", ["inner_is_one"], ["then_y"], name="inner_if",
                          then_branch=inner_then, else_branch=inner_else)],
        "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)])
    outer.graph.node[-1].attribute[0].g.CopyFrom(then_g)
    model = legalize(fix_input_shapes(outer, {"T": 1}, {}))
    assert "If" not in _ops(model)
    assert {i.name for i in model.graph.initializer if i.name.startswith("w_")} == {"w_then"}


def test_nodes_out_of_order_are_sorted_and_compile(tmp_path):
    model = _verifier_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # the If (reading "score" in its branch) before the node making it
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, path)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(path), full_check=True)
    assert _ops(load_onnx(path)) == ["MatMul", "Sigmoid", "GreaterOrEqual", "If"]
    x = np.random.default_rng(4).standard_normal((1, D_IN)).astype(np.float32)
    _compile_and_compare(model, tmp_path, [{"x": x}])


def test_a_cycle_is_refused():
    model = _verifier_model()
    model.graph.node[0].input[0] = "score"  # head reads the sigmoid of its own output
    with pytest.raises(NativeqError, match="cycle"):
        topologically_sorted(model)


def test_per_channel_qdq_below_opset_13_is_refused_with_the_fix(tmp_path):
    w = np.arange(2 * D_IN, dtype=np.int8).reshape(2, D_IN)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dq", axis=0),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [_const("w_q", w), _const("w_scale", np.full(2, 0.1, np.float32)), _const("w_zero", np.zeros(2, np.int8))]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D_IN])], inits)
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), path)
    with pytest.raises(NativeqError, match=r"need opset >= 13, the model has 12.*convert_version\(model, 13\)"):
        load_onnx(path)


def _sample_rate_model() -> onnx.ModelProto:
    """Silero VAD's shape: one model per sample rate behind `If(sr == 16000)`; the 8 kHz branch reads half the
    window and returns another shape, so no select can stand for the If."""
    rng = np.random.default_rng(5)
    at_16k = helper.make_graph([helper.make_node("MatMul", ["x", "w16"], ["y16"], name="mm16")], "at_16k", [],
                               [helper.make_tensor_value_info("y16", TensorProto.FLOAT, [1, 4])])
    at_8k = helper.make_graph([helper.make_node("Slice", ["x", "zero", "half", "one_axis"], ["x8"], name="half"),
                               helper.make_node("MatMul", ["x8", "w8"], ["y8"], name="mm8")], "at_8k", [],
                              [helper.make_tensor_value_info("y8", TensorProto.FLOAT, [1, 2])])
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is_16k"], name="is_16k"),
             helper.make_node("If", ["is_16k"], ["y"], name="by_rate", then_branch=at_16k, else_branch=at_8k)]
    inits = [_const("w16", rng.standard_normal((D_IN, 4)).astype(np.float32)),
             _const("w8", rng.standard_normal((D_IN // 2, 2)).astype(np.float32)),
             _const("rate16k", np.array(16000, np.int64)), _const("zero", np.array([0], np.int64)),
             _const("half", np.array([D_IN // 2], np.int64)), _const("one_axis", np.array([1], np.int64))]
    graph = helper.make_graph(nodes, "by_rate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN]),
                                                 helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_input_fixed_at_compile_time_decides_its_if(tmp_path):
    from nativeq.verify import VerifyConfig, verify_artifact

    model = _sample_rate_model()
    path = tmp_path / "by_rate.onnx"
    onnx.save(model, path)
    with pytest.raises(NativeqError, match=r"If node .by_rate.*--input-value sr=VALUE"):
        compile_model(path, tmp_path / "any", CompileConfig(target="host", use_tuning=False))
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False,
                                                                 input_values={"sr": (16000,)}))
    assert {"name": "sr", "dtype": "int64", "shape": [], "value": [16000]} in result.manifest["inputs"]
    compiled = load(tmp_path / "art")
    x = np.random.default_rng(6).standard_normal((1, D_IN)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x, "sr": np.array(16000, np.int64)})[0]
    np.testing.assert_allclose(compiled.run({"x": x, "sr": np.array(16000, np.int64)})["y"], expected, rtol=1e-5)
    with pytest.raises(NativeqError, match=r"input 'sr' was fixed to 16000 when the artifact was compiled "
                                           r"\(compile --input-value\); got 8000"):
        compiled.run({"x": x, "sr": np.array(8000, np.int64)})
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(runs=2))  # random inputs take the fixed value
    assert report.passed and report.outputs[0].max_abs < 1e-5, report.table()


@pytest.mark.parametrize("values, fragment", [
    ({"rate": (16000,)}, "the model has no input 'rate'"),
    ({"sr": (16000, 8000)}, r"2 value\(s\) given for shape \[\]"),
    ({"sr": (16000.5,)}, "16000.5 is not a int64 value"),
])
def test_input_values_are_refused_in_one_line(values, fragment, tmp_path):
    from nativeq.compile.input_shapes import fix_input_values

    with pytest.raises(NativeqError, match=fragment):
        fix_input_values(_sample_rate_model(), values)


def test_cli_input_value(nativeq_cli, tmp_path):
    onnx.save(_sample_rate_model(), tmp_path / "m.onnx")
    res = nativeq_cli("compile", "m.onnx", "-t", "host", "-o", "out", "--no-tuning", "--input-value", "sr=16000")
    assert res.returncode == 0, res.stderr
    assert "sr: int64[] = 16000 (fixed)" in res.stdout, res.stdout
    res = nativeq_cli("compile", "m.onnx", "-t", "host", "-o", "out2", "--input-value", "sr")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "expected NAME=VALUE" in res.stderr


@pytest.mark.arm
def test_a_scalar_input_fixed_at_compile_time_runs_on_the_pi(tmp_path):
    """The Pi 5 build of the sample-rate model under qemu: the 0-d `sr` input reaches the VM as 0-d (numpy's
    `ascontiguousarray` made it 1-d and the VM refused it), and the result is ONNX Runtime's."""
    from nativeq.runtime.emulate import run_emulated

    path = tmp_path / "by_rate.onnx"
    onnx.save(_sample_rate_model(), path)
    compile_model(path, tmp_path / "rpi5", CompileConfig(target="rpi5", use_tuning=False, input_values={"sr": (16000,)}))
    feeds = {"x": np.random.default_rng(7).standard_normal((1, D_IN)).astype(np.float32), "sr": np.array(16000, np.int64)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (got,) = run_emulated(tmp_path / "rpi5", feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_tune_takes_the_fixed_input_value(tmp_path):
    """`nativeq tune --input-value sr=16000` lowers the model as compile does (the tuned kernels are the ones compile
    makes); without it the If is refused, naming the option."""
    from nativeq.targets import get_target
    from nativeq.tuning.tune import lower_for_tuning

    path = tmp_path / "by_rate.onnx"
    onnx.save(_sample_rate_model(), path)
    with pytest.raises(NativeqError, match="--input-value sr=VALUE"):
        lower_for_tuning(path, get_target("host"))
    mod, _ = lower_for_tuning(path, get_target("host"), input_values={"sr": (16000,)})
    assert any("matmul" in gvar.name_hint for gvar in mod.get_global_vars())
