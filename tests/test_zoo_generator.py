"""The public-architecture model zoo generator (`benchmarks/zoo`): every entry builds, passes onnx.checker,
runs in ONNX Runtime (optimizations disabled and enabled) at two lengths where the time axis is
symbolic, and its quantized output stays near the float model's; the cache reuses files; bad names
are one-line errors. Compiling the zoo is `python -m benchmarks.zoo`'s job, not this file's."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import zoo  # noqa: E402
from benchmarks.zoo import run as zoo_run  # noqa: E402
from nativeq.errors import NativeqError  # noqa: E402
from nativeq.verify.bench import ort_session  # noqa: E402

FRAMES = (50, 123)  # two lengths of the time axis (S = 160 * frames for the waveform model)
# ORT's "all" level refuses nativeq's QAT export (a QuantizeLinear whose zero point type changes
# after propagation through Reshape, see nativeq.verify.bench.ort_session): "basic" is then used.
ORT_LEVELS = {"disabled": ("disabled",), "enabled": ("all", "basic")}
# Measured on every entry (seed 0, frames 50 and 123, both ORT levels): centered correlation >= 0.998,
# RMS error <= 0.086 of the float output's standard deviation, but for the Silero-VAD-style detector (0.985,
# 0.178: a sigmoid per frame after an LSTM, quantized at its input). The bounds leave room, not slack for garbage.
MIN_CORRELATION = 0.95
MAX_RELATIVE_RMS = 0.25


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


def _lengths(spec):
    return FRAMES if spec.symbolic_dims else (None,)


def _run(path, levels, spec, frames, seed=1):
    session, _ = ort_session(path, levels, threads=1)
    x = spec.random_input(frames or 0, np.random.default_rng(seed))
    return session.run(None, {spec.input_name: x})[0]


def _closeness(ref, got):
    """(correlation after removing each row's mean, RMS error / std of the reference)."""
    ref_c, got_c = ref - ref.mean(axis=-1, keepdims=True), got - got.mean(axis=-1, keepdims=True)
    corr = float(np.corrcoef(ref_c.ravel(), got_c.ravel())[0, 1])
    return corr, float(np.sqrt(np.mean((got - ref) ** 2)) / np.std(ref))


# ----------------------------------------------------------------------------- float models
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_float_model_builds_checks_and_runs_at_two_lengths(name, cache):
    spec = zoo.get_model(name)
    path = zoo.float_model(name, cache)
    assert path == cache / f"{name}.float.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == spec.input_name and tuple(dims) == spec.input_shape
    for level, levels in ORT_LEVELS.items():
        outputs = [_run(path, levels, spec, frames) for frames in _lengths(spec)]
        assert all(np.isfinite(o).all() for o in outputs), f"{name} ({level}): non-finite output"
        if spec.symbolic_dims and spec.output_axes:  # the output's time axis follows the input's
            assert outputs[0].shape[1] < outputs[1].shape[1], [o.shape for o in outputs]
        elif spec.symbolic_dims:  # one vector per input (an embedding), whatever its length
            assert outputs[0].shape == outputs[1].shape and not np.allclose(outputs[0], outputs[1]), outputs


# ----------------------------------------------------------------------------- quantized entries
def _weight_scales(model):
    """Scales of the DequantizeLinear nodes fed by an initializer (the weights)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits]


def _activation_zero_point_types(model):
    inits = {t.name: t for t in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def _check_structure(quantizer, model):
    ops = {n.op_type for n in model.graph.node}
    if quantizer.startswith("qdq_"):
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        expected = onnx.TensorProto.UINT8 if quantizer.startswith("qdq_u8") else onnx.TensorProto.INT8
        assert _activation_zero_point_types(model) == {expected}
        per_channel = [s.size > 1 for s in _weight_scales(model)]
        assert per_channel and any(per_channel) == quantizer.endswith("_pc")
    elif quantizer == "qoperator":
        assert any(op.startswith("QLinear") for op in ops), sorted(ops)
    elif quantizer == "dynamic":
        assert ops & {"DynamicQuantizeLinear", "DynamicQuantizeLSTM"}, sorted(ops)
    elif quantizer == "qat":  # `nativeq export`: opset 21, symbolic batch and time
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 21)}
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["B", "T", 80]


@pytest.mark.parametrize("name, quantizer", zoo.entries())
def test_quantized_entry_builds_runs_and_stays_close_to_float(name, quantizer, cache):
    spec = zoo.get_model(name)
    path = zoo.build(name, quantizer, cache)
    assert path == cache / f"{name}.{quantizer}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    _check_structure(quantizer, onnx.load(str(path)))
    float_path = zoo.float_model(name, cache)
    for level, levels in ORT_LEVELS.items():
        for frames in _lengths(spec):
            ref = _run(float_path, ("disabled",), spec, frames)
            got = _run(path, levels, spec, frames)
            assert got.shape == ref.shape
            corr, rel = _closeness(ref, got)
            assert corr > MIN_CORRELATION and rel < MAX_RELATIVE_RMS, (
                f"{name}.{quantizer} (ORT {level}, {frames} frames): correlation {corr:.3f}, relative RMS {rel:.3f}")


# ----------------------------------------------------------------------------- cache and determinism
def test_cache_reuses_files_and_regenerates_when_the_inputs_change(tmp_path):
    path = zoo.build("dscnn_kws", "qdq_u8_pc", tmp_path)
    stamp = path.stat().st_mtime_ns
    assert zoo.build("dscnn_kws", "qdq_u8_pc", tmp_path) == path and path.stat().st_mtime_ns == stamp
    float_stamp = (tmp_path / "dscnn_kws.float.onnx").stat().st_mtime_ns

    zoo.build("dscnn_kws", "qdq_u8_pc", tmp_path, seed=1)  # another seed: another model, same file name
    assert path.stat().st_mtime_ns != stamp
    assert (tmp_path / "dscnn_kws.float.onnx").stat().st_mtime_ns != float_stamp
    stamp = path.stat().st_mtime_ns
    zoo.build("dscnn_kws", "qdq_u8_pc", tmp_path, seed=1)
    assert path.stat().st_mtime_ns == stamp

    path.write_bytes(b"truncated")  # a damaged file is regenerated, not trusted
    zoo.build("dscnn_kws", "qdq_u8_pc", tmp_path, seed=1)
    onnx.checker.check_model(str(path), full_check=True)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_generation_is_deterministic(tmp_path):
    first = zoo.build("dscnn_kws", "qdq_s8_pc", tmp_path / "a").read_bytes()
    assert zoo.build("dscnn_kws", "qdq_s8_pc", tmp_path / "b").read_bytes() == first


# ----------------------------------------------------------------------------- names and the runner's helpers
@pytest.mark.parametrize("call, message", [
    (lambda d: zoo.build("resnet50", "qdq_u8_pc", d), "unknown zoo model 'resnet50'; choose one of transformer_postnorm"),
    (lambda d: zoo.float_model("resnet50", d), "unknown zoo model 'resnet50'"),
    (lambda d: zoo.build("conformer", "int3", d), "unknown zoo quantizer 'int3'; choose one of qdq_u8_pc"),
    (lambda d: zoo.build("dscnn_kws", "dynamic", d), "zoo model 'dscnn_kws' has no 'dynamic' variant; its quantizers:"),
    (lambda d: zoo.entries(models=["resnet50"]), "unknown zoo model 'resnet50'"),
])
def test_unknown_names_are_one_line_errors(call, message, tmp_path):
    with pytest.raises(NativeqError) as info:
        call(tmp_path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir()), "nothing is written for a bad name"


def test_matrix_is_explicit():
    pairs = zoo.entries()
    assert len(pairs) == len(set(pairs)) == sum(len(s.quantizers) for s in zoo.ZOO.values())
    # the default matrix has every quantizer but the quantize_static options, which are entries when asked for
    assert {q for _, q in pairs} == set(zoo.QUANTIZERS) - set(zoo.OPTION_QUANTIZERS)
    assert {q for _, q in zoo.entries(quantizers=zoo.OPTION_QUANTIZERS)} == set(zoo.OPTION_QUANTIZERS)
    assert zoo.entries(models=["dscnn_kws"], quantizers=["qoperator"]) == [("dscnn_kws", "qoperator")]
    assert ("shipped_conformer", "qat") in pairs and not [p for p in pairs if p[1] == "qat" and p[0] != "shipped_conformer"]


@pytest.mark.parametrize("manifest, expected", [
    ({}, "?"),
    ({"kernels": "not a list"}, "?"),
    ({"kernels": [{"kind": "matmul", "schedule": "generic"}, {"kind": "conv2d", "schedule": "generic"},
                  {"kind": "matmul", "schedule": "vnni"}, {"kind": "elementwise", "schedule": "generic"}, "junk"]}, "2"),
    ({"kernels": {"fused_dense": {"kind": "contraction", "schedule": "generic"}}}, "1"),
])
def test_generic_contraction_kernel_count_reads_the_manifest_defensively(manifest, expected):
    assert zoo_run.generic_contraction_kernels(manifest) == expected


def test_runner_table_records_errors_and_bad_options_exit_2(capsys):
    ok = zoo_run.EntryResult("conformer", "qdq_u8_pc", verify_x86="pass (max |diff| 0.001)", ratios={200: 0.8, 1000: 0.7},
                             compile_seconds=12.3)
    bad = zoo_run.EntryResult("lstm_am", "dynamic", errors=["compile host: no converter for DynamicQuantizeLSTM | x"])
    table = zoo_run.markdown_table([ok, bad], rpi5=False).splitlines()
    columns = [line.replace("\\|", "").count("|") for line in table]  # pipes inside cells are escaped
    assert len(table) == 4 and len(set(columns)) == 1
    assert "0.80x" in table[2] and "12.3" in table[2] and "DynamicQuantizeLSTM" in table[3]
    assert not ok.failed and bad.failed
    assert zoo_run.main(["--models", "resnet50", "--no-bench"]) == 2
    assert "unknown zoo model 'resnet50'" in capsys.readouterr().err
