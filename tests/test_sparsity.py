"""Sparsity masks: patterns hold exactly on the integer weights, the cubic schedule, freezing, bad configs."""

import pytest
import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat.convert import convert, int_layers
from nativeq.qat.quantize import QuantConfig, calibrate, quant_layers, quantize_
from nativeq.qat.sparsity import (
    SparsityConfig,
    compute_mask,
    pattern_violations,
    sparsify_,
    sparsity_report,
    update_masks,
    zero_blocks,
)
from toy_encoder import ToyEncoder, train_toy

torch.set_num_threads(1)


def _train(model, steps, start=0):
    return train_toy(model, steps, seed=start, start=start, after_step=update_masks)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("2:8", 2, 8)])
@pytest.mark.parametrize("bits", [8, 4])
def test_nm_pattern_holds_on_integer_weights(pattern, n, m, bits):
    torch.manual_seed(0)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=bits))
    sparsify_(model, SparsityConfig(pattern, start_step=0, end_step=4, update_every=2))
    _train(model, 6)
    int_model = convert(model)
    for name, layer in int_layers(int_model):
        q = layer.integer_weight()
        assert pattern_violations(q, pattern) == 0, name
        mat = q.reshape(q.shape[0], -1)
        if mat.shape[1] % m == 0:  # full groups: exactly M - N zeros by mask (more if rounding zeroes a weight)
            zeros = (mat.reshape(mat.shape[0], -1, m) == 0).sum(-1)
            assert int(zeros.min()) >= m - n, name
    # the checker itself catches a broken group
    q = int_layers(int_model)[1][1].integer_weight().clone().reshape(-1)
    q[:m] = 1
    assert pattern_violations(q.reshape(1, -1), pattern) >= 1


def test_nm_with_a_short_last_group():
    w = torch.randn(6, 5)  # 5 inputs: one group of 4 and a short group of 1
    mask = compute_mask(w, SparsityConfig("2:4"), 0.5)
    assert pattern_violations(w * mask, "2:4") == 0
    assert int(mask[:, :4].sum()) == 6 * 2
    w = torch.randn(3, 7)  # short group of 3 keeps at most 2
    mask = compute_mask(w, SparsityConfig("2:4"), 0.5)
    assert int(mask[:, 4:].sum(1).max()) <= 2


@pytest.mark.parametrize("pattern,block", [("1x4", (1, 4)), ("4x1", (4, 1))])
def test_block_pattern(pattern, block):
    torch.manual_seed(0)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=4))
    sparsify_(model, SparsityConfig(pattern, sparsity=0.5), filter_fn=lambda m, n: n in ("qkv", "out", "pointwise"))
    _train(model, 2)
    for name, layer in quant_layers(model):
        if name not in ("qkv", "out", "pointwise"):
            continue
        q = layer.integer_weight()
        assert zero_blocks(q, block) >= 0.5 - 1e-9, name
        # zeros come in whole blocks: the mask is constant on every block
        mask = layer.weight_mask.reshape(q.shape[0], -1)
        r, c = block
        blocks = mask.reshape(mask.shape[0] // r, r, mask.shape[1] // c, c)
        assert torch.all(blocks.amax(dim=(1, 3)) == blocks.amin(dim=(1, 3)))


def test_unstructured_keeps_the_largest_magnitudes():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = compute_mask(w, SparsityConfig("unstructured", sparsity=0.75), 0.75)
    assert int((mask == 0).sum()) == 16 * 32 * 3 // 4
    assert w[mask == 1].abs().min() >= w[mask == 0].abs().max()


def test_cubic_schedule_table():
    cfg = SparsityConfig("unstructured", sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=110, update_every=5)
    table = [(0, 0.1), (10, 0.1), (60, 0.8 + (0.1 - 0.8) * 0.5 ** 3), (85, 0.8 + (0.1 - 0.8) * 0.25 ** 3), (110, 0.8), (500, 0.8)]
    for step, expected in table:
        assert abs(cfg.sparsity_at(step) - expected) < 1e-12, step


def test_masks_update_every_k_steps_then_freeze():
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(32, 16)), QuantConfig())
    sparsify_(model, SparsityConfig("unstructured", sparsity=0.5, start_step=0, end_step=8, update_every=4))
    layer = model[0]
    zeros = lambda: int((layer.weight_mask == 0).sum())
    assert zeros() == 0  # initial sparsity 0 at step 0
    assert update_masks(model, 1) == 0  # not due
    assert update_masks(model, 4) == 1 and zeros() == round(512 * (0.5 - 0.5 * 0.5 ** 3))
    assert update_masks(model, 8) == 1 and zeros() == 256 and bool(layer.mask_frozen)
    frozen = layer.weight_mask.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    assert update_masks(model, 12) == 0 and torch.equal(layer.weight_mask, frozen)


def test_prune_then_quantize():
    """The mask acts before quantization: pruned weights are exactly zero and do not set the scale."""
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(8, 4)), QuantConfig(weight_bits=4))
    layer = model[0]
    with torch.no_grad():
        layer.weight[:, 0] = 100.0  # huge, but pruned below
        layer.weight[:, 1:4] = torch.tensor([0.5, 0.4, 0.3])
    sparsify_(model, SparsityConfig("1:4"))
    assert torch.all(layer.integer_weight()[:, 0] == 7)  # magnitude keeps the largest
    with torch.no_grad():
        layer.weight_mask[:, :4] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a mask that prunes the huge weight
    q = layer.integer_weight()
    assert torch.all(q[:, 0] == 0) and torch.all(q[:, 2:4] == 0)
    assert torch.all(q[:, 1].abs() >= 4)  # the scale comes from the kept weights, not from 100
    assert pattern_violations(q, "1:4") == 0
    calibrate(model, [torch.randn(3, 8)])
    x = torch.randn(5, 8)
    dense_pruned = nn.functional.linear(x, layer.weight * layer.weight_mask, layer.bias)
    steps = float(layer.output_quant.scale) + float(layer.weight_scale().max()) * 3 * 8
    assert torch.allclose(model(x), dense_pruned, atol=steps)


def test_sparsity_report():
    torch.manual_seed(0)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=4))
    sparsify_(model, SparsityConfig("2:4"), filter_fn=lambda m, n: n == "qkv")
    rep = sparsity_report(model)
    assert rep["qkv"]["pattern"] == "2:4" and rep["qkv"]["violations"] == 0 and rep["qkv"]["zeros"] >= 0.5
    assert rep["head"]["pattern"] == "dense"


@pytest.mark.parametrize("make,match", [
    (lambda: SparsityConfig("4:2"), "need 1 <= N < M"),
    (lambda: SparsityConfig("4:4"), "need 1 <= N < M"),
    (lambda: SparsityConfig("unstructured", sparsity=1.0), "must be in \\(0, 1\\)"),
    (lambda: SparsityConfig("unstructured", sparsity=1.5), "must be in \\(0, 1\\)"),
    (lambda: SparsityConfig("unstructured"), "needs a final sparsity"),
    (lambda: SparsityConfig("2:4", sparsity=0.3), "fixes sparsity at 0.5"),
    (lambda: SparsityConfig("3x"), "not understood"),
    (lambda: SparsityConfig("2:4", start_step=5, end_step=2), "start_step <= end_step"),
    (lambda: sparsify_(ToyEncoder(), SparsityConfig("2:4")), "call quantize_ first"),
    (lambda: sparsify_(quantize_(ToyEncoder(), QuantConfig()), SparsityConfig("2:4"), filter_fn=lambda m, n: False),
     "matched no quantized layer"),
])
def test_bad_sparsity_configs(make, match):
    with pytest.raises(NativeqError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits,pattern,weight_bytes", [
    (8, None, 64 * 32),
    (4, None, 64 * 32 // 2),
    (4, "2:4", 64 * 32 // 2 * (4 + 2) // 8),  # half the slots, 4-bit value + 2-bit position each
    (8, "1:4", 64 * 32 // 4 * (8 + 2) // 8),
])
def test_storage_bytes_of_one_layer(bits, pattern, weight_bytes):
    from nativeq.qat.convert import storage_bytes

    model = quantize_(nn.Sequential(nn.Linear(64, 32)), QuantConfig(weight_bits=bits))
    if pattern:
        sparsify_(model, SparsityConfig(pattern))
    calibrate(model, [torch.randn(4, 64)])
    size = storage_bytes(model)
    overhead = 32 * 4 + 32 * 4 + 2 * 4  # per-channel scales, bias, input and output scales
    assert size["bytes"] == weight_bytes + overhead
    assert size["float_bytes"] == 4 * (64 * 32 + 32)
    assert size["weight_fraction_of_float"] == weight_bytes / (4 * 64 * 32)
    assert storage_bytes(convert(model))["bytes"] == size["bytes"]
