"""`convert(model)`: from a QAT model to the integer model that is served.

Each `QuantLayer` becomes an `IntLayer` holding only what inference needs: the integer
weight (int8; 4- and 2-bit weights packed two/four per byte), the per-channel weight
scales, the float bias and the activation scales. Its forward pass runs the same integer
product and the same rescale as the QAT layer's eval forward, so the two agree bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat import numerics as nx
from nativeq.qat.quantize import LayerSpec, QuantLayer, _set_submodule, int_accumulate, quant_layers, rescale


class IntLayer(nn.Module):
    """An inference-only integer Linear/Conv layer."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.layer_name = layer.layer_name
        self.spec: LayerSpec = layer.spec
        self.weight_bits = layer.weight_bits
        self.act_bits = layer.act_bits
        self.weight_shape = tuple(layer.weight.shape)
        self.sparsity_pattern = layer.sparsity_pattern
        with torch.no_grad():
            self.register_buffer("packed_weight", nx.pack_int(layer.integer_weight(), layer.weight_bits))
            self.register_buffer("weight_scale", layer.weight_scale().detach().clone())
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
            self.register_buffer("input_scale", _eval_scale(layer.input_quant))
            self.register_buffer(
                "output_scale", None if layer.output_quant is None else _eval_scale(layer.output_quant)
            )

    def integer_weight(self) -> torch.Tensor:
        return nx.unpack_int(self.packed_weight, self.weight_bits, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amin, amax = nx.act_range(self.act_bits)
        xq = nx.quantize(x, self.input_scale, amin, amax).to(torch.int8)
        acc = int_accumulate(xq, self.integer_weight(), self.spec).to(torch.float32)
        y = rescale(acc, self.input_scale, self.weight_scale, self.bias, self.spec)
        if self.output_scale is not None:
            y = nx.quantize(y, self.output_scale, amin, amax) * self.output_scale
        return y

    def extra_repr(self) -> str:
        return f"{self.layer_name}: {self.spec.kind} {self.weight_shape}, w{self.weight_bits}a{self.act_bits}, {self.sparsity_pattern}"


def _eval_scale(quantizer) -> torch.Tensor:
    if not bool(quantizer.initialized):
        raise NativeqError("convert: activation scales were never set (train or `calibrate` the model first)")
    was = quantizer.training
    quantizer.eval()
    try:
        return quantizer(torch.zeros(())).detach().clone()
    finally:
        quantizer.train(was)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every QuantLayer with its IntLayer (on a copy unless `inplace`); returns the eval-mode model."""
    if not quant_layers(model):
        raise NativeqError("convert: the model has no quantized layers (call quantize_ first)")
    from nativeq.qat.matmul import convert_matmul_sites

    out = model if inplace else copy.deepcopy(model)
    for name, layer in quant_layers(out):
        _set_submodule(out, name, IntLayer(layer))
    convert_matmul_sites(out)
    return out.eval()


def int_layers(model: nn.Module) -> list[tuple[str, IntLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IntLayer)]
