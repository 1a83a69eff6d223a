"""Integer QAT layers: the forward is a real integer product, the backward an STE; convert is bit-exact."""

import numpy as np
import pytest
import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat import numerics as nx
from nativeq.qat.convert import IntLayer, convert, int_layers
from nativeq.qat.quantize import QuantConfig, calibrate, quant_layers, quantize_
from toy_encoder import ToyEncoder, toy_batches

torch.set_num_threads(1)


def _trained_toy(config: QuantConfig, steps: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = quantize_(ToyEncoder(), config)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for x in toy_batches(steps, seed=seed):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_quantize_swaps_every_layer_and_applies_bit_rules():
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=4, bits_rules=(("sub", 8), ("head", 8))))
    layers = dict(quant_layers(model))
    assert set(layers) == {"sub", "proj", "pointwise", "depthwise", "grouped", "qkv", "out", "head"}
    assert {n: l.weight_bits for n, l in layers.items()} == {
        "sub": 8, "proj": 4, "pointwise": 4, "depthwise": 4, "grouped": 4, "qkv": 4, "out": 4, "head": 8}
    assert not any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


def test_filter_fn_selects_layers():
    model = quantize_(ToyEncoder(), QuantConfig(), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    assert {n for n, _ in quant_layers(model)} == {"proj", "qkv", "out", "head"}


@pytest.mark.parametrize("bad", [
    lambda: quantize_(ToyEncoder(), QuantConfig(), filter_fn=lambda m, n: n == "nope"),
    lambda: quantize_(ToyEncoder(), QuantConfig(bits_rules=(("decoder.*", 8),))),
    lambda: QuantConfig(weight_bits=3),
    lambda: QuantConfig(act_bits=4),
    lambda: QuantConfig(act_scale="minmax"),
    lambda: quantize_(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular")), QuantConfig()),
])
def test_bad_configs_are_one_line_errors(bad):
    with pytest.raises(NativeqError) as e:
        bad()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_forward_is_the_exact_integer_product(bits):
    torch.manual_seed(bits)
    layer = quantize_(nn.Sequential(nn.Linear(40, 24)), QuantConfig(weight_bits=bits))[0]
    x = torch.randn(3, 7, 40)
    layer.train()
    layer(x)  # sets the activation scales
    layer.eval()
    y = layer(x).detach()
    # reference: int64 numpy product of the quantized operands, then the same rescale
    s_in = layer.input_quant.scale
    xq = nx.quantize(x, s_in, -128, 127).numpy().astype(np.int64)
    wq = layer.integer_weight().numpy().astype(np.int64)
    assert np.abs(wq).max() <= 2 ** (bits - 1) - 1
    acc = torch.from_numpy(xq @ wq.T).to(torch.float32)
    ref = acc * (s_in * layer.weight_scale()) + layer.bias.detach()
    s_out = layer.output_quant.scale
    ref = nx.quantize(ref, s_out, -128, 127) * s_out
    assert torch.equal(y, ref)


def test_ste_gradients_match_float_fake_quant_reference():
    """The integer layer's gradients equal those of the same math done in float with STE rounding."""
    torch.manual_seed(0)
    layer = quantize_(nn.Sequential(nn.Conv1d(8, 12, 3, padding=1, groups=2)), QuantConfig(weight_bits=4))[0]
    x = torch.randn(2, 8, 15) * 2
    layer.train()
    layer(x)
    layer.eval()  # fixed scales from here
    x = (x * 1.5).requires_grad_(True)  # some inputs now fall outside the int8 range
    g = torch.randn(2, 12, 15)
    (layer(x) * g).sum().backward()
    grad_x, grad_w = x.grad.clone(), layer.weight.grad.clone()

    # reference: explicit STE with clipping masks, product in float
    s_in, s_out = layer.input_quant.scale, layer.output_quant.scale
    w = layer.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    s_w = nx.weight_scale(w, 4)[:, None, None]

    def ste(v, s, lo, hi):
        u = v / s
        mask = ((u >= lo) & (u <= hi)).float()
        return (torch.clamp(torch.round(u), lo, hi) - u).detach() + u * mask + (u * (1 - mask)).detach()

    xq = ste(x2, s_in, -128, 127)
    wq = ste(w, s_w, -7, 7)
    y = nn.functional.conv1d(xq, wq, None, 1, 1, 1, 2) * (s_in * s_w.reshape(1, -1, 1)) + layer.bias.detach()[:, None]
    y = ste(y, s_out, -128, 127) * s_out
    (y * g).sum().backward()
    assert torch.allclose(grad_x, x2.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(grad_w, w.grad, atol=1e-4, rtol=1e-4)
    # the clipping mask is active: inputs beyond the int8 range get no gradient
    clipped = (x.detach() / s_in).abs() > 128.5
    assert clipped.any() and torch.all(grad_x[clipped] == 0)


def test_ste_gradient_numerically_inside_the_range():
    """Away from rounding jumps the STE gradient of the layer is the float layer's gradient at the quantized point."""
    torch.manual_seed(1)
    layer = quantize_(nn.Sequential(nn.Linear(6, 3)), QuantConfig(weight_bits=8, quantize_output=False))[0]
    x = torch.randn(4, 6)
    layer.train()
    layer(x)
    layer.eval()
    x.requires_grad_(True)
    layer(x).sum().backward()
    s = layer.input_quant.scale
    w_dq = layer.integer_weight().float() * layer.weight_scale()[:, None]
    expected = torch.ones(4, 3) @ w_dq  # d(sum(x_dq @ w_dq^T))/dx_dq, times dq/dx = 1 inside the range
    inside = (x.detach() / s).abs() <= 127
    assert torch.allclose(x.grad[inside], expected[inside], atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("act_scale", ["ema", "lsq"])
def test_convert_is_bit_exact_with_the_qat_eval_forward(bits, act_scale):
    model = _trained_toy(QuantConfig(weight_bits=bits, act_scale=act_scale))
    int_model = convert(model)
    assert len(int_layers(int_model)) == 8 and not quant_layers(int_model)
    for x in toy_batches(3, t=37, seed=5):
        with torch.no_grad():
            assert torch.equal(int_model(x), model(x))


def test_convert_packs_low_bit_weights():
    model = _trained_toy(QuantConfig(weight_bits=4, bits_rules=(("head", 8),)))
    int_model = convert(model)
    layer = dict(int_layers(int_model))["qkv"]
    assert layer.packed_weight.dtype == torch.uint8
    assert layer.packed_weight.numel() == (layer.integer_weight().numel() + 1) // 2
    head = dict(int_layers(int_model))["head"]
    assert head.packed_weight.dtype == torch.int8
    assert not any(isinstance(p, nn.Parameter) for m in int_model.modules() if isinstance(m, IntLayer) for p in m.parameters())


def test_convert_needs_activation_scales():
    model = quantize_(ToyEncoder(), QuantConfig())
    with pytest.raises(NativeqError, match="activation scales were never set"):
        convert(model)


def test_calibrate_sets_scales_without_changing_weights():
    torch.manual_seed(0)
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=8))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    calibrate(model, toy_batches(4))
    for name, layer in quant_layers(model):
        assert bool(layer.input_quant.initialized) and float(layer.input_quant.scale) > 0, name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training  # calibrate restores the mode it found


def test_lsq_scales_are_learned():
    torch.manual_seed(0)
    model = quantize_(ToyEncoder(), QuantConfig(act_scale="lsq"))
    model.train()
    x = toy_batches(1)[0]
    model(x)  # initialise
    loss = model(x).pow(2).mean()
    loss.backward()
    grads = [layer.input_quant.scale.grad for _, layer in quant_layers(model)]
    assert all(g is not None for g in grads) and any(float(g.abs()) > 0 for g in grads)


def test_integer_qat_stays_close_to_float_at_8_bits():
    torch.manual_seed(0)
    ref = ToyEncoder().eval()
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=8))
    model.load_state_dict(ref.state_dict(), strict=False)
    calibrate(model, toy_batches(4))
    x = toy_batches(1, seed=9)[0]
    with torch.no_grad():
        err = (model(x) - ref(x)).abs().max() / ref(x).abs().max()
    assert err < 0.1


def test_activation_products_are_integer_and_convert_bit_exact():
    from nativeq.qat.matmul import IntMatmulSite, matmul_sites

    torch.manual_seed(0)
    x0 = toy_batches(1)[0]
    model = quantize_(ToyEncoder(), QuantConfig(weight_bits=4, quantize_matmuls=True), example_inputs=(x0,))
    sites = matmul_sites(model)
    assert [s.site_name for s in sites] == ["matmul0", "matmul1"]  # Q·Kᵀ and P·V, made by the root module
    calibrate(model, toy_batches(3))
    model.eval()
    # the product is exact: compare one site against int64 numpy on its quantized operands
    captured = {}
    sites[0].register_forward_hook(lambda mod, args, out: captured.update(a=args[0], b=args[1], y=out))
    with torch.no_grad():
        model(x0)
    site = sites[0]
    sa, sb, sy = (q.scale for q in (site.a_quant, site.b_quant, site.output_quant))
    aq = nx.quantize(captured["a"], sa, -128, 127).numpy().astype(np.int64)
    bq = nx.quantize(captured["b"], sb, -128, 127).numpy().astype(np.int64)
    acc = torch.from_numpy(aq @ bq).to(torch.float32)
    assert torch.equal(captured["y"], nx.quantize(acc * (sa * sb), sy, -128, 127) * sy)
    int_model = convert(model)
    assert all(isinstance(s, IntMatmulSite) for s in matmul_sites(int_model))
    for x in toy_batches(2, seed=4):
        with torch.no_grad():
            assert torch.equal(int_model(x), model(x))


def test_activation_products_need_example_inputs():
    with pytest.raises(NativeqError, match="needs example_inputs"):
        quantize_(ToyEncoder(), QuantConfig(quantize_matmuls=True))
