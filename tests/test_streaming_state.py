"""Streaming models that carry state between calls: a cache input concatenated before the chunk, the new cache
sliced off its end (`x[..., -4:]`) as a second output. Compiled over a symbolic chunk length, compared with ORT."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.onnx_import import import_onnx
from nativeq.runtime import load

CHANNELS, KERNEL = 16, 5
INT64_MAX = 2**63 - 1


def _streaming_conv_model() -> onnx.ModelProto:
    """x [1, T, C], cache [1, C, K-1] -> y = depthwise conv k=K over concat(cache, xᵀ) [1, C, T], new_cache =
    concat(...)[:, :, -(K-1):] (torch's export: Slice starts -(K-1), ends INT64_MAX)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((CHANNELS, 1, KERNEL)).astype(np.float32)
    bias = rng.standard_normal(CHANNELS).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["cache", "xt"], ["full"], axis=2),
        helper.make_node("Conv", ["full", "w", "b"], ["y"], group=CHANNELS, kernel_shape=[KERNEL]),
        helper.make_node("Slice", ["full", "starts", "ends", "axes"], ["new_cache"]),
    ]
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
                    numpy_helper.from_array(np.array([-(KERNEL - 1)], np.int64), "starts"),
                    numpy_helper.from_array(np.array([INT64_MAX], np.int64), "ends"),
                    numpy_helper.from_array(np.array([2], np.int64), "axes")]
    graph = helper.make_graph(
        nodes, "streaming_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", CHANNELS]),
         helper.make_tensor_value_info("cache", TensorProto.FLOAT, [1, CHANNELS, KERNEL - 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, "T"]),
         helper.make_tensor_value_info("new_cache", TensorProto.FLOAT, [1, CHANNELS, KERNEL - 1])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_new_cache_has_a_static_shape():
    main = import_onnx(_streaming_conv_model())["main"]
    assert [int(d) for d in main.ret_ty.fields[1].shape.values] == [1, CHANNELS, KERNEL - 1]


def test_the_depthwise_kernel_argument_is_respelled_for_fusion():
    """Relax sizes the concat `4 + T`; the legalized transpose feeding the depthwise kernel spells it `T + 4`, the
    kernel (built before legalization) `4 + T`: one match_cast gives the argument the kernel's spelling."""
    from nativeq.compile._tvm import TVMTarget, tvm
    from nativeq.compile.pipeline import compile_passes
    from nativeq.targets import get_target

    target = get_target("host")
    mod = import_onnx(_streaming_conv_model())
    with TVMTarget(target.tvm_dict()), tvm.transform.PassContext(opt_level=3):
        for p in compile_passes(target):
            mod = p(mod)
            if p.info.name == "nativeq.KernelArgumentShapes":
                break
    assert p.cast == 1
    casts = [line for line in mod["main"].script().splitlines() if "R.match_cast" in line]
    assert len(casts) == 1 and re.search(r"R.Tensor\(\(1, 4 \+ T\w*, 16\)", casts[0]), casts


@pytest.mark.parametrize("target", ["host", pytest.param("rpi5", marks=pytest.mark.arm)])
def test_streaming_conv_with_a_cache_matches_onnxruntime(target, tmp_path):
    model = _streaming_conv_model()
    path = tmp_path / "streaming.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / target, CompileConfig(target=target, use_tuning=False))
    if target != "host":
        from nativeq.verify import VerifyConfig, verify_artifact

        report = verify_artifact(tmp_path / target, path, VerifyConfig(runs=1, dims={"T": 9}))
        assert report.passed, report.table()
        return
    compiled = load(tmp_path / target)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((1, CHANNELS, KERNEL - 1)).astype(np.float32)
    for t in (1, 7, 30):  # chunks in a row, each call fed the cache the previous one returned
        feeds = {"x": rng.standard_normal((1, t, CHANNELS)).astype(np.float32), "cache": cache}
        got, (y, new_cache) = compiled.run(feeds), session.run(None, feeds)
        np.testing.assert_allclose(got["y"], y, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["new_cache"], new_cache)
        cache = got["new_cache"]
