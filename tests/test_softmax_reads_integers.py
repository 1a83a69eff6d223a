"""SoftmaxReadsIntegers: softmax(dequantize(q)) is one softmax kernel reading the integers q, bit-identical."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qdq_models
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes import int8 as int8_passes
from nativeq.compile.passes.softmax_reads_integers import SoftmaxReadsIntegers
from nativeq.runtime import load


def _scores(scale=0.0371, zero_point=133, second_reader=False, log=False, scale_param=False, per_channel=False):
    """q[4, 8, 24] (uint8) -> dequantize -> softmax (log-softmax), the dequantize also returned if asked."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((4, 8, 24), "uint8"))
    s = relax.Var("s", relax.TensorType((), "float32"))
    params = [q, s] if scale_param else [q]
    with bb.function("main", params):
        with bb.dataflow():
            if scale_param:
                scale_expr = s
            elif per_channel:
                scale_expr = relax.const(np.linspace(0.01, 0.05, 8).astype(np.float32))
            else:
                scale_expr = relax.const(scale, "float32")
            d = relax.op.dequantize(q, scale_expr, relax.const(zero_point, "uint8"), axis=1)
            d = bb.emit_output(d) if second_reader else bb.emit(d)
            softmax = relax.op.nn.log_softmax if log else relax.op.nn.softmax
            y = bb.emit_output(softmax(d, axis=-1))
            out = relax.Tuple([y, d]) if second_reader else y
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log-softmax"])
def test_the_softmax_reads_the_integers_and_the_dequantize_is_gone(log):
    after = SoftmaxReadsIntegers()(_scores(log=log))
    calls = _calls(after)
    assert not any(isinstance(c.op, tvm.ir.Op) and c.op.name in ("relax.dequantize", "relax.nn.softmax",
                                                                   "relax.nn.log_softmax") for c in calls)
    (call,) = calls
    assert call.op.name == "relax.call_tir"
    (q,) = call.args[1].fields
    assert q.same_as(after["main"].params[0])
    kernel = after[call.args[0]]
    assert kernel.attrs["op_pattern"] == 4  # out-elementwise-fusable: the requantize after it fuses into it


@pytest.mark.parametrize("case", [dict(second_reader=True), dict(scale_param=True), dict(per_channel=True),
                                  dict(scale=-0.0371), dict(scale=0.0)],
                         ids=["dequantize read twice", "scale not constant", "per-channel scale",
                              "negative scale", "zero scale"])
def test_left_alone(case):
    before = _scores(**case)
    tvm.ir.assert_structural_equal(SoftmaxReadsIntegers()(before), before)


def _ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _rows(rng, shape, scale):
    """Random scores over the whole quantized range and beyond (both saturations), with rows all one value,
    rows whose maximum is their last element (in the partial last chunk of 16) and rounding ties."""
    x = rng.uniform(-200 * scale, 200 * scale, shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    special = [np.full(shape[-1], 3 * scale, np.float32),
               np.where(np.arange(shape[-1]) == shape[-1] - 1, np.float32(1e3), flat[0]),
               ((np.arange(shape[-1]) % 7 - 3 + np.float32(0.5)) * np.float32(scale)).astype(np.float32)]
    for row, values in zip(flat[1:], special):  # the first row stays random
        row[:] = values
    return x


@pytest.mark.parametrize("n", [5, 32, 100, None], ids=["row 5", "row 32", "row 100", "row T"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log-softmax"])
@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_softmax_of_quantized_scores_matches_onnxruntime_exactly(n, log, act, tmp_path):
    # a static row of 32 is two whole vectors: LLVM kept a row in registers and contracted the dequantize's
    # product into the `- max` after it (an ulp off ORT) until the product became an FMA with +0
    model = qdq_models.qdq_softmax(n="T" if n is None else n, log=log, act_dtype=act)
    path = tmp_path / "softmax.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    compiled = load(tmp_path / "art")
    names = [k["name"] for k in compiled.manifest["kernels"]]
    # the scores' quantize is a kernel of its own writing integers, not a float clip handing floats over
    assert "quantize" in names and not any("round" in name for name in names), names
    rng = np.random.default_rng(0)
    for t in (1, 7, 40):
        x = _rows(rng, (1, t, t if n is None else n), 0.0371)
        np.testing.assert_array_equal(compiled.run({"x": x})["y"], _ort(model, {"x": x}))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log-softmax"])
def test_softmax_over_the_time_axis_matches_onnxruntime_exactly(log, tmp_path):
    """The softmax over a middle axis (time, of run-time length) of quantized scores."""
    model = qdq_models.qdq_softmax(n=24, log=log, axis=1)
    path = tmp_path / "softmax_t.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    compiled = load(tmp_path / "art")
    assert not any("round" in k["name"] for k in compiled.manifest["kernels"])
    rng = np.random.default_rng(2)
    for t in (1, 17, 33):
        x = _rows(rng, (1, t, 24), 0.0371)
        np.testing.assert_array_equal(compiled.run({"x": x})["y"], _ort(model, {"x": x}))


@pytest.mark.parametrize("scores", ["matmul", "attention"])
def test_the_scores_cross_memory_as_bytes_and_the_result_is_unchanged(scores, tmp_path, monkeypatch):
    model = qdq_models.qdq_softmax(n=48, scores=scores, act_dtype="uint8", scale=0.02)
    path = tmp_path / "scores.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "new", CompileConfig(target="host", use_tuning=False))

    @tvm.transform.module_pass(opt_level=0, name="identity")
    def identity(mod, _ctx):
        return mod

    monkeypatch.setattr(int8_passes, "SoftmaxReadsIntegers", lambda: identity)
    compile_model(path, tmp_path / "old", CompileConfig(target="host", use_tuning=False))
    new, old = load(tmp_path / "new"), load(tmp_path / "old")
    # the matmul's epilogue ends in a quantize (1 byte per score), no longer in the dequantize's multiply
    [new_matmul] = [k["name"] for k in new.manifest["kernels"] if "matmul" in k["name"]]
    [old_matmul] = [k["name"] for k in old.manifest["kernels"] if "matmul" in k["name"]]
    assert new_matmul.endswith(tuple(f"quantize{i}" for i in ["", *range(10)])) and "_round" not in new_matmul
    assert not old_matmul.split("_")[-1].startswith("quantize")
    rng = np.random.default_rng(1)
    for t in (3, 48, 61):
        x = rng.uniform(-6.4, 6.4, (1, t, 16)).astype(np.float32)
        np.testing.assert_array_equal(new.run({"x": x})["y"], old.run({"x": x})["y"])


def test_the_exps_of_a_run_time_row_use_512_bit_vectors_on_avx512(tmp_path):
    """The exp loop over a row of run-time length is vectorized by LLVM, not TVM: `x86-avx512-vnni` turns off
    LLVM's preference for 256-bit vectors there, so the MLAS exp polynomial runs 16 floats per FMA."""
    import re
    import subprocess

    path = tmp_path / "rows_t.onnx"
    onnx.save(qdq_models.qdq_softmax(n="T"), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="x86-avx512-vnni", use_tuning=False, debug=True))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "art" / "model.so")],
                          capture_output=True, text=True, check=True).stdout
    # NOTE: the whole library: its other kernel (the input's quantize) has no FMA, and the softmax's parallel
    # body is an unnamed function
    fmas = re.findall(r"vfmadd\w+ps\s+\S*%([xyz])mm", text)  # packed: the scalar remainder aside
    # the exp loop on zmm registers (LLVM's 256-bit preference gave ymm); its remainder may run on xmm
    assert "z" in fmas and "y" not in fmas, sorted(set(fmas))
