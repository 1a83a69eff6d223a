"""Float islands legalized like ONNX Runtime (compile/passes/legalize_like_ort.py): bit-identical outputs.

The reference is the installed onnxruntime's CPU kernel itself, with graph optimizations off.
If an onnxruntime upgrade changes its LayerNorm arithmetic, these tests fail and say so.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.runtime import load


def layer_norm_model(shape, axis: int = -1, bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """One LayerNormalization over `shape` (str entries are symbolic dims), opset 21."""
    rng = np.random.default_rng(seed)
    norm_shape = [int(d) for d in shape[axis:]]
    inits = [numpy_helper.from_array(rng.normal(1.0, 0.3, norm_shape).astype(np.float32), "scale")]
    inputs = ["x", "scale"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0.0, 0.3, norm_shape).astype(np.float32), "bias"))
        inputs.append("bias")
    node = helper.make_node("LayerNormalization", inputs, ["y"], axis=axis, epsilon=1e-5)
    graph = helper.make_graph(
        [node], "layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def unary_model(op: str, shape, **attrs) -> onnx.ModelProto:
    """One `op` node from x to y of `shape` (str entries are symbolic dims), opset 21."""
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attrs)], op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def run_both(model, x, tmp_path, target="host"):
    path = tmp_path / "ln.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target=target, use_tuning=False))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = load(tmp_path / "art").run({"x": x})
    out = np.asarray(out["y"] if isinstance(out, dict) else out[0])
    return out, ref


def speech_like(shape, seed=1):
    """Activations with a non-zero mean and uneven spread, like a Conformer residual stream."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.3, 2.0, shape) * rng.uniform(0.2, 3.0, shape[-1:])).astype(np.float32)


@pytest.mark.parametrize(
    "shape, axis, t",
    [
        ((1, "T", 144), -1, 300),  # MLAS vector path, n a multiple of 8 (the Conformer's d_model)
        ((1, "T", 100), -1, 77),  # vector path with a scalar tail (100 = 12*8 + 4)
        ((2, "T", 4), -1, 50),  # n < 8: ORT's scalar Welford loop
        ((1, "T", 4, 10), -2, 60),  # two normalized axes, flattened row-major (n = 40)
    ],
    ids=["n144", "n100-tail", "n4-welford", "two-axes"],
)
def test_layer_norm_is_bit_identical_to_onnxruntime(shape, axis, t, tmp_path):
    x = speech_like(tuple(t if d == "T" else d for d in shape))
    out, ref = run_both(layer_norm_model(shape, axis), x, tmp_path)
    mismatched = int(np.sum(out != ref))
    assert mismatched == 0, f"{mismatched}/{out.size} elements differ from ORT (max {np.abs(out - ref).max():.3g})"


def test_layer_norm_without_bias_is_bit_identical(tmp_path):
    x = speech_like((1, 90, 64))
    out, ref = run_both(layer_norm_model((1, "T", 64), bias=False), x, tmp_path)
    np.testing.assert_array_equal(out, ref)


def test_layer_norm_large_mean_stays_accurate(tmp_path):
    """Centered variance: a row far from zero (mean 1e4, spread 1) keeps full precision, like ORT."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.normal(0, 1.0, (1, 40, 144))).astype(np.float32)
    out, ref = run_both(layer_norm_model((1, "T", 144)), x, tmp_path)
    np.testing.assert_array_equal(out, ref)
    exact = (x.astype(np.float64) - x.mean(-1, keepdims=True, dtype=np.float64)) / x.std(-1, keepdims=True, dtype=np.float64)
    scale = numpy_helper.to_array(layer_norm_model((1, "T", 144)).graph.initializer[0]).astype(np.float64)
    bias = numpy_helper.to_array(layer_norm_model((1, "T", 144)).graph.initializer[1]).astype(np.float64)
    assert np.abs(out - (exact * scale + bias)).max() < 1e-3


@pytest.mark.parametrize("n, schedule", [(144, "layer norm"), (100, "layer norm"), (4, "vectorized elementwise")])
def test_layer_norm_rows_get_the_row_schedule_with_the_float64_sum_in_vector_lanes(n, schedule, tmp_path):
    """n >= 8: `schedules/layer_norm.py` (the float64 sum in 8 vector lanes over whole chunks, the normalize and
    its epilogue vectorized along the row); rows of widely spread magnitudes (1e-6 .. 1e3: the float64 sum is
    still exact) stay bit-identical to ORT. n < 8 (Welford, unrolled: no reduction block) is elementwise."""
    path = tmp_path / "ln.onnx"
    onnx.save(layer_norm_model((1, "T", n)), path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    assert [k["schedule"] for k in result.kernels] == [schedule]
    rng = np.random.default_rng(n)
    x = (rng.normal(0, 1, (1, 64, n)) * 10.0 ** rng.integers(-6, 4, (1, 64, n))).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = load(tmp_path / "art").run({"x": x})
    np.testing.assert_array_equal(np.asarray(out["y"] if isinstance(out, dict) else out[0]), ref)


def test_layer_norm_schedule_sums_float64_lanes_with_the_chunks_outside():
    from nativeq.compile._tvm import relax as rx, te, tvm
    from nativeq.compile.passes.legalize_like_ort import _ort_layer_norm
    from nativeq.compile.schedules.layer_norm import schedule_layer_norm

    x = te.placeholder((1, 200, 144), "float32", name="x")
    gamma, beta = te.placeholder((144,), "float32", name="g"), te.placeholder((144,), "float32", name="b")
    func = te.create_prim_func([x, gamma, beta, _ort_layer_norm(x, gamma, beta, [-1], 1e-5)])
    text = schedule_layer_norm(func, vector_bits=128).mod["main"].script()
    lines = [line.strip() for line in text.splitlines()]
    chunks = lines.index("for ax1 in range(18):")  # 144 = 18 chunks of 8
    assert lines[chunks + 1] == "for ax0 in T.vectorized(8):"
    assert "ln_sum_lanes_update" in lines[chunks + 2] and "T.parallel(200)" in text
    assert "T.vectorized(16)" in text  # the normalize along the row: 16 floats per step


@pytest.mark.arm
def test_layer_norm_on_rpi5_under_qemu_is_bit_identical(tmp_path):
    from nativeq.verify import VerifyConfig, verify_artifact

    path = tmp_path / "ln.onnx"
    onnx.save(layer_norm_model((1, "T", 144)), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="rpi5", use_tuning=False))
    inputs = tmp_path / "x.npy"
    np.save(inputs, speech_like((1, 120, 144)))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(inputs=str(inputs), rtol=0.0))
    assert report.passed
    assert report.outputs[0].max_abs == 0.0


def test_sigmoid_is_bit_identical_to_onnxruntime(tmp_path):
    """MLAS's rational logistic, clamped input and output; from deep negative to deep positive values."""
    model = unary_model("Sigmoid", [1, "T", 96])
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 4, (1, 200, 96)), rng.uniform(-30, 30, (1, 50, 96))], axis=1).astype(np.float32)
    x[0, 0, :4] = [0.0, -0.0, 18.0, -18.0]
    out, ref = run_both(model, x, tmp_path)
    np.testing.assert_array_equal(out, ref)


def test_tanh_is_bit_identical_to_onnxruntime(tmp_path):
    """MLAS's rational tanh (clamped at +-9), which ORT's Tanh op and its LSTM/GRU/RNN gates share."""
    model = unary_model("Tanh", [1, "T", 72])
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.normal(0, 2, (1, 250, 72)), rng.uniform(-20, 20, (1, 40, 72))], axis=1).astype(np.float32)
    x[0, 0, :5] = [0.0, -0.0, 9.0, -9.5, 1e-7]
    out, ref = run_both(model, x, tmp_path)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("op", ["Sin", "Cos"])
@pytest.mark.parametrize("shape, t", [((1, "T", 72), 290), ((3, "T", 5), 7)], ids=["packets", "tail-of-3"])
def test_sin_cos_are_bit_identical_to_onnxruntime(op, shape, t, tmp_path):
    """Eigen's psincos_float (no FMA) on packets of 4, libm on the n % 4 tail, libm beyond the
    huge-argument thresholds; rotary position angles (position x frequency) and random values."""
    model = unary_model(op, list(shape))
    rng = np.random.default_rng(9)
    full = [d if d != "T" else t for d in shape]
    x = rng.uniform(-40, 40, full).astype(np.float32)
    flat = x.reshape(-1)
    angles = (np.arange(t)[:, None] * (10000.0 ** (-np.arange(0, 36, 2) / 36))[None, :]).astype(np.float32).reshape(-1)
    flat[: min(flat.size // 2, angles.size)] = angles[: min(flat.size // 2, angles.size)]
    flat[-12:] = [0.0, -0.0, 1e-8, -3.0e-3, np.pi / 4, -np.pi / 2, 3 * np.pi, 1000.5, -18837.0, 18838.0, 3.0e4, -5.0e5]
    out, ref = run_both(model, x, tmp_path)
    huge = np.abs(x) >= 18838.0  # Eigen's huge-argument reduction is not reproduced: libm there
    np.testing.assert_array_equal(out[~huge].view(np.int32), ref[~huge].view(np.int32))
    assert np.abs(out[huge].view(np.int32).astype(np.int64) - ref[huge].view(np.int32)).max() <= 2


def test_product_of_two_computed_tensors_is_rounded_before_the_add(tmp_path):
    """Rotary position embedding's `k * cos + rotate(k) * sin`: ORT rounds each Mul before the Add;
    in one fused kernel LLVM would contract them into an FMA (an ulp off in ~10% of elements)."""
    nodes = [helper.make_node("Cos", ["angle"], ["cos"]), helper.make_node("Sin", ["angle"], ["sin"]),
             helper.make_node("Neg", ["k"], ["rotated"]),
             helper.make_node("Mul", ["k", "cos"], ["a"]), helper.make_node("Mul", ["rotated", "sin"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "rotary",
        [helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 4, "T", 36]),
         helper.make_tensor_value_info("angle", TensorProto.FLOAT, ["T", 36])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "T", 36])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "rotary.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    rng = np.random.default_rng(11)
    feeds = {"k": rng.normal(0, 3, (1, 4, 120, 36)).astype(np.float32),
             "angle": (np.arange(120)[:, None] * 10000.0 ** (-np.arange(36) / 36)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = np.asarray(load(tmp_path / "art").run(feeds)["y"])
    np.testing.assert_array_equal(out.view(np.int32), ref.view(np.int32))


def test_erf_is_bit_identical_to_onnxruntime(tmp_path):
    """MLAS's erf: both branches (|x| <= 0.921875 and above), the clamp at 3.925, and signs."""
    model = unary_model("Erf", [1, "T", 64])
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(0, 1.5, (1, 300, 64)), rng.uniform(-6, 6, (1, 40, 64))], axis=1).astype(np.float32)
    x[0, 0, :6] = [0.0, 0.921875, -0.921875, 3.925, -4.0, 1e-8]
    out, ref = run_both(model, x, tmp_path)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("shape, t", [((1, 4, "T", "T"), 50), ((1, 4, "T", "T"), 77), ((2, "T", 200), 9)],
                         ids=["attention-50", "attention-77-tail", "rows-200"])
def test_softmax_is_bit_identical_to_onnxruntime(shape, t, tmp_path):
    """MLAS's exp and its 16-lane sum order: row lengths that are and are not multiples of 16."""
    model = unary_model("Softmax", list(shape), axis=-1)
    x = (np.random.default_rng(7).normal(0, 3, tuple(t if d == "T" else d for d in shape))).astype(np.float32)
    out, ref = run_both(model, x, tmp_path)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_a_softmax_over_time_runs_on_contiguous_rows_and_is_bit_identical(op, tmp_path):
    """Attentive pooling's weights: a softmax over T of [1, T, C] (axis 1). It runs between two transposes, as ONNX
    Runtime runs it, so each row's maximum and sum are computed once: in place along T, the row schedule (which takes
    the last loop for the row) recomputed them for every element, quadratic in T."""
    from nativeq.compile._tvm import relax, tirx
    from nativeq.compile.passes.legalize_like_ort import legalize_like_ort

    x = relax.Var("x", relax.TensorType((1, tirx.Var("T", "int64"), 24), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        call = relax.op.nn.softmax(x, axis=1) if op == "Softmax" else relax.op.nn.log_softmax(x, axis=1)
        builder.emit_func_output(builder.emit(call))
    legalized = relax.transform.LegalizeOps(customize_legalize_map=legalize_like_ort())(builder.get())
    kernels = [str(call.args[0].name_hint) for call in _calls(legalized["main"])]
    expected = "softmax" if op == "Softmax" else "log_softmax"
    assert [k.rstrip("0123456789") for k in kernels] == ["transpose", expected, "transpose"], kernels
    model = unary_model(op, [1, "T", 24], axis=1)
    x_value = (np.random.default_rng(9).normal(0, 3, (1, 77, 24))).astype(np.float32)
    out, ref = run_both(model, x_value, tmp_path)
    np.testing.assert_array_equal(out, ref)


def _calls(func):
    """The call_tir calls of a Relax function, in order."""
    from nativeq.compile._tvm import relax

    calls = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return calls


@pytest.mark.arm
@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_softmax_over_symbolic_rows_vectorizes_its_exps_on_arm(target, tmp_path):
    """Attention-like scores over a subsampled time axis: the per-row exp loop is vector code on NEON (`fmla v.4s`
    for MLAS's polynomial; placed per row, the loop began at a bound that only T >= 1 makes 0 and kept a guard
    around its store, so LLVM left it scalar), and the outputs under qemu equal ONNX Runtime's bit for bit
    (rows of 77: a tail)."""
    from disassembly import aarch64_disassembly
    from nativeq.runtime.emulate import run_emulated

    # rows of a subsampled time axis, (T - 1) // 2 + 1, as after a stride-2 convolution stem
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[1, 1], strides=[2, 2]),
         helper.make_node("Softmax", ["pooled"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "R", "R"])]), opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target=target, use_tuning=False))
    x = (np.random.default_rng(8).normal(0, 3, (1, 4, 153, 153))).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cpu = {"rpi4": "cortex-a72", "rpi5": "cortex-a76"}[target]
    np.testing.assert_array_equal(run_emulated(tmp_path / "art", {"x": x}, cpu=cpu)[0], ref)
    vector_fmas = [line for line in aarch64_disassembly(tmp_path / "art", raw_bytes=False).splitlines()
                   if "\tfmla\t" in line and ".4s" in line]
    assert len(vector_fmas) >= 6, "the softmax's exp polynomial is not vector code"


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("n", [1, 7, 16, 17, 29, 32, 48, 100])
def test_softmax_and_log_softmax_of_static_rows_are_bit_identical_and_vectorized(op, n, tmp_path):
    """A class axis of static length (a CTC head's LogSoftmax over 32 tokens): no chunk of 16 (n < 16), exactly one,
    whole chunks only (no tail) and a tail; MLAS's max, exp and lane sums, log-softmax as (x - max) - log(sum)."""
    model = unary_model(op, [1, "T", n], axis=-1)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    assert [k["schedule"] for k in result.kernels] == ["softmax"], result.kernels
    x = (np.random.default_rng(n).normal(0, 4, (1, 123, n))).astype(np.float32)
    x[0, 0, :] = 1e-30  # a row of equal values
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = load(tmp_path / "art").run({"x": x})
    np.testing.assert_array_equal(np.asarray(out["y"] if isinstance(out, dict) else out[0]), ref)


def test_round_is_ties_to_even_like_onnxruntime_and_vectorized(tmp_path):
    """ONNX Round: ties to even (2.5 -> 2, -0.5 -> -0), and the kernel on a symbolic length is vector code
    (TOPI's `nearbyint` is scalarized by TVM's vectorizer: one vroundss per element on x86)."""
    import subprocess

    model = unary_model("Round", [1, "T", 64])
    rng = np.random.default_rng(6)
    x = (rng.normal(0, 40, (1, 97, 64)) * 2).round().astype(np.float32) / 2  # many exact .5 ties
    x[0, 0, :6] = [0.5, 1.5, 2.5, -0.5, -1.5, 1e9]
    out, ref = run_both(model, x, tmp_path)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(ref))
    library = next((tmp_path / "art").glob("*.so"))
    asm = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True).stdout
    if "vrndscale" in asm or "vround" in asm:  # an x86 host with AVX: rounding instructions are visible
        assert " vroundss" not in asm and " vrndscaless" not in asm, "the round kernel is scalarized"
