"""The int8 passes on a whole encoder quantized by ONNX Runtime's `quantize_static` (QDQ, per-channel
int8 weights): conv subsampling, attention blocks (projections, Q·Kᵀ, P·V, feed-forward) and the head."""

import numpy as np
import onnxruntime as ort
import pytest
import qdq_models as qm
import tvm
from test_pass_int8_numerics import contractions_fed_by_dequantize
from tvm import relax

from nativeq.compile.onnx_import import import_onnx
from nativeq.compile.passes.int8 import explain_sites, int8_passes
from nativeq.compile.passes.lower_qdq_to_integer import LowerQDQToInteger
from nativeq.compile.passes.qdq_sites import op_name
from nativeq.targets.registry import get_target

CONTRACTIONS = ("MatMul", "Gemm", "Conv", "QLinearMatMul", "QLinearConv", "QGemm")


@pytest.mark.parametrize("act_dtype, target_name, quant_format", [
    ("uint8", "x86-avx512-vnni", "qdq"), ("int8", "rpi4", "qdq"),
    ("uint8", "rpi5", "qoperator"), ("int8", "x86-avx2", "qoperator"),  # QLinearMatMul/QLinearConv/QGemm
])
def test_every_encoder_contraction_becomes_an_integer_kernel(act_dtype, target_name, quant_format):
    model = qm.ort_quantized_encoder(act_dtype, quant_format=quant_format)
    onnx_sites = sum(node.op_type in CONTRACTIONS for node in model.graph.node)
    target = get_target(target_name)
    mod = import_onnx(model)
    report = explain_sites(mod, target)
    assert len(report) == onnx_sites == 14
    assert [s for s in report if s["status"] != "int8"] == []
    assert sum("activation x activation" in s["reason"] for s in report) == 4  # Q·Kᵀ and P·V, two blocks
    lowered = tvm.transform.Sequential(int8_passes(target))(mod)
    assert contractions_fed_by_dequantize(lowered) == []
    after = explain_sites(lowered, target)
    kernel_act = "uint8" if target.arch == "x86_64" else "int8"
    assert len(after) == 14 and all(s["reason"].startswith(f"integer {kernel_act} x int8") for s in after)
    tvm.ir.assert_structural_equal(tvm.transform.Sequential(int8_passes(target))(lowered), lowered)  # idempotent
    # The int32 biases (conv subsampling, head Gemm; scale sx*sw) are folded into the accumulator.
    assert _bias_adds_after_integer_sites(lowered) == 0 < _bias_adds_after_integer_sites(
        LowerQDQToInteger(kernel_act)(mod))


def _bias_adds_after_integer_sites(mod) -> int:
    var2val = relax.analysis.get_var2val(mod["main"])
    adds = 0
    for value in var2val.values():
        if op_name(value) == "relax.add" and op_name(rescale := var2val.get(value.args[0])) == "relax.multiply":
            adds += op_name(var2val.get(rescale.args[0])) == "relax.astype"
    return adds


def _output_scale(model) -> float:
    """The scale of the DequantizeLinear producing the graph output (one quantization step)."""
    from onnx import numpy_helper

    (dq,) = [n for n in model.graph.node if n.output[0] == model.graph.output[0].name]
    assert dq.op_type == "DequantizeLinear"
    (scale,) = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name == dq.input[1]]
    return float(scale)


@pytest.mark.slow
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_encoder_matches_onnxruntime(act_dtype):
    model = qm.ort_quantized_encoder(act_dtype)
    lowered = tvm.transform.Sequential(int8_passes(get_target("x86-avx512-vnni")))(import_onnx(model))
    vm = relax.VirtualMachine(tvm.compile(lowered, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    step = _output_scale(model)
    for frames in (48, 100):
        x = np.random.default_rng(frames).normal(0, 1.0, (1, frames, qm.ENCODER_FEATS)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        want = session.run(None, {"feats": x})[0]
        steps = np.abs(got.astype(np.float64) - want) / step
        assert steps.max() <= 1.0 + 1e-3 and np.mean(steps < 1e-3) >= 0.995
