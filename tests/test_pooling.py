"""Pooling between quantized convs (a CNN stem: conv -> MaxPool -> conv, as ResNet-style speaker and audio-tagging
models have it): a max pool runs on the 8-bit tensor (`FoldDequantizeQuantize`: max commutes with dequantize), max
and average pools run channels-last between the int8 convs (`channels_last.py`), and the window reductions and the
next conv's im2col copy are vectorized over the channels.

Numbers: compiled for `host` and compared with ONNX Runtime (a max pool: 0 steps; an average pool, which ORT
computes in float between its QDQ pair too: `verify`'s tolerance). Structure: no transpose kernel but the input's
and the output's, the max pool's kernel reads 8-bit integers, and its window loop and the im2col copy run
16-lane vectors.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import qdq_models
from kernel_rules import scheduled

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import s_tir, tirx
from nativeq.compile.tir_rewrite import rewrite_stmt
from nativeq.verify import VerifyConfig, verify_artifact

CASES = {
    "max2d-k2-s2": (dict(pool="MaxPool", ndim=2, kernel=2, stride=2), {"T": 30}),
    "max2d-k3-s2-pad1": (dict(pool="MaxPool", ndim=2, kernel=3, stride=2, pads=1), {"T": 31}),
    "max2d-k3-s2-ceil": (dict(pool="MaxPool", ndim=2, kernel=3, stride=2, ceil_mode=1, spatial=("T", 21)), {"T": 24}),
    "max1d-k3-s2-pad1-s8": (dict(pool="MaxPool", ndim=1, kernel=3, stride=2, pads=1, act_dtype="int8"), {"T": 37}),
    "avg2d-k2-s2": (dict(pool="AveragePool", ndim=2, kernel=2, stride=2), {"T": 30}),
    "avg1d-k3-s1-pad1": (dict(pool="AveragePool", ndim=1, kernel=3, stride=1, pads=1, c=32), {"T": 29}),
}


def _kernels(mod, name: str) -> list:
    """The PrimFuncs of `mod` whose name holds `name`."""
    return [func for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc) and name in gvar.name_hint]


def _statements(func, kind) -> list:
    """Every statement of type `kind` in a PrimFunc."""
    found = []
    rewrite_stmt(func.body, lambda stmt: found.append(stmt) or stmt if isinstance(stmt, kind) else stmt)
    return found


def _vector_lanes(func) -> list[int]:
    """Extents of the vectorized loops of a scheduled PrimFunc."""
    return [int(loop.extent) for loop in _statements(func, tirx.For)
            if loop.kind == tirx.ForKind.VECTORIZED and isinstance(loop.extent, tirx.IntImm)]


@pytest.mark.parametrize("case", list(CASES))
def test_pool_between_int8_convs_runs_channels_last_and_matches_onnxruntime(case, tmp_path):
    kwargs, dims = CASES[case]
    model = qdq_models.qdq_conv_pool(**kwargs)
    rules, mod = scheduled(model, tmp_path)
    assert sum("transpose" in name for name in rules) == 2, rules  # the input's and the output's, none around the pool
    pool = "pool_max" if kwargs["pool"] == "MaxPool" else "pool_sum"
    (kernel,) = [func for func in mod.functions.values() if isinstance(func, tirx.PrimFunc) and pool in str(func)]
    if pool == "pool_max":  # reads the 8-bit tensor
        blocks = [block for block in _statements(kernel, s_tir.SBlock) if block.name_hint.startswith(pool)]
        read_dtypes = {str(region.source.dtype) for block in blocks for region in block.reads}
        assert read_dtypes == {kwargs.get("act_dtype", "uint8")}, kernel
    assert 16 in _vector_lanes(kernel) or 32 in _vector_lanes(kernel), kernel
    path = tmp_path / "pool.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    assert report.passed, report.table()
    if pool == "pool_max":
        assert report.outputs[0].max_abs == 0.0, report.table()


@pytest.mark.parametrize("activation", ["LeakyRelu", "Max"])
def test_leaky_relu_and_max_stay_channels_last_and_match_onnxruntime(activation, tmp_path):
    """A conv's LeakyRelu (PLCMOS, AECMOS) or Keras' `maximum(x, 0.2 x)` (openWakeWord's embedding model) before a
    max pool: elementwise in the channels-last layout (a transpose to channels-first and back around it took 45%
    of PLCMOS's time), Max as `maximum` (not a stacked reduction kernel); ORT's result."""
    model = qdq_models.qdq_conv_pool(pool="MaxPool", activation=activation)
    rules, mod = scheduled(model, tmp_path)
    assert sum("transpose" in name for name in rules) == 2, rules  # the input's and the output's
    assert not [name for name in rules if "stack" in name], rules
    path = tmp_path / "pool.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 30}, runs=2))
    assert report.passed and report.outputs[0].max_steps == 0, report.table()


def test_a_conv_gathers_16_uint8_channels_as_one_vector(tmp_path):
    """A 3x3 conv over 16 uint8 channels: each tap's channels are one 128-bit copy (byte-by-byte copies were 3x
    slower on AVX-512, where 16 channels are a quarter of a register), gathered inside its matmul kernel."""
    from nativeq.compile.schedules.pack_weights import ROWS_PAD_BLOCK

    rules, mod = scheduled(qdq_models.qdq_conv_pool(pool="MaxPool"), tmp_path)
    assert not _kernels(mod, "im2col"), rules
    gathers = [loop for func in _kernels(mod, "int8_matmul_packed") for loop in _statements(func, tirx.For)
               if loop.kind == tirx.ForKind.VECTORIZED and _block_names(loop.body) == [ROWS_PAD_BLOCK]]
    assert gathers and all(int(loop.extent) == 16 for loop in gathers), gathers


def _block_names(stmt) -> list[str]:
    names = []
    rewrite_stmt(stmt, lambda s: names.append(s.name_hint) or s if isinstance(s, s_tir.SBlock) else s)
    return names


@pytest.mark.arm
def test_max_pool_between_int8_convs_on_the_pi_matches_onnxruntime(tmp_path):
    """The Pi 5 build (int8 activations, 128-bit NEON) of the padded 1-D max pool: ORT's result under qemu too."""
    import onnxruntime as ort

    from nativeq.runtime.emulate import run_emulated

    kwargs, dims = CASES["max1d-k3-s2-pad1-s8"]
    model = qdq_models.qdq_conv_pool(**kwargs)
    path = tmp_path / "pool.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "rpi5", CompileConfig(target="rpi5", use_tuning=False))
    x = np.random.default_rng(5).normal(0, 2, (1, 16, dims["T"])).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (got,) = run_emulated(tmp_path / "rpi5", {"x": x})
    np.testing.assert_array_equal(got, expected)


def test_a_pool_over_half_a_neon_register_of_channels_is_vectorized(tmp_path):
    """On the Pi (128-bit NEON) a max pool over 8 int8 channels still runs 8-lane vectors: the 128-bit floor that
    lets AVX-512 vectorize 16 uint8 channels does not raise the target's own half-vector threshold."""
    model = qdq_models.qdq_conv_pool(pool="MaxPool", ndim=1, c=8, kernel=3, stride=2, pads=1, act_dtype="int8")
    rules, mod = scheduled(model, tmp_path, target="rpi5")
    (kernel,) = [func for func in mod.functions.values() if isinstance(func, tirx.PrimFunc) and "pool_max" in str(func)]
    assert 8 in _vector_lanes(kernel), kernel
