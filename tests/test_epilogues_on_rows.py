"""EpiloguesOnRows: a 2-D conv's requantize (and residual add) runs on its GEMM's rows, before the reshape to
[N, H, W, C], so FuseOps puts it in the int8 matmul kernel (a 1-D conv's rows are its positions already).

Structure: before/expected Relax; after the whole pipeline, a 2-D conv's matmul kernel holds its requantize and
no kernel reads its int32 sums back. Numbers: compiled for `host`, ONNX Runtime's result exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import qdq_models
from kernel_rules import schedule_rules

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.schedules.epilogues_on_rows import EpiloguesOnRows
from nativeq.verify import VerifyConfig, verify_artifact
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

_BIAS = np.arange(16, dtype=np.int32).reshape(1, 1, 1, 16)
_SCALE = np.linspace(0.01, 0.02, 16, dtype=np.float32)


def test_requantize_and_residual_add_move_before_the_reshape():
    @I.ir_module
    class Before:
        @R.function
        def main(cols: R.Tensor((1, 12, 8), "uint8"), w: R.Tensor((8, 16), "int8"),
                 skip: R.Tensor((1, 3, 4, 16), "float32")):
            with R.dataflow():
                acc = R.matmul(cols, w, out_dtype="int32")
                y = R.reshape(acc, R.shape([1, 3, 4, 16]))
                a = R.astype(R.subtract(y, R.const(_BIAS)), "float32")
                s = R.multiply(a, R.const(_SCALE))
                q = R.quantize(s, R.const(0.1, "float32"), R.const(3, "uint8"), axis=3, out_dtype="uint8")
                d = R.add(R.dequantize(q, R.const(0.1, "float32"), R.const(3, "uint8"), axis=3), skip)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(cols: R.Tensor((1, 12, 8), "uint8"), w: R.Tensor((8, 16), "int8"),
                 skip: R.Tensor((1, 3, 4, 16), "float32")):
            with R.dataflow():
                acc = R.matmul(cols, w, out_dtype="int32")
                a = R.astype(R.subtract(acc, R.const(_BIAS.reshape(1, 1, 16))), "float32")
                s = R.multiply(a, R.const(_SCALE.reshape(1, 1, 16)))
                q = R.quantize(s, R.const(0.1, "float32"), R.const(3, "uint8"), axis=2, out_dtype="uint8")
                d = R.add(R.dequantize(q, R.const(0.1, "float32"), R.const(3, "uint8"), axis=2),
                          R.reshape(skip, R.shape([1, 12, 16])))
                r = R.reshape(d, R.shape([1, 3, 4, 16]))
                R.output(r)
            return r

    after = relax.transform.Normalize()(EpiloguesOnRows()(Before))
    tvm.ir.assert_structural_equal(after, relax.transform.Normalize()(Expected))


def test_a_constant_varying_along_a_spatial_axis_stops_the_move():
    @I.ir_module
    class Before:
        @R.function
        def main(acc: R.Tensor((1, 12, 16), "int32")):
            with R.dataflow():
                y = R.reshape(acc, R.shape([1, 3, 4, 16]))
                z = R.subtract(y, R.const(np.ones((1, 3, 1, 16), np.int32)))
                R.output(z)
            return z

    after = EpiloguesOnRows()(Before)
    tvm.ir.assert_structural_equal(after, Before)


def test_a_broadcast_gate_with_rows_of_its_own_leaves_the_full_tensor_unmoved():
    """A squeeze-excite gate (MobileNetV3: a 1x1 conv on the pooled [N, 1, 1, C], HardSigmoid as elementwise ops)
    has rows [N, 1, C] of its own; multiplying the full [N, H, W, C] activation by it must not reshape that
    activation to the gate's rows (an invalid reshape: the compile failed), it stays where it is."""

    @I.ir_module
    class Before:
        @R.function
        def main(acc: R.Tensor((1, 1, 16), "int32"), x: R.Tensor((1, 3, 4, 16), "float32")):
            with R.dataflow():
                g = R.reshape(acc, R.shape([1, 1, 1, 16]))
                gate = R.astype(g, "float32")
                y = R.multiply(x, gate)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(acc: R.Tensor((1, 1, 16), "int32"), x: R.Tensor((1, 3, 4, 16), "float32")):
            with R.dataflow():
                rows = R.astype(acc, "float32")
                gate = R.reshape(rows, R.shape([1, 1, 1, 16]))
                y = R.multiply(x, gate)
                R.output(y)
            return y

    after = relax.transform.Normalize()(EpiloguesOnRows()(Before))
    tvm.ir.assert_structural_equal(after, relax.transform.Normalize()(Expected))


CASES = {
    "conv2d-3x3-stride1-relu": (lambda: qdq_models.qdq_conv2d(c_in=16, c_out=32, h="T", w=12, stride=1,
                                                              act_dtype="uint8"), {"T": 23}),
    "conv2d-3x3-stride2-s8": (lambda: qdq_models.qdq_conv2d(c_in=8, c_out=16, stride=2, act_dtype="int8"), {}),
    "separable2d-residual": (lambda: qdq_models.qdq_separable_block(2, channels=32, kernel=3, spatial=(25, 5)), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_2d_conv_requantizes_in_its_matmul_kernel(case, tmp_path):
    builder, dims = CASES[case]
    model = builder()
    rules = schedule_rules(model, tmp_path)
    matmuls = [name for name, rule in rules.items() if rule == "int8-matmul"]
    # the int32 sums are converted (and requantized) in the matmul kernel: no other kernel reads them back
    assert matmuls and all("_subtract" in name and "_cast" in name for name in matmuls), rules
    assert not any("subtract" in name.split("_cast")[0] for name, rule in rules.items()
                   if rule not in ("int8-matmul", "depthwise")), rules
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    assert report.passed and report.outputs[0].max_steps <= 1 + 1e-4, report.table()
