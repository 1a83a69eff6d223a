"""Every user mistake gives one `error:` line naming the problem, a non-zero exit, no traceback,
and leaves nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import qdq_models
from onnx import TensorProto, helper

from nativeq.errors import NativeqError


def assert_one_line_error(res, *fragments, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


def _no_leftovers(directory, name):
    return not [p.name for p in directory.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def _model(nodes, inputs, outputs, inits=(), check=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def test_missing_model_file(nativeq_cli, tmp_path):
    res = nativeq_cli("compile", "nope.onnx", "--target", "host", "-o", "out")
    assert_one_line_error(res, "model file nope.onnx does not exist")
    assert _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", b""])
def test_not_an_onnx_file(nativeq_cli, tmp_path, content):
    (tmp_path / "notes.onnx").write_bytes(content)
    res = nativeq_cli("compile", "notes.onnx", "--target", "host", "-o", "out")
    assert_one_line_error(res, "notes.onnx is not an ONNX model")
    assert _no_leftovers(tmp_path, "out")


def test_model_failing_onnx_checker(nativeq_cli, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = _model([helper.make_node("Add", ["x", "undefined_tensor"], ["y"], name="add")], [x], [y], check=False)
    onnx.save(model, tmp_path / "broken.onnx")
    res = nativeq_cli("compile", "broken.onnx", "--target", "host", "-o", "out")
    assert_one_line_error(res, "broken.onnx fails onnx.checker:", "undefined_tensor")
    assert _no_leftovers(tmp_path, "out")


def test_op_the_importer_lacks_names_op_and_node(nativeq_cli, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    onnx.save(_model([helper.make_node("Det", ["x"], ["y"], name="determinant")], [x], [y]), tmp_path / "det.onnx")
    res = nativeq_cli("compile", "det.onnx", "--target", "host", "-o", "out")
    assert_one_line_error(res, "op 'Det' (node 'determinant')", "not supported by the TVM ONNX importer")
    assert _no_leftovers(tmp_path, "out")


@pytest.fixture
def matmul_onnx(tmp_path):
    onnx.save(qdq_models.qdq_matmul(k=16, n=8), tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


def test_unknown_target_lists_valid_ones(nativeq_cli, matmul_onnx):
    res = nativeq_cli("compile", matmul_onnx, "--target", "rpi9", "-o", "out")
    assert_one_line_error(res, "unknown target 'rpi9'; valid targets: ", "x86-avx512-vnni", "rpi4", "rpi5", "host")


def test_existing_output_is_untouched_without_force(nativeq_cli, tmp_path, matmul_onnx):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = nativeq_cli("compile", matmul_onnx, "--target", "host", "-o", "out")
    assert_one_line_error(res, "output out already exists (use --force to replace it)")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    from nativeq.compile import CompileConfig, compile_model

    compile_model(matmul_onnx, out, CompileConfig(target="host"), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_cross_compiler_names_the_apt_package(nativeq_cli, tmp_path, matmul_onnx):
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    res = nativeq_cli("compile", matmul_onnx, "--target", "rpi4", "-o", "out", env={"PATH": str(empty_bin)})
    assert_one_line_error(res, "aarch64-linux-gnu-g++ not found; install it with: apt-get install g++-aarch64-linux-gnu")
    assert _no_leftovers(tmp_path, "out")


def test_missing_host_compiler_names_the_apt_package(nativeq_cli, tmp_path, matmul_onnx):
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    res = nativeq_cli("compile", matmul_onnx, "--target", "host", "-o", "out", env={"PATH": str(empty_bin)})
    assert_one_line_error(res, "no C/C++ compiler found to link the library; install one with: apt-get install g++")
    assert _no_leftovers(tmp_path, "out")


def test_missing_tuning_database(nativeq_cli, matmul_onnx):
    res = nativeq_cli("compile", matmul_onnx, "--target", "host", "-o", "out", "--tuning-log", "no-db")
    assert_one_line_error(res, "tuning database no-db does not exist")


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_half_artifact(tmp_path, matmul_onnx, monkeypatch, failure):
    import nativeq.compile.artifact as artifact
    from nativeq.compile import CompileConfig, compile_model

    def fail(*args, **kwargs):
        assert list(kwargs["out_dir"].iterdir()), "the library was already written when the failure hits"
        raise failure

    monkeypatch.setattr(artifact, "build_manifest", fail)
    with pytest.raises(type(failure)):
        compile_model(matmul_onnx, tmp_path / "out", CompileConfig(target="host"))
    assert _no_leftovers(tmp_path, "out")


# ------------------------------------------------------------------ artifact and call-time errors
@pytest.fixture
def artifact(matmul_artifact, tmp_path):
    onnx_path, source = matmul_artifact
    shutil.copytree(source, tmp_path / "art")
    shutil.copy(onnx_path, tmp_path / "m.onnx")
    return tmp_path / "art"


@pytest.mark.parametrize(
    "arrays, fragments",
    [
        ({"feats": np.zeros((1, 4, 64), np.float32)}, ["unknown input 'feats'", "x: float32[1, T, 64]"]),
        ({"x": np.zeros((1, 4, 64), np.float16)}, ["input 'x': expected dtype float32, got float16"]),
        ({"x": np.zeros((1, 4, 65), np.float32)}, ["input 'x': dim 2 must be 64, got 65"]),
        ({"x": np.zeros((4, 64), np.float32)}, ["input 'x': expected shape [1, T, 64] (rank 3), got (4, 64)"]),
    ],
)
def test_wrong_inputs_at_call_time(nativeq_cli, tmp_path, artifact, arrays, fragments):
    np.savez(tmp_path / "in.npz", **arrays)
    res = nativeq_cli("verify", artifact, "--onnx", "m.onnx", "--inputs", "in.npz")
    assert_one_line_error(res, *fragments)


def test_tampered_artifact(nativeq_cli, artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    with open(artifact / manifest["library"], "ab") as f:
        f.write(b"\0")
    res = nativeq_cli("verify", artifact, "--onnx", "m.onnx")
    assert_one_line_error(res, "model.so was modified (sha256 mismatch)")


@pytest.mark.parametrize("field, value, fragment", [
    ("tvm_version", "0.25.0", "was built with TVM 0.25.0; this machine has TVM"),
    ("nativeq_version", "1.0.0", "was built by nativeq 1.0.0; this is nativeq"),
])
def test_artifact_from_another_version(nativeq_cli, artifact, field, value, fragment):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    from nativeq.runtime.manifest import seal_manifest

    path.write_text(json.dumps(seal_manifest(manifest)))
    res = nativeq_cli("verify", artifact, "--onnx", "m.onnx")
    assert_one_line_error(res, fragment, "recompile it")


@pytest.mark.parametrize("args, fragment", [
    (["--dim", "T"], "--dim 'T': expected NAME=INT"),
    (["--dim", "S=5"], "--dim S: the model has no symbolic dim 'S' (its symbolic dims: T)"),
    (["--inputs", "nothing.npz"], "inputs file nothing.npz does not exist"),
])
def test_bad_verify_options(nativeq_cli, artifact, args, fragment):
    res = nativeq_cli("verify", artifact, "--onnx", "m.onnx", *args)
    assert_one_line_error(res, fragment)


def test_verify_something_that_is_not_an_artifact(nativeq_cli, tmp_path):
    (tmp_path / "dir").mkdir()
    assert_one_line_error(nativeq_cli("verify", "dir", "--onnx", "m.onnx"), "dir is not a nativeq artifact (no manifest.json)")
    assert_one_line_error(nativeq_cli("verify", "gone", "--onnx", "m.onnx"), "artifact gone does not exist")


def test_verify_against_model_with_other_inputs(artifact, tmp_path):
    from nativeq.verify import VerifyConfig, verify_artifact

    x = helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 64])
    onnx.save(_model([helper.make_node("Relu", ["feats"], ["y"])], [x], [y]), tmp_path / "other.onnx")
    with pytest.raises(NativeqError, match="not the same model"):
        verify_artifact(artifact, tmp_path / "other.onnx", VerifyConfig())
