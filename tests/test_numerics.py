"""The numerics table of nativeq.qat.numerics, checked against ONNX QuantizeLinear (ORT) and exact integer math."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nativeq.errors import NativeqError
from nativeq.qat import numerics as nx
from nativeq.qat.quantize import LayerSpec, int_accumulate

torch.set_num_threads(1)

# (x, scale, expected int8): ties round half to even, then saturate to [-128, 127]
QUANTIZE_TABLE = [
    (0.0, 1.0, 0),
    (0.5, 1.0, 0),
    (1.5, 1.0, 2),
    (2.5, 1.0, 2),
    (-0.5, 1.0, 0),
    (-1.5, 1.0, -2),
    (-2.5, 1.0, -2),
    (0.49999997, 1.0, 0),
    (126.5, 1.0, 126),
    (127.5, 1.0, 127),
    (-127.5, 1.0, -128),
    (-128.5, 1.0, -128),
    (1000.0, 1.0, 127),
    (-1000.0, 1.0, -128),
    (0.25, 0.5, 0),  # 0.5 -> 0
    (0.75, 0.5, 2),  # 1.5 -> 2
    (0.3, 0.1, 3),  # 0.3 / 0.1 = 2.9999998 in float32
    (-0.05, 0.1, 0),  # -0.5 -> 0 (no negative zero issues)
]

WEIGHT_RANGES = [(8, (-127, 127)), (4, (-7, 7)), (2, (-1, 1))]


def _ort_quantize(x: np.ndarray, scale: float) -> np.ndarray:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, [len(x)])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_quantize_table():
    amin, amax = nx.act_range(8)
    assert (amin, amax) == (-128, 127)
    for x, s, expected in QUANTIZE_TABLE:
        got = nx.quantize(torch.tensor(x, dtype=torch.float32), torch.tensor(s, dtype=torch.float32), amin, amax)
        assert int(got) == expected, (x, s)


def test_quantize_table_matches_onnx_quantizelinear():
    by_scale = {}
    for x, s, expected in QUANTIZE_TABLE:
        by_scale.setdefault(s, []).append((x, expected))
    for s, rows in by_scale.items():
        xs = np.array([r[0] for r in rows], np.float32)
        ref = _ort_quantize(xs, s)
        ours = nx.quantize(torch.from_numpy(xs), torch.tensor(s), -128, 127).to(torch.int8).numpy()
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(ref, np.array([r[1] for r in rows], np.int8))


def test_quantize_matches_ort_on_random_values_and_ties():
    rng = np.random.default_rng(0)
    scale = 0.0371
    x = np.concatenate([rng.normal(0, 3, 20000), (np.arange(-300, 300) + 0.5) * scale]).astype(np.float32)
    ours = nx.quantize(torch.from_numpy(x), torch.tensor(scale), -128, 127).to(torch.int8).numpy()
    np.testing.assert_array_equal(ours, _ort_quantize(x, scale))


@pytest.mark.parametrize("bits,expected", WEIGHT_RANGES)
def test_weight_range_table(bits, expected):
    assert nx.weight_range(bits) == expected


@pytest.mark.parametrize("bits", [1, 3, 16])
def test_unsupported_bits_are_one_line_errors(bits):
    with pytest.raises(NativeqError, match=f"weight bits {bits} not supported"):
        nx.weight_range(bits)


def test_weight_scale_per_channel_and_zero_channel():
    w = torch.tensor([[1.25, -3.5], [0.0, 0.0], [7.0, 2.5]])
    s = nx.weight_scale(w, 4)
    assert torch.equal(s, torch.tensor([0.5, nx.MIN_SCALE, 1.0]))
    q = nx.quantize(w, s[:, None], *nx.weight_range(4))
    assert q.tolist() == [[2.0, -7.0], [0.0, 0.0], [7.0, 2.0]]  # 2.5 -> 2 (half to even)


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_pack_roundtrip(bits):
    qmin, qmax = nx.weight_range(bits)
    q = torch.randint(qmin, qmax + 1, (7, 13), dtype=torch.int8)
    packed = nx.pack_int(q, bits)
    assert packed.numel() == -(-q.numel() * bits // 8)
    assert torch.equal(nx.unpack_int(packed, bits, q.shape), q)


def test_int4_packing_matches_onnx():
    q = torch.randint(-7, 8, (5, 7), dtype=torch.int8)
    t = helper.make_tensor("w", TensorProto.INT4, q.shape, q.reshape(-1).tolist())
    onnx_bytes = np.array(t.int32_data, dtype=np.int64).astype(np.uint8)
    np.testing.assert_array_equal(nx.pack_int(q, 4).numpy(), onnx_bytes)


def test_int_matmul_exact_vs_int64():
    rng = np.random.default_rng(1)
    for m, k, n in [(1, 64, 48), (17, 300, 33), (64, 2048, 16)]:
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-127, 128, (k, n)).astype(np.int8)
        a[0, :] = -128
        b[:, 0] = -127  # worst case: |sum| = k * 128 * 127 needs more than 16 bits
        got = nx.int_matmul(torch.from_numpy(a), torch.from_numpy(b))
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy().astype(np.int64), a.astype(np.int64) @ b.astype(np.int64))


def _conv_int64(x, w, stride, pads, dilation, groups):
    """Reference integer convolution (N-d) in int64 numpy, one kernel tap at a time."""
    nd = w.ndim - 2
    x = np.pad(x.astype(np.int64), [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    c_out, cg = w.shape[:2]
    kernel = w.shape[2:]
    out_sizes = [(x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(nd)]
    out = np.zeros((x.shape[0], c_out, *out_sizes), np.int64)
    og = c_out // groups
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(tap[d] * dilation[d], tap[d] * dilation[d] + stride[d] * (out_sizes[d] - 1) + 1, stride[d])
                   for d in range(nd))
        patch = x[(slice(None), slice(None), *sl)]  # [B, C, *out]
        for g in range(groups):
            wg = w[g * og:(g + 1) * og, :, *tap].astype(np.int64)  # [og, cg]
            pg = patch[:, g * cg:(g + 1) * cg]
            out[:, g * og:(g + 1) * og] += np.einsum("oc,bc...->bo...", wg, pg)
    return out


@pytest.mark.parametrize("case", [
    dict(c_in=16, c_out=24, kernel=(3,), stride=(1,), pads=((1, 1),), dilation=(1,), groups=1),
    dict(c_in=16, c_out=16, kernel=(5,), stride=(1,), pads=((4, 0),), dilation=(1,), groups=16),  # depthwise causal
    dict(c_in=16, c_out=8, kernel=(3,), stride=(2,), pads=((2, 2),), dilation=(2,), groups=4),
    dict(c_in=3, c_out=8, kernel=(3, 3), stride=(2, 2), pads=((0, 0), (0, 0)), dilation=(1, 1), groups=1),
    dict(c_in=4, c_out=4, kernel=(3, 2), stride=(1, 2), pads=((1, 1), (0, 1)), dilation=(1, 1), groups=2),
])
def test_int_conv_exact_vs_int64(case):
    rng = np.random.default_rng(2)
    spatial = (23,) if len(case["kernel"]) == 1 else (11, 9)
    x = rng.integers(-128, 128, (2, case["c_in"], *spatial)).astype(np.int8)
    w = rng.integers(-127, 128, (case["c_out"], case["c_in"] // case["groups"], *case["kernel"])).astype(np.int8)
    spec = LayerSpec("conv", case["stride"], case["pads"], case["dilation"], case["groups"])
    got = int_accumulate(torch.from_numpy(x), torch.from_numpy(w), spec)
    assert got.dtype == torch.int32
    ref = _conv_int64(x, w, case["stride"], case["pads"], case["dilation"], case["groups"])
    np.testing.assert_array_equal(got.numpy().astype(np.int64), ref)


def test_ste_gradient_has_clipping_mask():
    s = torch.tensor(0.1)
    x = torch.tensor([0.0, 0.31, -5.0, 12.7, 12.9, -12.8, -12.9], requires_grad=True)
    nx.quantize_ste(x, s, -128, 127).sum().backward()
    inside = torch.tensor([1, 1, 1, 1, 0, 1, 0], dtype=torch.float32)  # 12.9/0.1 = 129 > 127; -129 < -128
    assert torch.allclose(x.grad, inside / 0.1)


def test_lsq_scale_gradient_matches_formula():
    # d/ds of quantize(x, s) * s is (q - x/s) inside the range and qmin/qmax outside (LSQ)
    x = torch.tensor([0.26, -0.14, 0.07, 20.0, -20.0])
    s = torch.tensor(0.1, requires_grad=True)
    (nx.quantize_ste(x, s, -8, 7) * s).sum().backward()
    v = x / 0.1
    q = torch.clamp(torch.round(v), -8, 7)
    expected = torch.where((v >= -8) & (v <= 7), q - v, q).sum()
    assert torch.allclose(s.grad, expected, atol=1e-5)


def test_power_of_two_scale_table():
    table = [(0.3, 0.5), (0.5, 0.5), (0.51, 1.0), (1.0, 1.0), (3.0, 4.0), (1e-3, 2.0 ** -9)]
    for scale, expected in table:
        assert float(nx.power_of_two(torch.tensor(scale))) == expected, scale
    w = torch.tensor([[0.7, -0.1], [3.5, 1.0]])
    s = nx.weight_scale(w, 4, pow2=True)
    assert s.tolist() == [0.125, 0.5]  # 0.7/7 = 0.1 -> 1/8; 3.5/7 = 0.5
    assert nx.quantize(w, s[:, None], -7, 7).tolist() == [[6.0, -1.0], [7.0, 2.0]]  # never saturates
