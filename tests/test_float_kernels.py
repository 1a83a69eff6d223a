"""Float32 contractions a model keeps in float (a float stem, what `quantize_dynamic` leaves in float) run the
int8 kernels' float twins: convs as im2col + the packed matmul with the float multiply-add intrinsic, depthwise
convs as the depthwise kernel with float32 accumulators, attention as one kernel over blocks of query rows
(schedules/attention.py), other activation products packed at run time. Checked
against ONNX Runtime at sizes that are not multiples of the register tile, and for the schedule they get."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
import qdq_models
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import te, tvm
from nativeq.compile.schedules.generic import schedule_generic
from nativeq.verify import VerifyConfig, verify_artifact

OPSET = 17


def _float_conv(c_in: int, c_out: int, kernel: tuple, spatial: tuple, stride=1, pad=0, dilation=1, groups=1,
                seed: int = 0) -> onnx.ModelProto:
    """x [1, c_in, *spatial] -> Conv (+ bias) -> Relu -> Conv 1x1 back to c_in channels: float32 throughout."""
    rng = np.random.default_rng(seed)
    ndim = len(kernel)
    w = (rng.standard_normal((c_out, c_in // groups, *kernel)) / np.sqrt(c_in * np.prod(kernel))).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    w2 = (rng.standard_normal((c_in, c_out, *(1,) * ndim)) / np.sqrt(c_out)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(kernel), strides=[stride] * ndim,
                         pads=[pad] * (2 * ndim), dilations=[dilation] * ndim, group=groups),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1] * ndim),
    ]
    graph = helper.make_graph(nodes, "float_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_in, *(f"out{i}" for i in range(ndim))])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _float_attention(heads: int = 4, head: int = 36, time_step: int = 1) -> onnx.ModelProto:
    """softmax(Q Kᵀ) V of float activations [1, heads, T, head], T symbolic (attention `quantize_dynamic` keeps);
    with `time_step` > 1, on every time_step-th frame of q, k and v (a Slice along T, as `x[:, :, ::2]` exports)."""
    shape = [1, heads, "T", head]
    nodes, inits, names = [], [], {"q": "q", "k": "k", "v": "v"}
    if time_step > 1:
        inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                 {"starts": [0], "ends": [np.iinfo(np.int64).max], "axes": [2], "steps": [time_step]}.items()]
        nodes = [helper.make_node("Slice", [n, "starts", "ends", "axes", "steps"], [f"{n}_strided"]) for n in names]
        names = {n: f"{n}_strided" for n in names}
    nodes += [
        helper.make_node("Transpose", [names["k"]], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [names["q"], "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", names["v"]], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("q", "k", "v")]
    out_shape = shape if time_step == 1 else [1, heads, "S", head]
    graph = helper.make_graph(nodes, "float_attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


CASES = {
    # name: (model, dims, schedules the model's contractions must get)
    "conv1d_pointwise": (_float_conv(144, 288, (1,), ("T",)), {"T": 37}, {"float32 tensorized"}),
    "conv1d_k3_stride2": (_float_conv(80, 64, (3,), ("T",), stride=2, pad=1), {"T": 75}, {"float32 tensorized"}),
    "conv1d_k5_dilation2": (_float_conv(32, 48, (5,), ("T",), pad=4, dilation=2), {"T": 50}, {"float32 tensorized"}),
    "conv2d_stem_one_channel": (_float_conv(1, 16, (3, 3), ("T", 40), stride=2), {"T": 51}, {"float32 tensorized"}),
    "conv2d_3x3": (_float_conv(8, 24, (3, 3), (19, 13), pad=1), {}, {"float32 tensorized"}),
    "depthwise_conv1d_k15": (_float_conv(48, 48, (15,), ("T",), pad=7, groups=48), {"T": 61},
                             {"float32 depthwise", "float32 tensorized"}),
    "depthwise_conv2d_3x3": (_float_conv(16, 16, (3, 3), (21, 10), pad=1, groups=16), {},
                             {"float32 depthwise", "float32 tensorized"}),
    "attention": (_float_attention(), {"T": 45}, {"float32 attention"}),
    # the sliced time axis is legalized to another expression of T than the one inferred: the run-time pack
    # fused with the transpose of K once met two shapes for one tensor (an internal error in FuseTIR)
    "attention_on_every_second_frame": (_float_attention(time_step=2), {"T": 45}, {"float32 attention"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float_contractions_get_the_float_kernels_and_match_onnxruntime(name, tmp_path):
    model, dims, schedules = CASES[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False), progress=False)
    contractions = [k for k in result.kernels if k["kind"] == "contraction"]
    assert contractions and {k["schedule"] for k in contractions} == schedules, contractions
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2, rtol=1e-5))
    assert report.passed, report.table()


def test_float_matmul_kernel_is_fused_multiply_adds(tmp_path):
    """The float kernel's dot step is one FMA per vector of columns (`llvm.fmuladd` -> vfmadd on x86)."""
    path = tmp_path / "m.onnx"
    onnx.save(_float_conv(144, 288, (1,), ("T",)), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False), progress=False)
    asm = subprocess.run(["objdump", "-d", str(tmp_path / "art" / "model.so")], capture_output=True, text=True,
                         check=True).stdout
    assert sum("vfmadd" in line for line in asm.splitlines()) >= 4


def test_dynamic_quantization_min_max_are_vectorized_and_exact(tmp_path):
    """DynamicQuantizeLinear's min and max over the whole tensor: one partial result per vector lane (rfactor),
    and the artifact still equals ONNX Runtime exactly."""
    rows = tvm.tirx.Var("T", "int64")
    x = te.placeholder((1, rows, 144), "float32", name="x")
    k = [te.reduce_axis((0, rows)), te.reduce_axis((0, 144))]
    low = te.compute((), lambda: te.min(x[0, k[0], k[1]], axis=k), name="low")
    sch = schedule_generic(te.create_prim_func([x, low]), vector_bits=512)
    assert sch is not None and "T.vectorized(16)" in sch.mod.script()

    path = tmp_path / "dyn.onnx"
    onnx.save(qdq_models.dynamic_quantize_matmul(k=144, n=64), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False), progress=False)
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 53}, runs=2))
    assert report.passed, report.table()


def test_full_reduction_schedule_computes_the_minimum(tmp_path):
    """The rfactor'd reduction built and run: the same minimum as numpy, for a T that no tile divides."""
    rows = tvm.tirx.Var("T", "int64")
    x = te.placeholder((1, rows, 48), "float32", name="x")
    k = [te.reduce_axis((0, rows)), te.reduce_axis((0, 48))]
    low = te.compute((1,), lambda _: te.min(x[0, k[0], k[1]], axis=k), name="low")
    sch = schedule_generic(te.create_prim_func([x, low]), vector_bits=512)
    assert sch is not None
    lib = tvm.compile(sch.mod, target="llvm")
    data = np.random.default_rng(0).standard_normal((1, 29, 48)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(1, np.float32))
    lib["main"](tvm.runtime.tensor(data), out)
    assert out.numpy()[0] == data.min()


def test_a_transpose_fused_with_a_reshape_reads_whole_rows_of_its_source():
    """Attention's heads moved back next to each other in a model with static shapes: a transpose [H, T, d] ->
    [T, H, d] fused with the reshape to [T, H x d] reads its source at (c // d, t, c % d). The innermost loop is split
    by d, so that each vector is one contiguous row of d values (a vector of 16 lanes across c gathered each lane:
    a static-length Conformer's kernel 28 -> 3.5 us per call), and the result is the same."""
    heads, frames, width = 4, 20, 36
    a = te.placeholder((heads, frames, width), "uint8", name="a")
    moved = te.compute((frames, heads * width), lambda t, c: a[c // width, t, c % width], name="moved")
    sch = schedule_generic(te.create_prim_func([a, moved]), vector_bits=512)
    assert sch is not None and f"T.vectorized({width})" in sch.mod.script(), sch.mod.script()
    lib = tvm.compile(sch.mod, target="llvm")
    data = np.random.default_rng(0).integers(0, 256, (heads, frames, width)).astype(np.uint8)
    out = tvm.runtime.tensor(np.zeros((frames, heads * width), np.uint8))
    lib["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), data.transpose(1, 0, 2).reshape(frames, heads * width))
