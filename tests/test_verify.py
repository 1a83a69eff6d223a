"""nativeq verify: step counting, tolerances, random inputs that exercise quantizers, multi-output models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.errors import VerificationFailed
from nativeq.runtime.manifest import TensorSpec
from nativeq.verify import DEFAULT_DIM, VerifyConfig, verify_artifact
from nativeq.verify.inputs import quantizer_ranges, random_inputs
from nativeq.verify.report import OutputComparison, accumulate


def _compare(got, ref, quant=None, tol_steps=1.0, rtol=1e-3):
    comp = OutputComparison(name="y", dtype=str(ref.dtype))
    accumulate(comp, got, ref, quant, tol_steps, rtol)
    return comp


def test_per_channel_steps_use_each_channels_scale():
    ref = np.zeros((1, 3, 4), np.float32)
    got = ref.copy()
    got[0, 2, 1] = 0.3  # one step of channel 2 (scale 0.3), 3 steps of channel 0's scale
    quant = {"scale": [0.1, 0.2, 0.3], "zero_point": [0, 0, 0], "dtype": "int8", "axis": 1}
    comp = _compare(got, ref, quant)
    assert comp.passed and comp.max_steps == pytest.approx(1.0)
    assert comp.exact_pct == pytest.approx(100 * 11 / 12)
    assert comp.max_abs == pytest.approx(0.3) and comp.mean_abs == pytest.approx(0.3 / 12)
    assert not _compare(got, ref, quant, tol_steps=0.5).passed
    got[0, 0, 0] = 0.2  # two steps of channel 0
    assert not _compare(got, ref, quant).passed


def test_integer_outputs_count_integer_steps():
    ref = np.array([[-128, 0, 5, 127]], np.int8)
    comp = _compare(np.array([[-128, 1, 5, 127]], np.int8), ref)
    assert comp.quantized and comp.max_steps == 1 and comp.exact_pct == 75.0 and comp.passed
    assert not _compare(np.array([[-126, 0, 5, 127]], np.int8), ref).passed


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_wide_integer_and_boolean_outputs_must_be_exact(dtype):
    """Token ids from an ArgMax, lengths, masks: not quantized values, so one off is wrong, not a step."""
    ref = np.array([[3, 0, 1, 1]], dtype)
    assert _compare(ref.copy(), ref).passed
    comp = _compare(np.array([[3, 1, 1, 1]], dtype), ref)
    assert comp.quantized and comp.tolerance == "exact" and comp.exact_pct == 75.0 and not comp.passed
    assert not _compare(np.array([[3, 1, 1, 1]], dtype), ref, tol_steps=2.0).passed


def test_plain_float_outputs_use_relative_tolerance():
    ref = np.linspace(-10, 10, 50, dtype=np.float32)
    assert _compare(ref + 0.009, ref).passed  # 0.009 <= 1e-3 * 10
    comp = _compare(ref + 0.011, ref)
    assert not comp.passed and comp.max_steps is None and "rtol 0.001" in comp.tolerance
    assert _compare(ref + 0.011, ref, rtol=2e-3).passed


def test_nan_and_shape_mismatch_fail():
    ref = np.ones(4, np.float32)
    bad = ref.copy()
    bad[2] = np.nan
    comp = _compare(bad, ref)
    assert not comp.passed and "1 non-finite" in comp.problem
    comp = _compare(np.ones(5, np.float32), ref)
    assert not comp.passed and "shape (5,) vs reference (4,)" in comp.problem


def _quantizer_model(qtype=TensorProto.UINT8, zp=128, scale=0.05):
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("QuantizeLinear", ["x_id", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        helper.make_node("Relu", ["f"], ["g"]),
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
    ]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, helper.tensor_dtype_to_np_dtype(qtype)), "z")]
    graph = helper.make_graph(
        nodes, "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 8]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 8]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("ids_f", TensorProto.FLOAT, ["T"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_random_inputs_exercise_the_quantizer_and_respect_dims():
    model = _quantizer_model()
    low, high = quantizer_ranges(model)["x"]
    assert low < -128 * 0.05 and high > 127 * 0.05  # the full uint8 range, zp 128, plus saturation
    specs = [TensorSpec("x", "float32", (1, "T", 8)), TensorSpec("f", "float32", (3,)), TensorSpec("ids", "int64", ("T",))]
    inputs = random_inputs(specs, model, {"T": 500}, seed=0)
    assert inputs["x"].shape == (1, 500, 8) and inputs["x"].dtype == np.float32
    q = np.clip(np.rint(inputs["x"] / 0.05) + 128, 0, 255)
    assert q.min() == 0 and q.max() == 255 and len(np.unique(q)) == 256  # every level, both saturations
    assert inputs["ids"].dtype == np.int64 and 0 <= inputs["ids"].min() and inputs["ids"].max() < 16
    assert random_inputs(specs, model, {}, seed=0)["x"].shape == (1, DEFAULT_DIM, 8)
    again = random_inputs(specs, model, {"T": 500}, seed=0)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)


def _multi_output_model(t="T"):
    """x -> Q/DQ -> MatMul(DQ(W)) -> Q -> outputs: y (float via DQ), yq (int8), z (plain float Relu)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    wscale = (rng.uniform(0.001, 0.01, 8)).astype(np.float32)
    f32 = lambda v, n: numpy_helper.from_array(np.asarray(v, np.float32), n)  # noqa: E731
    i8 = lambda v, n: numpy_helper.from_array(np.asarray(v, np.int8), n)  # noqa: E731
    inits = [f32(0.05, "xs"), i8(0, "xz"), i8(w, "w"), f32(wscale, "ws"), i8(np.zeros(8), "wz"), f32(0.08, "ys"), i8(0, "yz")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["mm"]),
        helper.make_node("QuantizeLinear", ["mm", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
        helper.make_node("Relu", ["mm"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "multi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, 8]),
         helper.make_tensor_value_info("yq", TensorProto.INT8, [1, t, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, t, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_multi_output_model_with_integer_and_float_outputs(tmp_path):
    from nativeq.compile import CompileConfig, compile_model

    import nativeq

    onnx.save(_multi_output_model(), tmp_path / "multi.onnx")
    result = compile_model(tmp_path / "multi.onnx", tmp_path / "out", CompileConfig(target="host"))
    outputs = result.manifest["outputs"]
    assert [(o["name"], o["dtype"], "quant" in o) for o in outputs] == [
        ("y", "float32", True), ("yq", "int8", False), ("z", "float32", False)]
    model = nativeq.load(tmp_path / "out")
    got = model(x=np.zeros((1, 5, 16), np.float32))
    assert list(got) == ["y", "yq", "z"] and got["yq"].dtype == np.int8 and got["z"].shape == (1, 5, 8)

    report = verify_artifact(tmp_path / "out", tmp_path / "multi.onnx", VerifyConfig(runs=2, dims={"T": 30}))
    assert report.passed, report.table()
    y, yq, z = report.outputs
    assert y.quantized and y.quant_dtype == "int8" and y.max_steps <= 1
    assert yq.quantized and yq.max_steps <= 1 and yq.exact_pct >= 99
    assert not z.quantized and z.max_steps is None and z.tolerance.startswith("rtol")
    data = json.loads(report.to_json())
    assert data["passed"] and data["runs"] == 2 and [o["name"] for o in data["outputs"]] == ["y", "yq", "z"]
    table = report.table()
    assert table.splitlines()[-1] == "PASS" and "yq" in table

    report.raise_if_failed()  # passes: no exception


def test_failed_report_raises_with_one_line_per_output():
    from nativeq.verify.report import VerifyReport

    quant = {"scale": 0.1, "zero_point": 0, "dtype": "int8", "axis": None}
    y = _compare(np.array([0.0, 0.3], np.float32), np.zeros(2, np.float32), quant)
    z = _compare(np.array([1.0, 2.5], np.float32), np.array([1.0, 2.0], np.float32))
    report = VerifyReport("art", "m.onnx", "host", "native", "disable", 1, 0, {}, "random", [y, z])
    assert not report.passed and report.table().splitlines()[-1] == "FAIL: y, y beyond tolerance"
    with pytest.raises(VerificationFailed) as e:
        report.raise_if_failed()
    assert str(e.value) == ("2 of 2 outputs differ from ONNX Runtime beyond tolerance "
                            "(y: max 3 steps > 1 step; y: max |diff| 0.5 > rtol 0.001 (|diff| <= 0.002))")
    assert e.value.exit_code == 1


def test_npz_inputs_are_used_as_given(matmul_artifact, tmp_path):
    onnx_path, artifact = matmul_artifact
    x = np.random.default_rng(1).uniform(-8, 8, (1, 11, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    report = verify_artifact(artifact, onnx_path, VerifyConfig(inputs=str(tmp_path / "in.npz"), runs=5))
    assert report.passed and report.runs == 1 and report.outputs[0].shape == (1, 11, 48)
    assert report.inputs_from.endswith("in.npz")
    np.save(tmp_path / "x.npy", x)  # a one-input model also takes a plain .npy
    again = verify_artifact(artifact, onnx_path, VerifyConfig(inputs=str(tmp_path / "x.npy")))
    assert again.outputs[0].max_abs == report.outputs[0].max_abs and again.outputs[0].shape == (1, 11, 48)
