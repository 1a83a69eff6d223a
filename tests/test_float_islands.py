"""qat.float_islands: PyTorch's float ops in eval mode, bit for bit as ONNX Runtime's CPU kernels compute them.

Each case runs one ONNX node in ORT (graph optimizations off) and the same op through the
torch function mode; a change in ORT's arithmetic fails these tests and says so.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nativeq.qat import float_islands
from nativeq.qat.float_islands import OrtFloatIslands, install_float_islands

torch.set_num_threads(1)


def _ort(node, x: np.ndarray, initializers=(), opset: int = 21) -> np.ndarray:
    graph = helper.make_graph(
        [node], "island", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _mismatched(got: torch.Tensor, ref: np.ndarray) -> int:
    return int((got.numpy() != ref).sum())


def _activations(shape, seed, spread=3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, spread, shape) * rng.uniform(0.2, 2.0, shape[-1:])
    return x.astype(np.float32)


# (ONNX op, torch call through the mode, input), each equal to ORT in every element
ELEMENTWISE = [
    ("Sigmoid", lambda t: torch.sigmoid(t), np.concatenate([_activations((200, 96), 1), np.linspace(-30, 30, 96 * 20,
                                                              dtype=np.float32).reshape(20, 96)])),
    ("Erf", lambda t: torch.erf(t), np.concatenate([_activations((200, 64), 2, 1.5), np.linspace(-6, 6, 64 * 20,
                                                      dtype=np.float32).reshape(20, 64)])),
    # rotary tables: position x frequency angles, and random values in both signs
    ("Sin", lambda t: t.sin(), np.concatenate([(np.arange(300)[:, None] * 10000.0 ** (-np.arange(36) / 36)).astype(
        np.float32), np.random.default_rng(3).uniform(-40, 40, (40, 36)).astype(np.float32)])),
    ("Cos", lambda t: torch.cos(t), np.concatenate([(np.arange(300)[:, None] * 10000.0 ** (-np.arange(36) / 36)).astype(
        np.float32), np.random.default_rng(4).uniform(-40, 40, (40, 36)).astype(np.float32)])),
]


@pytest.mark.parametrize("op, call, x", ELEMENTWISE, ids=[c[0] for c in ELEMENTWISE])
def test_elementwise_is_bit_identical_to_onnxruntime(op, call, x):
    ref = _ort(helper.make_node(op, ["x"], ["y"]), x)
    with OrtFloatIslands():
        got = call(torch.from_numpy(x))
    assert _mismatched(got, ref) == 0
    assert _mismatched(call(torch.from_numpy(x)), ref) > 0  # PyTorch's own kernel does differ: the test can fail


def test_silu_and_glu_are_ort_decompositions():
    """F.silu exports as Mul(x, Sigmoid(x)), F.glu as Split + Sigmoid + Mul."""
    x = _activations((50, 64), 3)
    sig = _ort(helper.make_node("Sigmoid", ["x"], ["y"]), x)
    with OrtFloatIslands():
        silu = F.silu(torch.from_numpy(x))
        glu = F.glu(torch.from_numpy(x), dim=-1)
    assert _mismatched(silu, x * sig) == 0
    assert _mismatched(glu, x[:, :32] * sig[:, 32:]) == 0


@pytest.mark.parametrize("n", [5, 16, 37, 144, 300, 1000])
def test_softmax_is_bit_identical_to_onnxruntime(n):
    x = _activations((40, 3, n), 4)
    ref = _ort(helper.make_node("Softmax", ["x"], ["y"], axis=-1), x, opset=13)
    with OrtFloatIslands():
        got = torch.softmax(torch.from_numpy(x), dim=-1)
        method = torch.from_numpy(x).softmax(-1)
    assert _mismatched(got, ref) == 0 and _mismatched(method, ref) == 0


def test_softmax_on_an_inner_axis():
    x = _activations((6, 50, 7), 5)
    ref = _ort(helper.make_node("Softmax", ["x"], ["y"], axis=1), x, opset=13)
    with OrtFloatIslands():
        got = F.softmax(torch.from_numpy(x), dim=1)
    assert _mismatched(got, ref) == 0


# row length n: MLAS's 8-lane vector kernel (multiples of 8, with a scalar tail) and the Welford loop (n < 8)
@pytest.mark.parametrize("n", [4, 64, 100, 144, 288])
def test_layer_norm_is_bit_identical_to_onnxruntime(n):
    rng = np.random.default_rng(n)
    x = _activations((300, n), 6)
    scale = rng.normal(1.0, 0.3, n).astype(np.float32)
    bias = rng.normal(0.0, 0.3, n).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, epsilon=1e-5)
    ref = _ort(node, x, [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")])
    layer = nn.LayerNorm(n)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(scale))
        layer.bias.copy_(torch.from_numpy(bias))
    with torch.no_grad(), OrtFloatIslands():
        got = layer(torch.from_numpy(x))
    assert _mismatched(got, ref) == 0
    with torch.no_grad():
        assert _mismatched(layer(torch.from_numpy(x)), ref) > 0


def test_other_dtypes_keep_pytorch_kernels():
    x = torch.randn(4, 16, dtype=torch.float64)
    with OrtFloatIslands():
        assert torch.equal(torch.sigmoid(x), x.sigmoid().clone())
        assert torch.equal(torch.softmax(x, -1), torch.softmax(x, -1))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.softmax(F.silu(self.fc(self.norm(x))), dim=-1)


def test_installed_islands_run_in_eval_only_and_keep_gradients_in_training():
    torch.manual_seed(0)
    model = _Block()
    install_float_islands(model)
    install_float_islands(model)  # idempotent
    x = torch.randn(8, 16)
    with torch.no_grad():
        with OrtFloatIslands():
            expected_eval = model.fc(float_islands.layer_norm(x, (16,), model.norm.weight, model.norm.bias))
            expected_eval = torch.softmax(F.silu(expected_eval), dim=-1)
        plain = torch.softmax(F.silu(model.fc(model.norm(x))), dim=-1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected_eval)
    model.train()
    y = model(x)
    assert torch.equal(y.detach(), plain)
    y.sum().backward()
    assert model.fc.weight.grad is not None
