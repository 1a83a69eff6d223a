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
from nativeq.qat.sparsity import balanced_blocks_kept, balanced_layer_pattern


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


def _index_bits(pattern: str) -> tuple[str, float]:
    """How a sparse pattern's positions are stored: ("nm", bits per kept weight) or ("bitmap", bits per unit)."""
    if ":" in pattern and pattern.split(":")[0].isdigit():
        m = int(pattern.split(":")[1])
        return "nm", float(max(1, (m - 1).bit_length()))  # a position inside the group of M per kept weight
    return "bitmap", 1.0


def _layer_weight_bytes(layer) -> float:
    q = layer.integer_weight()
    n, bits, pattern = q.numel(), layer.weight_bits, layer.sparsity_pattern
    if pattern == "dense":
        return n * bits / 8
    balanced = balanced_layer_pattern(pattern)
    if balanced is not None:  # K full RxC blocks per band, positions as a 1-bit-per-block bitmap
        r, c, sparsity = balanced
        rows, cols = q.shape[0], q[0].numel()
        n_blocks = -(-cols // c)
        kept = balanced_blocks_kept(n_blocks, sparsity)
        return rows * kept * c * bits / 8 + -(-rows // r) * n_blocks / 8
    kind, index_bits = _index_bits(pattern)
    if kind == "nm":
        keep, group = map(int, pattern.split(":"))
        return n * keep / group * (bits + index_bits) / 8  # N slots per group of M, each with its position
    kept = int((q != 0).sum())
    if pattern.startswith("unstructured"):
        return kept * bits / 8 + n / 8  # values + a 1-bit-per-weight bitmap
    r, c = map(int, pattern.split("x"))
    kept_blocks = -(-kept // (r * c))
    return kept_blocks * r * c * bits / 8 + n / (r * c) / 8  # values + a 1-bit-per-block bitmap


def storage_bytes(model: nn.Module) -> dict:
    """Stored size of a QAT or converted model vs the float32 model it came from.

    Integer weights cost bits/8 bytes each; sparse layers store only kept weights plus their
    positions (N:M: log2(M) bits per kept slot; unstructured: a 1-bit-per-weight bitmap;
    RxC blocks: a 1-bit-per-block bitmap; balanced RxCb blocks: K full blocks per band of R
    outputs plus a 1-bit-per-block bitmap). Per-channel weight scales, activation scales,
    biases and every other float tensor cost 4 bytes per value.
    """
    from nativeq.qat.matmul import matmul_sites

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLayer, IntLayer))]
    weight_keys = {f"{n}.weight" for n, _ in layers} | {f"{n}.packed_weight" for n, _ in layers}
    overhead = ("weight_mask", "mask_frozen", "initialized", "scale", "weight_scale", "input_scale", "output_scale",
                "a_scale", "b_scale")
    rest = sum(t.numel() for k, t in model.state_dict().items()
               if k not in weight_keys and not k.split(".")[-1] in overhead)
    n_weights = sum(m.integer_weight().numel() for _, m in layers)
    n_act_scales = sum(2 if getattr(m, "output_quant", getattr(m, "output_scale", None)) is not None else 1 for _, m in layers)
    n_act_scales += 3 * len(matmul_sites(model))
    weight_bytes = sum(_layer_weight_bytes(m) for _, m in layers)
    n_weight_scales = sum(m.weight_scale.numel() if isinstance(m, IntLayer) else m.weight_scale().numel()
                          for _, m in layers)
    total = weight_bytes + 4 * (n_weight_scales + rest + n_act_scales)
    float_bytes = 4 * (n_weights + rest)
    return {"bytes": int(round(total)), "float_bytes": float_bytes, "fraction_of_float": total / float_bytes,
            # the quantized weights (values + sparse positions) alone against their float32 size: the
            # accounting of the USM-Lite paper's "9.4% of float" (int4 + 2:4: 0.5 x (4 + 2) / 32 = 9.375%)
            "weight_fraction_of_float": weight_bytes / (4 * n_weights)}
