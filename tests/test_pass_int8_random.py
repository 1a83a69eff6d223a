"""Randomized QDQ sites vs ONNX Runtime: every corner of the zero-point algebra at once.

Each case draws an op (MatMul, Conv1d, Conv2d), activation dtype and zero point (any value, not just
0/128), weight dtype (int8 or uint8), per-tensor or per-channel weight scales with arbitrary weight
zero points (often too far from the weights to fold into int8), conv groups, kernel sizes, asymmetric
padding, strides and dilations, an optional Relu, and the kernel activation dtype of the rewrite.
Every site must become integer and agree with ORT (optimizations off) within one step.
"""

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from test_pass_int8_numerics import HOST, contractions_fed_by_dequantize, ort_reference
from tvm import relax

from nativeq.compile._tvm import from_onnx
from nativeq.compile.passes.int8 import lowering_passes

_QTYPES = {"uint8": (TensorProto.UINT8, np.uint8, 0, 255), "int8": (TensorProto.INT8, np.int8, -128, 127)}


def random_site(rng, kind: str, act: str, weight_dtype: str, per_channel: bool):
    """A random QDQ `kind` site; returns (model, input shape, output step)."""
    qtype, act_np, lo, hi = _QTYPES[act]
    _, w_np, w_lo, w_hi = _QTYPES[weight_dtype]
    inits = [numpy_helper.from_array(np.array(rng.uniform(0.01, 0.1), np.float32), "sx"),
             numpy_helper.from_array(np.array(rng.integers(lo, hi + 1), act_np), "zx")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"])]
    if kind == "matmul":
        k, n = int(rng.integers(3, 40)), int(rng.integers(1, 20))
        w_shape, axis, in_shape = (k, n), 1, [2, 5, k]
    else:
        dims = 1 if kind == "conv1d" else 2
        c_in = int(rng.choice([4, 8, 12]))
        groups = int(rng.choice([1, 2, 4]))
        c_out = groups * int(rng.integers(1, 4))
        kernel = [int(rng.choice([1, 2, 3, 5])) for _ in range(dims)]
        w_shape, axis = (c_out, c_in // groups, *kernel), 0
        in_shape = [1, c_in, *(int(rng.integers(12, 20)) for _ in range(dims))]
    channels = w_shape[axis]
    default_zp = 128 if weight_dtype == "uint8" else 0
    zp_shape = (channels,) if per_channel else ()
    w_zp = rng.integers(w_lo, w_hi + 1, zp_shape) if rng.random() < 0.5 else np.full(zp_shape, default_zp)
    w_scale = rng.uniform(0.001, 0.02, zp_shape).astype(np.float32)
    inits += [numpy_helper.from_array(rng.integers(w_lo, w_hi + 1, w_shape).astype(w_np), "wq"),
              numpy_helper.from_array(w_scale, "sw"), numpy_helper.from_array(w_zp.astype(w_np), "zw")]
    nodes.append(helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wf"], **({"axis": axis} if per_channel else {})))
    if kind == "matmul":
        nodes.append(helper.make_node("MatMul", ["xf", "wf"], ["y0"]))
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, c_out).astype(np.float32), "b"))
        nodes.append(helper.make_node(
            "Conv", ["xf", "wf", "b"], ["y0"], kernel_shape=kernel, group=groups,
            pads=[int(rng.integers(0, 3)) for _ in range(2 * dims)],
            strides=[int(rng.integers(1, 3)) for _ in range(dims)],
            dilations=[int(rng.integers(1, 3)) for _ in range(dims)]))
    out = "y0"
    if rng.random() < 0.5:
        nodes.append(helper.make_node("Relu", ["y0"], ["y1"]))
        out = "y1"
    step = float(rng.uniform(0.05, 0.5))
    inits += [numpy_helper.from_array(np.array(step, np.float32), "sy"),
              numpy_helper.from_array(np.array(rng.integers(lo, hi + 1), act_np), "zy")]
    nodes += [helper.make_node("QuantizeLinear", [out, "sy", "zy"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model), in_shape, float(np.float32(step))


@pytest.mark.parametrize("seed", range(12))
def test_random_qdq_site_is_integer_and_matches_onnxruntime(seed):
    rng = np.random.default_rng(1000 + seed)
    kind = ("matmul", "conv1d", "conv2d")[seed % 3]
    act, weight_dtype = rng.choice(["uint8", "int8"]), rng.choice(["int8", "uint8"])
    model, shape, step = random_site(rng, kind, str(act), str(weight_dtype), per_channel=bool(rng.integers(2)))
    kernel_dtype = ("uint8", "int8", None)[seed % 3 - 1]
    lowered = tvm.transform.Sequential(lowering_passes(kernel_dtype))(from_onnx(model, keep_params_in_input=False))
    assert contractions_fed_by_dequantize(lowered) == []
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    x = rng.normal(0, 3.0, shape).astype(np.float32)
    steps = np.abs(vm["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64) - ort_reference(model, x)) / step
    assert steps.max() <= 1.0 + 1e-3 and np.mean(steps < 1e-3) >= 0.99
