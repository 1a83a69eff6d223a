"""ConvTransposeAsConv: transposed convolutions as stride-1 convolutions of their phases, checked against ONNX Runtime.

The pass (compile/passes/conv_transpose_as_conv.py) replaces TVM's dilated-input transposed convolution, which ran
on the generic path, by a convolution the int8 (or float) kernels take and an interleave of its phases.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qdq_models

import nativeq
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import TVMTarget, relax, tvm
from nativeq.compile.api import import_model
from nativeq.compile.passes.int8 import int8_passes
from nativeq.targets import get_target
from nativeq.verify import VerifyConfig, verify_artifact

CASES = {
    # name: (kernel, stride, pads, output_padding, spatial, run-time sizes)
    "1-D k16 s8 (a waveform decoder)": ((16,), (8,), (0, 0), (0,), ("T",), {"T": 23}),
    "1-D k5 s2 pads 2 output_padding 1": ((5,), (2,), (2, 2), (1,), ("T",), {"T": 17}),
    "1-D k3 s1 pads 1": ((3,), (1,), (1, 1), (0,), ("T",), {"T": 9}),
    "1-D k4 s4 asymmetric pads": ((4,), (4,), (1, 2), (0,), (13,), {}),
    "2-D k(3,4) s(2,2) pads 1": ((3, 4), (2, 2), (1, 1, 1, 1), (0, 0), (9, 7), {}),
    "2-D k2 s(2,3) symbolic height": ((2, 3), (2, 3), (0, 0, 0, 0), (0, 0), ("H", 6), {"H": 5}),
}


def _transposed_convs(model: onnx.ModelProto, tmp_path) -> int:
    """How many conv{1,2}d_transpose calls are left after the int8 passes."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    target = get_target("host")
    with TVMTarget(target.tvm_dict()):
        mod = tvm.transform.Sequential(int8_passes(target))(import_model(model, path))
    text = mod["main"].script()
    return text.count("R.nn.conv1d_transpose(") + text.count("R.nn.conv2d_transpose(")


def _run_both(model: onnx.ModelProto, sizes: dict, tmp_path, seed: int = 1):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    dims = [sizes.get(d.dim_param, d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).normal(0, 1, dims).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = nativeq.load(tmp_path / "art").run({"x": x})["y"]
    return expected, got


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("quantized", [True, False], ids=["qdq", "float"])
def test_transposed_convolution_matches_onnxruntime(name, quantized, tmp_path):
    """Every transposed convolution becomes a convolution (none left for TVM's dilated form); a QDQ one gives ORT's
    output but at rounding ties (exact int32 sums against ORT's float ones; verify localizes every difference to a
    tie), a float one within float32 rounding of the sums' order."""
    kernel, stride, pads, output_padding, spatial, sizes = CASES[name]
    model = qdq_models.conv_transpose(kernel=kernel, stride=stride, pads=pads, output_padding=output_padding,
                                      spatial=spatial, quantized=quantized)
    assert _transposed_convs(model, tmp_path) == 0
    expected, got = _run_both(model, sizes, tmp_path)
    assert got.shape == expected.shape
    if quantized:
        steps = np.abs(got - expected) / 0.1
        assert steps.max() <= 1.0001 and (steps > 0.5).mean() < 0.01, steps.max()
        report = verify_artifact(tmp_path / "art", tmp_path / "model.onnx", VerifyConfig(dims=sizes, accept_ties=True))
        assert report.passed, report.table()
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_int8_transposed_convolution_runs_as_an_int8_kernel(tmp_path):
    """The QDQ transposed convolution's weight stays int8: the convolution it becomes is an integer one."""
    model = qdq_models.conv_transpose(kernel=(16,), stride=(8,), pads=(0, 0), output_padding=(0,))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    target = get_target("host")
    with TVMTarget(target.tvm_dict()):
        mod = tvm.transform.Sequential(int8_passes(target))(import_model(model, path))
    convs = [v for v in relax.analysis.get_var2val(mod["main"]).values()
             if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.nn.conv1d"]
    assert [str(c.args[1].ty.dtype) for c in convs] == ["int8"], mod["main"].script()


def test_grouped_transposed_convolution_is_left_to_tvm(tmp_path):
    """Groups > 1: the pass leaves it (TVM's form), and the result still matches ORT."""
    model = qdq_models.conv_transpose(c_in=16, c_out=16, kernel=(4,), stride=(2,), pads=(1, 1), groups=4,
                                      quantized=False)
    assert _transposed_convs(model, tmp_path) == 1
    expected, got = _run_both(model, {"T": 11}, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, strides", [((4,), (2,)), ((5,), (2,)), ((16,), (8,)), ((3, 4), (2, 2)), ((2, 3), (2, 3))])
def test_polyphase_weight_is_phase_major(kernel, strides):
    """w'[(*r, o), c, *(m - 1 - j)] = w[c, o, *(j * s + r)] (0 past the kernel): the phases' output channels are
    phase-major, so a channels-last interleave reads one phase's channels as a contiguous run."""
    from itertools import product

    from nativeq.compile.passes.conv_transpose_as_conv import polyphase_weight

    channels_in, channels_out = 3, 5
    w = np.random.default_rng(0).normal(size=(channels_in, channels_out, *kernel)).astype(np.float32)
    taps = [-(-k // s) for k, s in zip(kernel, strides)]
    got = polyphase_weight(w, list(strides), taps, np.float32(0))
    assert got.shape == (int(np.prod(strides)) * channels_out, channels_in, *taps)
    for phase in product(*[range(s) for s in strides]):
        flat_phase = int(np.ravel_multi_index(phase, strides))
        for o, c in product(range(channels_out), range(channels_in)):
            for j in product(*[range(m) for m in taps]):
                k = [jj * s + r for jj, s, r in zip(j, strides, phase)]
                expected = w[(c, o, *k)] if all(kk < kk_max for kk, kk_max in zip(k, kernel)) else 0.0
                flipped = tuple(m - 1 - jj for m, jj in zip(taps, j))
                assert got[(flat_phase * channels_out + o, c, *flipped)] == expected
