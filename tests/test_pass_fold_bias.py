"""FoldBiasIntoAccumulator: exact folds only (before/expected IR), and what rounding a float bias costs."""

import numpy as np
import onnxruntime as ort
import qdq_models as qm
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from nativeq.compile._tvm import from_onnx
from nativeq.compile.onnx_legalize import legalize
from nativeq.compile.passes.fold_bias_into_accumulator import FoldBiasIntoAccumulator
from nativeq.compile.passes.lower_qdq_to_integer import LowerQDQToInteger

RNG = np.random.default_rng(11)
W = RNG.integers(-127, 128, (24, 16, 3)).astype(np.int8)
SX = np.float32(0.05)
SW = RNG.uniform(0.002, 0.02, 24).astype(np.float32)
BIAS_SCALE = SX * SW  # the accumulator scale: QLinearConv's int32 bias lives on this grid
BIAS_I32 = RNG.integers(-2000, 2000, 24).astype(np.int32)


def bind(mod, **params):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


@I.ir_module
class Lowered:
    """LowerQDQToInteger's output for a u8 conv1d whose bias is DequantizeLinear(int32, sx*sw)."""

    @R.function
    def main(xq: R.Tensor((1, 16, 40), "uint8"), w: R.Tensor((24, 16, 3), "int8"), corr: R.Tensor((1, 24, 1), "int32"),
             scale: R.Tensor((1, 24, 1), "float32"), b: R.Tensor((24,), "int32"), bs: R.Tensor((24,), "float32")):
        with R.dataflow():
            acc = R.nn.conv1d(xq, w, padding=[0, 0], out_dtype="int32")
            acc_c = R.subtract(acc, corr)
            acc_f = R.astype(acc_c, "float32")
            y = R.multiply(acc_f, scale)
            bf = R.dequantize(b, bs, R.const(0, "int32"), axis=0, out_dtype="float32")
            b3 = R.reshape(bf, R.shape([1, 24, 1]))
            z = R.add(y, b3)
            R.output(z)
        return z


@I.ir_module
class Folded:
    @R.function
    def main(xq: R.Tensor((1, 16, 40), "uint8"), w: R.Tensor((24, 16, 3), "int8"), corr: R.Tensor((1, 24, 1), "int32"),
             scale: R.Tensor((1, 24, 1), "float32")):
        with R.dataflow():
            acc = R.nn.conv1d(xq, w, padding=[0, 0], out_dtype="int32")
            acc_c = R.subtract(acc, corr)
            acc_f = R.astype(acc_c, "float32")
            z = R.multiply(acc_f, scale)
            R.output(z)
        return z


CORR = (128 * W.astype(np.int64).sum(axis=(1, 2))).astype(np.int32).reshape(1, 24, 1)


def test_integer_bias_is_folded_into_the_correction_term():
    before = bind(Lowered, w=W, corr=CORR, scale=BIAS_SCALE.reshape(1, 24, 1), b=BIAS_I32, bs=BIAS_SCALE)
    expected = bind(Folded, w=W, corr=CORR - BIAS_I32.reshape(1, 24, 1), scale=BIAS_SCALE.reshape(1, 24, 1))
    tvm.ir.assert_structural_equal(FoldBiasIntoAccumulator()(before), expected)


def test_bias_off_the_accumulator_grid_stays_a_float_add():
    before = bind(Lowered, w=W, corr=CORR, scale=BIAS_SCALE.reshape(1, 24, 1), b=BIAS_I32, bs=BIAS_SCALE * 1.37)
    tvm.ir.assert_structural_equal(FoldBiasIntoAccumulator()(before), before)
    rounded = bind(Folded, w=W, scale=BIAS_SCALE.reshape(1, 24, 1),
                   corr=CORR - np.rint(BIAS_I32 * 1.37).astype(np.int32).reshape(1, 24, 1))
    tvm.ir.assert_structural_equal(FoldBiasIntoAccumulator(require_exact=False)(before), rounded)


def _run(model, passes, x):
    mod = from_onnx(legalize(model), keep_params_in_input=False)
    mod = tvm.transform.Sequential(passes)(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return mod, vm["main"](tvm.runtime.tensor(x)).numpy()


def _ort(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_qlinearconv_bias_folds_and_stays_exact():
    model = qm.qlinear_conv(spatial=(40,))
    x = RNG.normal(0, 2.0, (1, 16, 40)).astype(np.float32)
    mod, got = _run(model, [LowerQDQToInteger("uint8"), FoldBiasIntoAccumulator()], x)
    assert "R.add" not in mod.script()
    np.testing.assert_array_equal(got, _ort(model, x))


def test_rounding_a_float_bias_costs_exactness_but_stays_within_one_step():
    model = qm.qdq_conv1d(t=200, act_dtype="int8")
    x = RNG.normal(0, 2.0, (1, 32, 200)).astype(np.float32)
    want = _ort(model, x)
    mod, exact_fold = _run(model, [LowerQDQToInteger("uint8"), FoldBiasIntoAccumulator()], x)
    assert "R.add" in mod.script()  # random float bias: not on the grid, not folded
    _, rounded_fold = _run(model, [LowerQDQToInteger("uint8"), FoldBiasIntoAccumulator(require_exact=False)], x)
    np.testing.assert_array_equal(exact_fold, want)
    steps = np.abs(rounded_fold - want) / 0.1
    assert steps.max() <= 1.0 + 1e-3
    assert 0.99 < np.mean(steps < 1e-3) < 1.0
