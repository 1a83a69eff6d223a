"""nativeq compile: QDQ models compile for the host and agree with ONNX Runtime (<= 1 step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest
import qdq_models

import nativeq
from nativeq._fs import sha256_file
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.pipeline import compile_passes
from nativeq.targets import get_target
from nativeq.verify import VerifyConfig, verify_artifact


def _compile(tmp_path, model, name, **cfg):
    onnx_path = tmp_path / f"{name}.onnx"
    onnx.save(model, onnx_path)
    result = compile_model(onnx_path, tmp_path / name, CompileConfig(target="host", **cfg))
    return onnx_path, result


@pytest.mark.parametrize(
    "name, build, dims",
    [
        ("matmul_s8", lambda: qdq_models.qdq_matmul(act_dtype="int8"), {"T": 50}),
        ("matmul_u8_per_tensor", lambda: qdq_models.qdq_matmul(act_dtype="uint8", per_channel=False), {"T": 33}),
        ("conv1d", lambda: qdq_models.qdq_conv1d(), {"T": 40}),
        ("conv1d_depthwise_u8", lambda: qdq_models.qdq_conv1d(c_in=16, c_out=16, groups=16, act_dtype="uint8"), {"T": 37}),
        ("conv2d", lambda: qdq_models.qdq_conv2d(), {}),
    ],
)
def test_compile_and_verify_qdq_models(tmp_path, name, build, dims):
    onnx_path, result = _compile(tmp_path, build(), name)
    assert result.manifest["int8_report"]["int8"] == 1  # the one matmul/conv site became int8
    assert result.explain == [] and "reason" not in result.summary()  # the table only with --explain
    report = verify_artifact(result.out_dir, onnx_path, VerifyConfig(runs=2, seed=3, dims=dims))
    (out,) = report.outputs
    assert report.passed, report.table()
    assert out.quantized and out.max_steps <= 1.0
    assert out.exact_pct >= 99.0, report.table()
    assert out.shape[0] == 1 and all(out.shape)


def test_float_qdq_path_without_int8_lowering(tmp_path):
    onnx_path, result = _compile(tmp_path, qdq_models.qdq_conv1d(seed=1), "conv1d_float", int8=False)
    assert result.manifest["build"]["int8"] is False
    assert not any("QDQ" in p or "Integer" in p for p in result.manifest["build"]["pipeline"])
    report = verify_artifact(result.out_dir, onnx_path, VerifyConfig())
    assert report.passed, report.table()


def test_manifest_records_everything(matmul_artifact):
    onnx_path, artifact = matmul_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["schema"] == 1
    assert manifest["nativeq_version"] == nativeq.__version__
    import tvm
    import tvm_ffi

    assert (manifest["tvm_version"], manifest["tvm_ffi_version"]) == (tvm.__version__, tvm_ffi.__version__)
    host = get_target("host")
    assert manifest["target"]["name"] == "host"
    assert manifest["target"]["tvm"] == host.tvm_dict()
    assert manifest["target"]["cpu_features"] == list(host.cpu_features)
    assert manifest["source"] == {"file": onnx_path.name, "sha256": sha256_file(onnx_path)}
    files = sorted(p.name for p in artifact.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and manifest["library"] in files
    for name, digest in manifest["files"].items():
        assert sha256_file(artifact / name) == digest
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, "T", 64]}]
    (out,) = manifest["outputs"]
    assert (out["name"], out["dtype"], out["shape"]) == ("y", "float32", [1, "T", 48])
    # the output comes from DequantizeLinear(scale 0.1, zp int8 0) through an Identity
    assert out["quant"]["dtype"] == "int8" and out["quant"]["zero_point"] == 0
    assert out["quant"]["scale"] == pytest.approx(0.1)
    assert manifest["build"]["pipeline"][-1] == "AttachGlobalSymbol"
    assert manifest["tuning"]["database"] is None
    assert manifest["compile_seconds"] > 0
    assert set(manifest["build"]["seconds"]) == {"import", "build", "export"}


def test_pipeline_is_a_plain_ordered_list():
    names = [p.info.name for p in compile_passes(get_target("x86-avx512-vnni"))]
    for before, after in [("LegalizeOps", "FuseOps"), ("FuseOps", "FuseTIR"), ("FuseTIR", "ToNonDataflow"),
                          ("ToNonDataflow", "VMShapeLower")]:
        assert names.index(before) < names.index(after)
    no_int8 = [p.info.name for p in compile_passes(get_target("x86-avx512-vnni"), int8=False)]
    assert no_int8[0] == "DispatchSampling" and len(no_int8) <= len(names)


def test_per_channel_output_quant_is_recorded(tmp_path):
    from nativeq.compile.artifact import io_specs

    scale = np.array([0.1, 0.2, 0.3], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1),
        ],
        "pc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, "N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, "N"])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(3, np.uint8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    inputs, (out,) = io_specs(model)
    assert inputs[0].shape == (2, 3, "N")
    assert out.quant == {"scale": pytest.approx(scale.tolist()), "zero_point": [0, 0, 0], "dtype": "uint8", "axis": 1}


def test_tuning_database_is_applied_and_recorded(tmp_path):
    from nativeq.compile._tvm import meta_schedule

    db = tmp_path / "db"
    db.mkdir()
    meta_schedule.database.JSONDatabase(work_dir=str(db))  # an empty database: creates both files
    onnx_path = tmp_path / "m.onnx"
    onnx.save(qdq_models.qdq_matmul(k=16, n=8), onnx_path)
    result = compile_model(onnx_path, tmp_path / "out", CompileConfig(target="host", tuning_log=str(db)))
    assert result.manifest["tuning"]["database"] == str(db)
    assert set(result.manifest["tuning"]["files"]) == {"database_workload.json", "database_tuning_record.json"}
    pipeline = result.manifest["build"]["pipeline"]
    assert any("TuningDatabase" in name or "ApplyDatabase" in name for name in pipeline)
    assert "TuningDatabase" not in " ".join(
        compile_model(onnx_path, tmp_path / "untuned", CompileConfig(target="host", tuning_log=str(db), use_tuning=False))
        .manifest["build"]["pipeline"]
    )
    assert verify_artifact(result.out_dir, onnx_path, VerifyConfig(dims={"T": 9})).passed


def test_cli_compile_explain_and_verify(nativeq_cli, tmp_path):
    onnx.save(qdq_models.qdq_matmul(k=32, n=16), tmp_path / "m.onnx")
    res = nativeq_cli("compile", "m.onnx", "--target", "host", "-o", "out", "--explain")
    assert res.returncode == 0, res.stderr
    assert "compiled m.onnx for host" in res.stdout
    assert "int8 sites: 1 int8, 0 float" in res.stdout
    assert "matmul" in res.stdout and "reason" in res.stdout  # the --explain table
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["int8_report"] == {"int8": 1, "float": 0}
    res = nativeq_cli("verify", "out", "--onnx", "m.onnx", "--dim", "T=17", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["passed"] and report["dims"] == {"T": 17}
    assert report["outputs"][0]["shape"] == [1, 17, 16]


def test_verify_fails_with_exit_1_against_another_model(nativeq_cli, tmp_path, matmul_artifact):
    _, artifact = matmul_artifact
    onnx.save(qdq_models.qdq_matmul(seed=7), tmp_path / "other.onnx")  # same I/O, other weights
    res = nativeq_cli("verify", artifact, "--onnx", "other.onnx")
    assert res.returncode == 1
    assert "FAIL" in res.stdout and "not byte-identical" in res.stdout
    assert res.stderr.startswith("error: 1 of 1 outputs differ from ONNX Runtime beyond tolerance (y: max ")
    assert "Traceback" not in res.stderr


def test_verify_reports_ort_optimized_reference(matmul_artifact):
    onnx_path, artifact = matmul_artifact
    report = verify_artifact(artifact, onnx_path, VerifyConfig(ort_opt="all", dims={"T": 20}))
    assert report.ort_opt == "all" and "graph optimizations: all" in report.table()
    assert report.outputs[0].max_steps is not None


def test_host_uses_the_database_of_the_target_it_was_detected_as(tmp_path, monkeypatch):
    from nativeq._data import shipped_tuning_logs
    from nativeq.compile.api import DATABASE_FILES, CompileConfig, tuning_database
    from nativeq.targets import get_target

    host = get_target("host")
    base = host.source.partition(":")[2]
    assert base, host.source
    monkeypatch.chdir(tmp_path)
    shipped = shipped_tuning_logs() / base
    assert tuning_database(CompileConfig(target="host"), host) == (shipped if shipped.is_dir() else None)
    (tmp_path / "tuning_logs" / base).mkdir(parents=True)
    for name in DATABASE_FILES:
        (tmp_path / "tuning_logs" / base / name).write_text("")
    assert tuning_database(CompileConfig(target="host"), host) == Path("tuning_logs") / base
    assert tuning_database(CompileConfig(target="host", use_tuning=False), host) is None


def test_constant_pad_imports_as_relax_pad_and_matches_onnxruntime(tmp_path):
    """ONNX Pad (constant mode, pads as an initializer) becomes `R.nn.pad`, which the int8 and layout passes
    read through (TVM's own converter emits an opaque TE call); reflect mode keeps TVM's converter."""
    from nativeq.compile.api import import_model
    from nativeq.verify import VerifyConfig, verify_artifact

    for mode, op in (("constant", "R.nn.pad"), ("reflect", "R.call_tir")):
        pads = numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 3], np.int64), "pads")
        value = numpy_helper.from_array(np.array(0.5, np.float32), "value")
        node = helper.make_node("Pad", ["x", "pads"] + (["value"] if mode == "constant" else []), ["y"], mode=mode)
        graph = helper.make_graph([node], "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "T_out"])],
                                  [pads, value])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        path = tmp_path / f"{mode}.onnx"
        onnx.save(model, path)
        assert op in import_model(model, path)["main"].script(), mode
        compile_model(path, tmp_path / mode, CompileConfig(target="host", use_tuning=False))
        report = verify_artifact(tmp_path / mode, path, VerifyConfig(dims={"T": 9}))
        assert report.passed and report.outputs[0].max_abs == 0, report.table()
