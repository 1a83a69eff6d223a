"""Input sizes: `compile --dim` / `--input-shapes` fix or rename symbolic dims before import; a graph that
fixes a size itself (a Reshape traced at one length) gets a run-time check instead of a silently wrong
result; a symbolic batch compiles to the int8 kernels (the zoo's architectures, exported with batch B).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.input_shapes import fix_input_shapes, parse_input_shapes
from nativeq.errors import NativeqError
from nativeq.runtime.shape_checks import check_shape_conditions, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _dims_of(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _relu_model(shape=("B", "T", 8)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ----------------------------------------------------------------------------- parsing and fixing
@pytest.mark.parametrize("text, expected", [
    ("feats:[1,T,80]", {"feats": (1, "T", 80)}),
    ("feats:[1, T, 80] mask:[1,T]", {"feats": (1, "T", 80), "mask": (1, "T")}),
    ("x:[]", {"x": ()}),
    ("a.b/c:0:[B,3]", {"a.b/c:0": ("B", 3)}),
])
def test_parse_input_shapes(text, expected):
    assert parse_input_shapes(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("feats", "expected NAME:[d0,d1,...]"),
    ("feats:[1,0,80]", "size 0 must be at least 1"),
    ("feats:[1,T-1,80]", "'T-1' is neither a size nor a dim name"),
    ("x:[1] x:[2]", "names input 'x' twice"),
])
def test_parse_input_shapes_refuses(text, fragment):
    with pytest.raises(NativeqError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        parse_input_shapes(text)


def test_fix_dims_everywhere_the_graph_declares_them():
    model = _relu_model()
    fixed = fix_input_shapes(model, dims={"B": 1})
    assert _dims_of(fixed.graph.input[0]) == [1, "T", 8]
    assert _dims_of(fixed.graph.output[0]) == [1, "T", 8]
    assert _dims_of(model.graph.input[0]) == ["B", "T", 8]  # the caller's model is left alone


def test_input_shapes_fix_and_rename():
    fixed = fix_input_shapes(_relu_model(), input_shapes={"x": (2, "frames", 8)})
    assert _dims_of(fixed.graph.input[0]) == [2, "frames", 8]
    assert _dims_of(fixed.graph.output[0]) == [2, "frames", 8]


@pytest.mark.parametrize("dims, shapes, fragment", [
    ({"Q": 3}, {}, "the model has no symbolic dim 'Q' (its symbolic dims: B, T)"),
    ({"B": 0}, {}, "--dim B=0: a size must be at least 1"),
    ({}, {"y": (1, 2, 8)}, "the model has no input 'y' (its inputs: x)"),
    ({}, {"x": (1, 2)}, "2 dims given, the model declares 3 ([B, T, 8])"),
    ({}, {"x": (1, "T", 9)}, "dim 2 is 8 in the model, not 9"),
    ({"B": 2}, {"x": (1, "T", 8)}, "dim 'B' given as both 2 and 1"),
])
def test_fix_input_shapes_refuses(dims, shapes, fragment):
    with pytest.raises(NativeqError) as error:
        fix_input_shapes(_relu_model(), dims=dims, input_shapes=shapes)
    assert fragment in str(error.value)


# ----------------------------------------------------------------------------- run-time shape conditions
@pytest.mark.parametrize("text, dims, value", [
    ("((T * B) * 144)", {"T": 50, "B": 2}, 14400),
    ("((T - 1) // 2 + 1)", {"T": 8}, 4),
    ("(T % 3)", {"T": 8}, 2),
    ("min(T, 4) + max(B, 7)", {"T": 2, "B": 1}, 9),
    ("-T + 10", {"T": 3}, 7),
])
def test_evaluate_size_expressions(text, dims, value):
    assert evaluate(text, dims) == value


@pytest.mark.parametrize("text", ["__import__('os')", "T.bit_length()", "T ** 2", "[T]", "S + 1", "1.5"])
def test_evaluate_refuses_anything_else(text):
    with pytest.raises((ValueError, SyntaxError)):
        evaluate(text, {"T": 3})


def test_shape_condition_error_names_the_node():
    check = {"node": "/attn/Reshape_4", "op": "Reshape", "lhs": "(T * 144)", "rhs": "7200"}
    check_shape_conditions([check], {"T": 50})
    with pytest.raises(NativeqError, match=r"input sizes T=40 do not fit Reshape node '/attn/Reshape_4': it reshapes "
                                           r"\(T \* 144\) = 5760 elements into 7200 = 7200"):
        check_shape_conditions([check], {"T": 40})


def _traced_reshape_model() -> onnx.ModelProto:
    """x[1, T, 8] -> Reshape to a constant [50, 8] (the length traced at export) -> Relu -> Reshape [1, -1, 8]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 8])
    nodes = [
        helper.make_node("Reshape", ["x", "traced"], ["flat"], name="traced_reshape"),
        helper.make_node("Relu", ["flat"], ["relu"]),
        helper.make_node("Reshape", ["relu", "back"], ["y"], name="back_reshape"),
    ]
    inits = [helper.make_tensor("traced", TensorProto.INT64, [2], [50, 8]),
             helper.make_tensor("back", TensorProto.INT64, [3], [1, -1, 8])]
    graph = helper.make_graph(nodes, "traced", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def traced_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("traced")
    onnx.save(_traced_reshape_model(), root / "m.onnx")
    with pytest.warns(UserWarning, match="Reshape node 'traced_reshape' needs"):
        result = compile_model(root / "m.onnx", root / "art", CompileConfig(target="host", use_tuning=False))
    return root / "m.onnx", result


def test_traced_reshape_is_recorded_and_checked(traced_artifact):
    import nativeq

    onnx_path, result = traced_artifact
    assert [c["node"] for c in result.manifest["shape_checks"]] == ["traced_reshape"]
    model = nativeq.load(result.out_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 50, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.run({"x": x})["y"], session.run(None, {"x": x})[0])
    short = x[:, :40]
    with pytest.raises(Exception):  # ONNX Runtime refuses the traced length too
        session.run(None, {"x": short})
    with pytest.raises(NativeqError, match="input sizes T=40 do not fit Reshape node 'traced_reshape'"):
        model.run({"x": short})


def _skip_concat_model() -> onnx.ModelProto:
    """A U-Net skip connection: x[1, 4, T] -> two stride-2 convs -> ConvTranspose (stride 2) back up, concatenated
    with the first conv's output and fed to a ConvTranspose. The two lengths, (T - 1) // 2 + 1 and
    2 * ((T - 1) // 4 + 1), are equal for some T only."""
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "T_out"])
    conv = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["e1"], name="enc1", **conv),
        helper.make_node("Conv", ["e1", "w2"], ["e2"], name="enc2", **conv),
        helper.make_node("ConvTranspose", ["e2", "wu"], ["up"], name="up", kernel_shape=[2], strides=[2]),
        helper.make_node("Concat", ["up", "e1"], ["skip"], name="skip_concat", axis=1),
        helper.make_node("ConvTranspose", ["skip", "wd"], ["y"], name="dec", kernel_shape=[2], strides=[2]),
    ]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name) for name, shape in
             [("w1", (8, 4, 3)), ("w2", (8, 8, 3)), ("wu", (8, 8, 2)), ("wd", (16, 4, 2))]]
    graph = helper.make_graph(nodes, "skip", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_of_lengths_equal_for_some_inputs_only_compiles_and_is_checked(tmp_path):
    """The concat's other dims are unified to one spelling (its shape was unknown and the ConvTranspose after it
    failed to compile with an internal error); inputs that fit run as ONNX Runtime runs them, the others are
    refused with the node named, as ONNX Runtime refuses them."""
    import nativeq

    path = tmp_path / "skip.onnx"
    onnx.save(_skip_concat_model(), path)
    with pytest.warns(UserWarning, match="Concat node 'skip_concat' needs"):
        result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    assert [c["node"] for c in result.manifest["shape_checks"]] == ["skip_concat"]
    model = nativeq.load(result.out_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 40)).astype(np.float32)  # 20 == 2 * 10
    np.testing.assert_allclose(model.run({"x": x})["y"], session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    odd = rng.standard_normal((1, 4, 42)).astype(np.float32)  # 21 != 2 * 11
    with pytest.raises(Exception):
        session.run(None, {"x": odd})
    with pytest.raises(NativeqError, match="input sizes T=42 do not fit Concat node 'skip_concat'"):
        model.run({"x": odd})


def test_traced_reshape_fixed_by_dim_needs_no_check(tmp_path):
    onnx.save(_traced_reshape_model(), tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False,
                                                                                dims={"T": 50}))
    assert result.manifest["shape_checks"] == []
    assert result.manifest["inputs"][0]["shape"] == [1, 50, 8]
    assert result.manifest["build"]["dims"] == {"T": 50}


def test_verify_takes_the_size_an_artifact_was_compiled_for(tmp_path):
    """`verify` / `bench` of an artifact compiled with `--dim T=50` accept `--dim T=50` (the ONNX model itself is
    symbolic; a user passes the same sizes to both commands) and refuse another T in one line."""
    from nativeq.verify import VerifyConfig, verify_artifact

    onnx.save(_traced_reshape_model(), tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False, dims={"T": 50}))
    report = verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(dims={"T": 50}, runs=1))
    assert report.passed and report.outputs[0].max_abs == 0.0, report.table()
    with pytest.raises(NativeqError, match=r"--dim T=60: the artifact was compiled for T=50 \(compile --dim\)"):
        verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(dims={"T": 60}, runs=1))
    with pytest.raises(NativeqError, match="--dim S: the model has no symbolic dim 'S'"):
        verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(dims={"S": 60}, runs=1))


def test_cli_input_shapes_and_dim(nativeq_cli, tmp_path):
    onnx.save(_relu_model(), tmp_path / "m.onnx")
    res = nativeq_cli("compile", "m.onnx", "-t", "host", "-o", "out", "--no-tuning", "--dim", "B=1",
                      "--input-shapes", "x:[B,frames,8]")
    assert res.returncode == 0, res.stderr
    assert "x: float32[1, frames, 8]" in res.stdout
    res = nativeq_cli("compile", "m.onnx", "-t", "host", "-o", "out2", "--input-shapes", "x:[1,T]")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "2 dims given, the model declares 3" in res.stderr
    assert not (tmp_path / "out2").exists()


def test_cli_input_shapes_given_once_per_input(nativeq_cli, tmp_path):
    """`--input-shapes` repeated, as `--dim` is: every one applies (click kept only the last one)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["A", 8]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["A", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    res = nativeq_cli("compile", "m.onnx", "-t", "host", "-o", "out", "--no-tuning",
                      "--input-shapes", "x:[3,8]", "--input-shapes", "y:[3,8]")
    assert res.returncode == 0, res.stderr
    assert "x: float32[3, 8]" in res.stdout and "y: float32[3, 8]" in res.stdout, res.stdout


# ----------------------------------------------------------------------------- symbolic batch
# the Conformer (attention + conv module) in the default suite; the rest slow
BATCH_ZOO = [pytest.param("transformer_postnorm", marks=pytest.mark.slow), pytest.param("conformer"),
             pytest.param("lstm_am", marks=pytest.mark.slow), pytest.param("quartznet", marks=pytest.mark.slow),
             pytest.param("whisper_encoder", marks=pytest.mark.slow),
             pytest.param("relpos_conformer", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", BATCH_ZOO)
def test_zoo_model_with_symbolic_batch(name, tmp_path_factory, monkeypatch):
    """The zoo architecture exported with batch *and* time symbolic: no contraction kernel on the generic path,
    every batch row bit-identical to a batch-1 run, and equal to ONNX Runtime at B=2 (rounding ties accepted)."""
    from benchmarks import zoo
    from benchmarks.zoo import registry
    from nativeq.compile.kernels import GENERIC_PATH
    from nativeq.verify import VerifyConfig, verify_artifact

    import nativeq

    spec = registry.get_model(name)
    monkeypatch.setitem(registry.ZOO, name, dataclasses.replace(
        spec, input_shape=("B",) + spec.input_shape[1:], output_axes={0: "B", **spec.output_axes}))
    root = tmp_path_factory.mktemp(f"batch-{name}")
    path = zoo.build(name, "qdq_u8_pc", root)
    assert _dims_of(onnx.load(str(path)).graph.input[0])[:2] == ["B", "T"]
    result = compile_model(path, root / "art", CompileConfig(target="host", use_tuning=False))
    generic = [k["name"] for k in result.kernels if k["kind"] == "contraction" and k["schedule"] == GENERIC_PATH]
    assert generic == []
    report = verify_artifact(result.out_dir, path, VerifyConfig(runs=1, dims={"B": 2, "T": 37}, accept_ties=True))
    assert report.passed, report.table()
    model = nativeq.load(result.out_dir)
    x = registry.get_model(name).random_input(37, np.random.default_rng(1))
    batch = np.concatenate([x, x[:, ::-1].copy(), x * 0.5])
    out = model.run({spec.input_name: batch})[spec.output_name]
    for row in range(3):
        alone = model.run({spec.input_name: batch[row:row + 1]})[spec.output_name]
        np.testing.assert_array_equal(out[row:row + 1], alone)


def test_output_declared_with_a_size_the_graph_does_not_compute_gets_the_computed_one(tmp_path):
    """An output declared [1, 3, 8] that the graph computes as [1, T, 8]: ONNX Runtime returns what the graph
    computes (with a warning), so the artifact does too, and its manifest says so."""
    import qdq_models

    import nativeq

    model = qdq_models.two_io(k=16, n=8)
    y = model.graph.output[0].type.tensor_type.shape.dim
    y[1].Clear()
    y[1].dim_value = 3
    onnx.save(model, tmp_path / "m.onnx")
    compiled = compile_model(tmp_path / "m.onnx", tmp_path / "a", CompileConfig(target="host", use_tuning=False))
    assert compiled.manifest["outputs"][0]["shape"] == [1, "T", 8]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(1, 40, 16)).astype(np.float32), "z": rng.normal(size=(1, 40, 8)).astype(np.float32)}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), so).run(None, feeds)
    got = nativeq.load(tmp_path / "a").run(feeds)
    assert got["y"].shape == want[0].shape == (1, 40, 8)
    np.testing.assert_array_equal(got["y"], want[0])
    np.testing.assert_array_equal(got["r"], want[1])
