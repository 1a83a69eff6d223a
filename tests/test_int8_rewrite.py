"""LowerQDQToInteger: before/expected IR per pattern.

The "before" functions mirror what TVM 0.27's ONNX importer emits for QDQ models (see
`from_onnx(qdq_models.qdq_matmul())`); weights are function parameters bound as constants, as the
importer's initializers are. The expected integer form's constants (zero-point corrections,
combined scales) are computed here with numpy from the same weights.
"""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from nativeq.compile.passes.int8 import explain_sites, int8_passes
from nativeq.compile.passes.lower_qdq_to_integer import LowerQDQToInteger
from nativeq.targets.registry import get_target

RNG = np.random.default_rng(7)
W_MM = RNG.integers(-127, 128, (64, 48)).astype(np.int8)  # [K, N]
SW_CHANNEL = RNG.uniform(0.002, 0.02, 48).astype(np.float32)
SW_TENSOR = np.array(0.01, np.float32)
BIAS = RNG.normal(0, 0.1, 48).astype(np.float32)
SX = np.float32(0.05)


def bind(mod, **params):
    """Bind numpy arrays to `main`'s parameters of the same name (they become Relax constants)."""
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def lower(mod, activation_dtype):
    return LowerQDQToInteger(activation_dtype)(mod)


def test_matmul_per_tensor_keeps_int8_activations():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), sw: R.Tensor((), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), scale: R.Tensor((), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                acc = R.matmul(xq, w, out_dtype="int32")
                acc_f = R.astype(acc, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    after = lower(bind(Before, w=W_MM, sw=SW_TENSOR), activation_dtype="int8")
    # zx = 0 and no shift: no correction term at all.
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, scale=SX * SW_TENSOR))


def test_matmul_per_channel_uint8_activations_zero_point_correction():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), sw: R.Tensor((48,), "float32"),
                 wzp: R.Tensor((48,), "int8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, wzp, axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), corr: R.Tensor((48,), "int32"),
                 scale: R.Tensor((48,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                acc = R.matmul(xq, w, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    before = bind(Before, w=W_MM, sw=SW_CHANNEL, wzp=np.zeros(48, np.int8))
    corr = (128 * W_MM.astype(np.int64).sum(axis=0)).astype(np.int32)
    expected = bind(Expected, w=W_MM, corr=corr, scale=SX * SW_CHANNEL)
    tvm.ir.assert_structural_equal(lower(before, "uint8"), expected)


def test_matmul_bias_quantize_shifts_int8_to_uint8():
    """x86 form: the int8 activation's QuantizeLinear is re-emitted as uint8 with zero point +128."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), sw: R.Tensor((48,), "float32"),
                 b: R.Tensor((48,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=1, out_dtype="float32")
                mm = R.matmul(xf, wf)
                mb = R.add(mm, b)
                yq = R.quantize(mb, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                y = R.dequantize(yq, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 8, 64), "float32"), w: R.Tensor((64, 48), "int8"), corr: R.Tensor((48,), "int32"),
                 scale: R.Tensor((48,), "float32"), b: R.Tensor((48,), "float32")):
            with R.dataflow():
                xu = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                acc = R.matmul(xu, w, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                mm = R.multiply(acc_f, scale)
                mb = R.add(mm, b)
                yq = R.quantize(mb, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                y = R.dequantize(yq, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                R.output(y)
            return y

    corr = (128 * W_MM.astype(np.int64).sum(axis=0)).astype(np.int32)
    after = lower(bind(Before, w=W_MM, sw=SW_CHANNEL, b=BIAS), "uint8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, corr=corr, scale=SX * SW_CHANNEL, b=BIAS))


def test_shift_of_an_activation_not_produced_by_quantize():
    """ARM form: a uint8 graph input is shifted to int8 with an explicit integer add (-128)."""

    @I.ir_module
    class Before:
        @R.function
        def main(xq: R.Tensor((8, 64), "uint8"), w: R.Tensor((64, 48), "int8")):
            with R.dataflow():
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(130, "uint8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(xq: R.Tensor((8, 64), "uint8"), w: R.Tensor((64, 48), "int8"), corr: R.Tensor((48,), "int32"),
                 scale: R.Tensor((), "float32")):
            with R.dataflow():
                wide = R.astype(xq, "int32")
                moved = R.add(wide, R.const(-128, "int32"))
                xs = R.astype(moved, "int8")
                acc = R.matmul(xs, w, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    corr = (2 * W_MM.astype(np.int64).sum(axis=0)).astype(np.int32)  # zero point 130 - 128
    after = lower(bind(Before, w=W_MM), "int8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, corr=corr, scale=SX * np.float32(0.01)))


def test_gemm_transposed_weight_is_stored_in_natural_layout():
    w_nk = np.ascontiguousarray(W_MM.T)  # Gemm transB: the initializer is [N, K], per-channel along axis 0

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((48, 64), "int8"), sw: R.Tensor((48,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=0, out_dtype="float32")
                wt = R.permute_dims(wf, [1, 0])
                y = R.matmul(xf, wt)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8"), scale: R.Tensor((48,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                acc = R.matmul(xq, w, out_dtype="int32")
                acc_f = R.astype(acc, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    after = lower(bind(Before, w=w_nk, sw=SW_CHANNEL), "int8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, scale=SX * SW_CHANNEL))


def test_float_consumer_rescales_to_float_output():
    """No QuantizeLinear after the matmul: the function output is the float rescale itself."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(3, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(3, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                z = R.nn.softmax(y)
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8"), corr: R.Tensor((48,), "int32"),
                 scale: R.Tensor((), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(3, "int8"), axis=1, out_dtype="int8")
                acc = R.matmul(xq, w, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                y = R.multiply(acc_f, scale)
                z = R.nn.softmax(y)
                R.output(z)
            return z

    corr = (3 * W_MM.astype(np.int64).sum(axis=0)).astype(np.int32)
    after = lower(bind(Before, w=W_MM), None)
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, corr=corr, scale=SX * np.float32(0.01)))


W_CONV = RNG.integers(-127, 128, (48, 32, 3)).astype(np.int8)  # OIW
SW_CONV = RNG.uniform(0.002, 0.02, 48).astype(np.float32)


def test_conv1d_pads_with_the_shifted_zero_point():
    """Zero padding in float is the zero point in integers: pad explicitly, then convolve unpadded."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 32, 20), "float32"), w: R.Tensor((48, 32, 3), "int8"), sw: R.Tensor((48,), "float32"),
                 b: R.Tensor((48,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=0, out_dtype="float32")
                c = R.nn.conv1d(xf, wf, strides=[2], padding=[1, 1], dilation=[1], groups=1)
                b3 = R.reshape(b, R.shape([1, 48, 1]))
                cb = R.add(c, b3)
                R.output(cb)
            return cb

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 32, 20), "float32"), w: R.Tensor((48, 32, 3), "int8"),
                 corr: R.Tensor((1, 48, 1), "int32"), scale: R.Tensor((1, 48, 1), "float32"),
                 b: R.Tensor((48,), "float32")):
            with R.dataflow():
                xu = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                xp = R.nn.pad(xu, [0, 0, 0, 0, 1, 1], pad_value=128.0)
                acc = R.nn.conv1d(xp, w, strides=[2], padding=[0, 0], dilation=[1], groups=1, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                c = R.multiply(acc_f, scale)
                b3 = R.reshape(b, R.shape([1, 48, 1]))
                cb = R.add(c, b3)
                R.output(cb)
            return cb

    corr = (128 * W_CONV.astype(np.int64).sum(axis=(1, 2))).astype(np.int32).reshape(1, 48, 1)
    after = lower(bind(Before, w=W_CONV, sw=SW_CONV, b=BIAS), "uint8")
    expected = bind(Expected, w=W_CONV, corr=corr, scale=(SX * SW_CONV).reshape(1, 48, 1), b=BIAS)
    tvm.ir.assert_structural_equal(after, expected)


def test_depthwise_conv1d():
    w_dw = RNG.integers(-127, 128, (32, 1, 5)).astype(np.int8)
    sw = RNG.uniform(0.002, 0.02, 32).astype(np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 32, 20), "float32"), w: R.Tensor((32, 1, 5), "int8"), sw: R.Tensor((32,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=0, out_dtype="float32")
                c = R.nn.conv1d(xf, wf, padding=[2, 2], groups=32)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 32, 20), "float32"), w: R.Tensor((32, 1, 5), "int8"),
                 corr: R.Tensor((1, 32, 1), "int32"), scale: R.Tensor((1, 32, 1), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                xp = R.nn.pad(xq, [0, 0, 0, 0, 2, 2], pad_value=128.0)
                acc = R.nn.conv1d(xp, w, padding=[0, 0], groups=32, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                acc_f = R.astype(acc_c, "float32")
                c = R.multiply(acc_f, scale)
                R.output(c)
            return c

    corr = (128 * w_dw.astype(np.int64).sum(axis=(1, 2))).astype(np.int32).reshape(1, 32, 1)
    after = lower(bind(Before, w=w_dw, sw=sw), "uint8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=w_dw, corr=corr, scale=(SX * sw).reshape(1, 32, 1)))


def test_conv2d_relu_int8_activations_keep_padding():
    """ARM form with zx = 0: no shift, no correction, the conv keeps its own zero padding."""
    w2 = RNG.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    sw = RNG.uniform(0.002, 0.02, 16).astype(np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 20, 20), "float32"), w: R.Tensor((16, 8, 3, 3), "int8"),
                 sw: R.Tensor((16,), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, sw, R.const(0, "int8"), axis=0, out_dtype="float32")
                c = R.nn.conv2d(xf, wf, strides=[2, 2], padding=[1, 1, 1, 1])
                r = R.nn.relu(c)
                yq = R.quantize(r, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                R.output(yq)
            return yq

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 8, 20, 20), "float32"), w: R.Tensor((16, 8, 3, 3), "int8"),
                 scale: R.Tensor((1, 16, 1, 1), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                acc = R.nn.conv2d(xq, w, strides=[2, 2], padding=[1, 1, 1, 1], out_dtype="int32")
                acc_f = R.astype(acc, "float32")
                c = R.multiply(acc_f, scale)
                r = R.nn.relu(c)
                yq = R.quantize(r, R.const(0.1, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                R.output(yq)
            return yq

    after = lower(bind(Before, w=w2, sw=sw), "int8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=w2, scale=(SX * sw).reshape(1, 16, 1, 1)))


def test_uint8_weight_with_zero_point_becomes_centered_int8():
    w_u8 = (W_MM.astype(np.int16) + 128).astype(np.uint8)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "uint8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), R.const(128, "uint8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8"), scale: R.Tensor((), "float32")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                acc = R.matmul(xq, w, out_dtype="int32")
                acc_f = R.astype(acc, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    after = lower(bind(Before, w=w_u8), "int8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=W_MM, scale=SX * np.float32(0.01)))


@I.ir_module
class _FloatSites:
    @R.function
    def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8"), sw_k: R.Tensor((64,), "float32"),
             f: R.Tensor((48, 8), "float32")):
        with R.dataflow():
            xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
            xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
            w_rows = R.dequantize(w, sw_k, R.const(0, "int8"), axis=0, out_dtype="float32")
            per_k = R.matmul(xf, w_rows)  # scale varies along K: cannot be factored out of the sum
            x_rows = R.dequantize(xq, sw_k, R.const(0, "int8"), axis=1, out_dtype="float32")
            per_k_act = R.matmul(x_rows, w_rows)  # per-channel activation scale: along K again
            plain = R.matmul(per_k, f)  # float x float
            out = (per_k, per_k_act, plain)
            R.output(out)
        return out


def test_unmatched_sites_stay_float_and_are_explained():
    before = bind(_FloatSites, w=W_MM, sw_k=RNG.uniform(0.01, 0.02, 64).astype(np.float32),
                  f=RNG.normal(size=(48, 8)).astype(np.float32))
    tvm.ir.assert_structural_equal(lower(before, "uint8"), before)
    report = explain_sites(before, get_target("x86-avx512-vnni"))
    assert [(r["op"], r["status"]) for r in report] == [("matmul", "float")] * 3
    reasons = [r["reason"] for r in report]
    assert "reduction axis" in reasons[0]
    assert "not per-tensor" in reasons[1]
    assert "not a DequantizeLinear" in reasons[2]


@pytest.mark.parametrize("target_name, act", [("x86-avx512-vnni", "uint8"), ("x86-avx2", "uint8"), ("rpi4", "int8"),
                                              ("rpi5", "int8")])
def test_int8_passes_pick_activation_dtype_from_target_arch(target_name, act):
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((64, 48), "int8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    target = get_target(target_name)
    mod = bind(Before, w=W_MM)
    assert [r["status"] for r in explain_sites(mod, target)] == ["int8"]
    for p in int8_passes(target):
        mod = p(mod)
    (site,) = explain_sites(mod, target)
    assert site["status"] == "int8" and site["reason"].startswith(f"integer {act} x int8")


def test_matmulinteger_with_unfoldable_weight_zero_point_uses_activation_row_sums():
    """TVM's MatMulInteger form (int32 operands). W - zw leaves int8 (-127 - 3), so the weight stays
    as is and the zw * Σ_k x term is computed from the activation at run time."""
    zw = np.resize(np.array([3, -3, 1, 0], np.int8), 48)
    w = W_MM.copy()
    w[0, :] = -127

    @I.ir_module
    class Before:
        @R.function
        def main(xq: R.Tensor((8, 64), "uint8"), w: R.Tensor((64, 48), "int8"), wzp: R.Tensor((48,), "int8")):
            with R.dataflow():
                xi = R.astype(xq, "int32")
                xz = R.astype(R.const(130, "uint8"), "int32")
                xc = R.subtract(xi, xz)
                wi = R.astype(w, "int32")
                wz = R.astype(wzp, "int32")
                wz2 = R.expand_dims(wz, axis=[0])
                wc = R.subtract(wi, wz2)
                y = R.matmul(xc, wc, out_dtype="int32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(xq: R.Tensor((8, 64), "uint8"), w: R.Tensor((64, 48), "int8"), corr: R.Tensor((48,), "int32"),
                 zw: R.Tensor((48,), "int32")):
            with R.dataflow():
                wide = R.astype(xq, "int32")
                moved = R.add(wide, R.const(-128, "int32"))
                xs = R.astype(moved, "int8")
                acc = R.matmul(xs, w, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                xs32 = R.astype(xs, "int32")
                row_sums = R.sum(xs32, axis=[-1], keepdims=True)
                zw_rows = R.multiply(row_sums, zw)
                y = R.subtract(acc_c, zw_rows)
                R.output(y)
            return y

    corr = (2 * (w.astype(np.int64).sum(axis=0) - 64 * zw.astype(np.int64))).astype(np.int32)
    after = lower(bind(Before, w=w, wzp=zw), "int8")
    tvm.ir.assert_structural_equal(after, bind(Expected, w=w, corr=corr, zw=zw.astype(np.int32)))


def test_activation_times_activation_matmul_uses_runtime_sums():
    """Attention's Q·Kᵀ: both operands are dequantized activations. x86 form: lhs to uint8 (+128), rhs
    stays int8; acc - zb·Σ_k a - za·Σ_k (b - zb), here zb = 0 and za = 128 (the shift)."""

    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 24, 32), "float32"), k: R.Tensor((1, 24, 32), "float32")):
            with R.dataflow():
                qq = R.quantize(q, R.const(0.08, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                qf = R.dequantize(qq, R.const(0.08, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                kq = R.quantize(k, R.const(0.04, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                kf = R.dequantize(kq, R.const(0.04, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                kt = R.permute_dims(kf, [0, 2, 1])
                s = R.matmul(qf, kt)
                R.output(s)
            return s

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 24, 32), "float32"), k: R.Tensor((1, 24, 32), "float32")):
            with R.dataflow():
                kq = R.quantize(k, R.const(0.04, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                qu = R.quantize(q, R.const(0.08, "float32"), R.const(128, "uint8"), axis=1, out_dtype="uint8")
                kt = R.permute_dims(kq, [0, 2, 1])
                acc = R.matmul(qu, kt, out_dtype="int32")
                kt32 = R.astype(kt, "int32")
                col_sums = R.sum(kt32, axis=[-2], keepdims=True)
                za_cols = R.multiply(col_sums, R.const(128, "int32"))
                acc_c = R.subtract(acc, za_cols)
                acc_f = R.astype(acc_c, "float32")
                s = R.multiply(acc_f, R.const(np.float32(0.08) * np.float32(0.04), "float32"))
                R.output(s)
            return s

    tvm.ir.assert_structural_equal(lower(Before, "uint8"), Expected)
    (site,) = explain_sites(Before, get_target("x86-avx512-vnni"))
    assert site["status"] == "int8" and "activation x activation" in site["reason"]


def test_reduction_that_could_overflow_int32_stays_float():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 70000), "float32"), w: R.Tensor((70000, 2), "int8")):
            with R.dataflow():
                xq = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="int8")
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), R.const(0, "int8"), axis=1, out_dtype="float32")
                y = R.matmul(xf, wf)
                R.output(y)
            return y

    before = bind(Before, w=np.full((70000, 2), 127, np.int8))
    tvm.ir.assert_structural_equal(lower(before, "uint8"), before)
    (site,) = explain_sites(before, get_target("x86-avx2"))
    assert site["status"] == "float" and "overflow the int32 accumulator" in site["reason"]


def test_conv_weight_zero_point_outside_int8_uses_receptive_field_sums():
    """zw = 100 cannot be folded into int8 W: - zw * Σ(x over each receptive field), computed by a conv with
    a ones kernel, one output channel per group, repeated to the group's output channels."""
    w = RNG.integers(-127, 128, (4, 2, 3)).astype(np.int8)
    zw = np.array([100, -100, 5, 0], np.int8)

    @I.ir_module
    class Before:
        @R.function
        def main(xq: R.Tensor((1, 4, 10), "uint8"), w: R.Tensor((4, 2, 3), "int8"), zw: R.Tensor((4,), "int8")):
            with R.dataflow():
                xf = R.dequantize(xq, R.const(0.05, "float32"), R.const(3, "uint8"), axis=1, out_dtype="float32")
                wf = R.dequantize(w, R.const(0.01, "float32"), zw, axis=0, out_dtype="float32")
                y = R.nn.conv1d(xf, wf, padding=[1, 1], groups=2)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(xq: R.Tensor((1, 4, 10), "uint8"), w: R.Tensor((4, 2, 3), "int8"), ones: R.Tensor((2, 2, 3), "int8"),
                 corr: R.Tensor((1, 4, 1), "int32"), zw: R.Tensor((1, 4, 1), "int32"), scale: R.Tensor((), "float32")):
            with R.dataflow():
                xp = R.nn.pad(xq, [0, 0, 0, 0, 1, 1], pad_value=3.0)
                acc = R.nn.conv1d(xp, w, padding=[0, 0], groups=2, out_dtype="int32")
                acc_c = R.subtract(acc, corr)
                sums = R.nn.conv1d(xp, ones, padding=[0, 0], groups=2, out_dtype="int32")
                sums4 = R.repeat(sums, 2, axis=1)
                zw_sums = R.multiply(sums4, zw)
                acc_z = R.subtract(acc_c, zw_sums)
                acc_f = R.astype(acc_z, "float32")
                y = R.multiply(acc_f, scale)
                R.output(y)
            return y

    k = 2 * 3
    corr = 3 * (w.astype(np.int64).sum(axis=(1, 2)) - k * zw.astype(np.int64))
    expected = bind(Expected, w=w, ones=np.ones((2, 2, 3), np.int8), corr=corr.astype(np.int32).reshape(1, 4, 1),
                    zw=zw.astype(np.int32).reshape(1, 4, 1), scale=SX * np.float32(0.01))
    tvm.ir.assert_structural_equal(lower(bind(Before, w=w, zw=zw), None), expected)
