"""Native-integer quantization-aware training: `QuantConfig` and `quantize_`.

`quantize_(model, QuantConfig(...))` swaps every selected `nn.Linear`/`nn.Conv1d`/
`nn.Conv2d` for a `QuantLinear`/`QuantConv` whose forward pass is integer:

    x --quantize (per tensor, int8)--> xq ─┐
    w --mask--quantize (per channel)--> wq ─┴─ int8 x int8 -> int32 accumulate
        -> * (s_x * s_w) + bias -> quantize (int8 layer output) -> * s_y -> y

The backward pass is a straight-through estimator with a clipping mask (see
`numerics.quantize_ste`); the integer product's gradient is that of the same product in
float. Rounding, ranges and scales all come from `numerics`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat import numerics as nx
from nativeq.qat.float_islands import install_float_islands

ACT_SCALE_MODES = ("ema", "lsq")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    weight_bits: default weight width (8, 4 or 2), per output channel, symmetric.
    act_bits: activation width (8), per tensor, symmetric (zero point 0).
    act_scale: "ema" (absmax tracked by an exponential moving average while training or
        calibrating) or "lsq" (learned step size, initialised from the first batch).
    bits_rules: ((fnmatch pattern on the module name, weight bits), ...); the first match
        wins, e.g. (("subsampling.*", 8), ("head*", 8)) for the mixed 4/8-bit recipe.
    quantize_output: also quantize each layer's output to int8 (what the compiler's
        int8 lowering consumes: quantize(matmul(dq(x), dq(w)) + b)).
    quantize_matmuls: also make activation x activation products (attention) integer,
        found by running `example_inputs` through the model (see `qat.matmul`).
    power_of_two_scales: round every scale up to a power of two (see `numerics`): the
        exported QDQ graph then runs bit-exactly in float executors; costs up to 1 bit of range.
    """

    weight_bits: int = 8
    act_bits: int = 8
    act_scale: str = "ema"
    ema_decay: float = 0.9
    bits_rules: tuple[tuple[str, int], ...] = ()
    quantize_output: bool = True
    quantize_matmuls: bool = False
    power_of_two_scales: bool = False

    def __post_init__(self):
        nx.check_weight_bits(self.weight_bits)
        nx.check_act_bits(self.act_bits)
        if self.act_scale not in ACT_SCALE_MODES:
            raise NativeqError(f"act_scale {self.act_scale!r} not supported (choose one of {', '.join(ACT_SCALE_MODES)})")
        if self.power_of_two_scales and self.act_scale == "lsq":
            raise NativeqError("power_of_two_scales works with act_scale='ema' only (LSQ learns arbitrary scales)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise NativeqError(f"ema_decay {self.ema_decay} must be in [0, 1)")
        for rule in self.bits_rules:
            if len(rule) != 2 or not isinstance(rule[0], str):
                raise NativeqError(f"bits rule {rule!r}: expected (module-name pattern, bits)")
            nx.check_weight_bits(rule[1])

    def bits_for(self, name: str) -> int:
        for pattern, bits in self.bits_rules:
            if fnmatch.fnmatchcase(name, pattern):
                return bits
        return self.weight_bits


# ---------------------------------------------------------------- activation scales

class ActQuantizer(nn.Module):
    """Per-tensor symmetric scale of one activation: EMA of the absmax, or learned (LSQ)."""

    def __init__(self, bits: int, mode: str, ema_decay: float, pow2: bool = False):
        super().__init__()
        self.bits, self.mode, self.ema_decay, self.pow2 = bits, mode, ema_decay, pow2
        self.qmin, self.qmax = nx.act_range(bits)
        self.observing = False  # set by `calibrate`: update the EMA in eval mode too
        self.register_buffer("initialized", torch.tensor(False))
        if mode == "lsq":
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        absmax = x.detach().abs().amax().to(torch.float32)
        if self.mode == "lsq":
            if not bool(self.initialized):
                self.scale.copy_(nx.scale_from_absmax(absmax, self.qmax))
                self.initialized.fill_(True)
            return
        new = nx.scale_from_absmax(absmax, self.qmax)
        if bool(self.initialized):
            new = self.ema_decay * self.scale + (1.0 - self.ema_decay) * new
        self.scale.copy_(new)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the scale to quantize `x` with (updating it first while training/observing)."""
        if self.training or self.observing:
            self._observe(x)
        if self.mode == "lsq" and self.training:
            # LSQ gradient scaling 1/sqrt(numel * qmax): same value, smaller gradient.
            g = 1.0 / math.sqrt(x.numel() * self.qmax)
            s = self.scale * g + (self.scale - self.scale * g).detach()
            return torch.clamp(s, min=nx.MIN_SCALE)
        scale = torch.clamp(self.scale.detach(), min=nx.MIN_SCALE)
        return nx.power_of_two(scale) if self.pow2 else scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}" + (", pow2" if self.pow2 else "")


# ---------------------------------------------------------------- integer products of a layer

@dataclass(frozen=True)
class LayerSpec:
    """The geometry of a Linear or Conv layer (what the integer product needs)."""

    kind: str  # "linear" | "conv"
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()  # (left, right) per spatial dim
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @staticmethod
    def of(module: nn.Module, name: str) -> "LayerSpec":
        if isinstance(module, nn.Linear):
            return LayerSpec("linear")
        if module.padding_mode != "zeros":
            raise NativeqError(f"layer {name}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
        k = module.kernel_size
        if isinstance(module.padding, str):
            if module.padding == "valid":
                pads = tuple((0, 0) for _ in k)
            else:  # "same" (stride 1): extra padding goes to the right, as in PyTorch
                pads = []
                for kk, d in zip(k, module.dilation):
                    total = d * (kk - 1)
                    pads.append((total // 2, total - total // 2))
                pads = tuple(pads)
        else:
            pads = tuple((p, p) for p in module.padding)
        return LayerSpec("conv", tuple(module.stride), pads, tuple(module.dilation), module.groups)


def _im2col(x: torch.Tensor, weight_shape, spec: LayerSpec) -> torch.Tensor:
    """int8 [B, C, *S] -> int8 [G, B*L, C/G * prod(k)] (zero padding: the zero point is 0)."""
    b, c = x.shape[:2]
    kernel = weight_shape[2:]
    nd = len(kernel)
    pad = []
    for left, right in reversed(spec.padding):
        pad += [left, right]
    if any(pad):
        x = F.pad(x, pad)
    for d in range(nd):
        span = spec.dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, spec.stride[d])
        if spec.dilation[d] > 1:
            x = x[..., :: spec.dilation[d]]
    # x: [B, C, L1..Lnd, k1..knd]
    out_sizes = x.shape[2 : 2 + nd]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)  # [B, L..., C, k...]
    g = spec.groups
    cols = x.reshape(b * math.prod(out_sizes), g, -1).transpose(0, 1)
    return cols, out_sizes


def int_accumulate(xq: torch.Tensor, wq: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The exact int32 accumulator of the layer for int8 input `xq` and int8 weight `wq`."""
    if spec.kind == "linear":
        k = xq.shape[-1]
        acc = nx.int_matmul(xq.reshape(-1, k), wq.t())
        return acc.reshape(*xq.shape[:-1], wq.shape[0])
    b = xq.shape[0]
    c_out = wq.shape[0]
    g = spec.groups
    cols, out_sizes = _im2col(xq, wq.shape, spec)  # [G, B*L, Kg]
    w = wq.reshape(g, c_out // g, -1).transpose(1, 2)  # [G, Kg, Cout/G]
    acc = nx.int_grouped_matmul(cols, w)  # [G, B*L, Cout/G]
    acc = acc.transpose(0, 1).reshape(b, *out_sizes, c_out)
    nd = len(out_sizes)
    return acc.permute(0, nd + 1, *range(1, nd + 1))


def float_product(x: torch.Tensor, w: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The same product in float (used for gradients only)."""
    if spec.kind == "linear":
        return F.linear(x, w)
    nd = w.dim() - 2
    pad = []
    for left, right in reversed(spec.padding):
        pad += [left, right]
    if any(pad):
        x = F.pad(x, pad)
    conv = F.conv1d if nd == 1 else F.conv2d
    return conv(x, w, None, spec.stride, 0, spec.dilation, spec.groups)


class _IntegerProduct(torch.autograd.Function):
    """Forward: int8 x int8 -> int32 (exact); backward: the float product's gradients."""

    @staticmethod
    def forward(ctx, xq, wq, spec):
        ctx.save_for_backward(xq, wq)
        ctx.spec = spec
        acc = int_accumulate(xq.to(torch.int8), wq.to(torch.int8), spec)
        return acc.to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        xq, wq = ctx.saved_tensors
        gx, gw = product_gradients(xq, wq, grad, ctx.spec, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None


def product_gradients(x, w, grad, spec: LayerSpec, need_x: bool = True, need_w: bool = True):
    """Gradients of the float product `float_product(x, w, spec)` for an output gradient `grad`."""
    gx = gw = None
    if spec.kind == "linear":
        g2 = grad.reshape(-1, w.shape[0])
        if need_x:
            gx = (g2 @ w).reshape(x.shape)
        if need_w:
            gw = g2.t() @ x.reshape(-1, w.shape[1])
        return gx, gw
    pad = []
    for left, right in reversed(spec.padding):
        pad += [left, right]
    xp = F.pad(x, pad) if any(pad) else x
    nd = w.dim() - 2
    gxp, gw, _ = torch.ops.aten.convolution_backward(
        grad, xp, w, None, list(spec.stride), [0] * nd, list(spec.dilation), False, [0] * nd, spec.groups,
        [need_x, need_w, False],
    )
    if need_x and any(pad):
        index = [slice(None), slice(None)] + [slice(left, left + x.shape[2 + d]) for d, (left, _) in enumerate(spec.padding)]
        gx = gxp[tuple(index)]
    elif need_x:
        gx = gxp
    return gx, (gw if need_w else None)


def _channel_view(scale: torch.Tensor, like: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Broadcast a per-output-channel vector against the accumulator."""
    if spec.kind == "linear":
        return scale
    return scale.reshape(1, -1, *([1] * (like.dim() - 2)))


def rescale(acc: torch.Tensor, in_scale, w_scale, bias, spec: LayerSpec) -> torch.Tensor:
    """int32 accumulator (as float) -> float output: acc * (s_x * s_w) + bias. Shared with `convert`."""
    y = nx.accumulator_to_float(acc, in_scale, _channel_view(w_scale, acc, spec))
    if bias is not None:
        y = y + _channel_view(bias, acc, spec)
    return y


# ---------------------------------------------------------------- the QAT layer

class QuantLayer(nn.Module):
    """An integer Linear/Conv1d/Conv2d for QAT (keeps the float weight as the trained master copy)."""

    def __init__(self, module: nn.Module, name: str, weight_bits: int, config: QuantConfig):
        super().__init__()
        self.spec = LayerSpec.of(module, name)
        self.layer_name = name
        self.weight_bits = weight_bits
        self.act_bits = config.act_bits
        self.weight = module.weight
        self.bias = module.bias
        self.in_features_shape = tuple(module.weight.shape)
        self.pow2 = config.power_of_two_scales
        self.input_quant = ActQuantizer(config.act_bits, config.act_scale, config.ema_decay, self.pow2)
        self.output_quant = (
            ActQuantizer(config.act_bits, config.act_scale, config.ema_decay, self.pow2) if config.quantize_output else None
        )
        self.register_buffer("weight_mask", None)
        self.sparsity_pattern = "dense"

    # -- pieces reused by convert and export
    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.weight_mask is None else self.weight * self.weight_mask

    def weight_scale(self) -> torch.Tensor:
        return nx.weight_scale(self.masked_weight(), self.weight_bits, self.pow2)

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The int8-held integer weight the forward pass multiplies with."""
        w = self.masked_weight()
        s = self.weight_scale().reshape(-1, *([1] * (w.dim() - 1)))
        qmin, qmax = nx.weight_range(self.weight_bits)
        return nx.quantize(w, s, qmin, qmax).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amin, amax = nx.act_range(self.act_bits)
        s_in = self.input_quant(x)
        xq = nx.quantize_ste(x, s_in, amin, amax)
        w = self.masked_weight()
        s_w = self.weight_scale()
        qmin, qmax = nx.weight_range(self.weight_bits)
        wq = nx.quantize_ste(w, s_w.reshape(-1, *([1] * (w.dim() - 1))), qmin, qmax)
        acc = _IntegerProduct.apply(xq, wq, self.spec)
        y = rescale(acc, s_in, s_w, self.bias, self.spec)
        if self.output_quant is not None:
            s_out = self.output_quant(y)
            y = nx.quantize_ste(y, s_out, amin, amax) * s_out
        return y

    def extra_repr(self) -> str:
        return (f"{self.layer_name}: {self.spec.kind} {tuple(self.weight.shape)}, w{self.weight_bits}a{self.act_bits}, "
                f"sparsity={self.sparsity_pattern}")


QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              example_inputs: tuple | None = None) -> nn.Module:
    """Swap the selected Linear/Conv1d/Conv2d layers of `model` (in place) for integer QAT layers.

    `filter_fn(module, name)` picks layers (default: all of them). With
    `config.quantize_matmuls`, `example_inputs` (a tuple of model inputs) is run once to
    find the activation products. Returns `model`.
    """
    if config.quantize_matmuls and example_inputs is None:
        raise NativeqError("quantize_: quantize_matmuls needs example_inputs to find the model's activation products")
    chosen = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE) and (filter_fn is None or filter_fn(m, name))
    ]
    if not chosen:
        raise NativeqError(
            f"quantize_: the layer filter matched no Linear/Conv1d/Conv2d layer in {type(model).__name__}"
        )
    for pattern, _ in config.bits_rules:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in chosen):
            raise NativeqError(f"quantize_: bits rule {pattern!r} matches no quantized layer")
    if config.quantize_matmuls:
        from nativeq.qat.matmul import attach_matmul_sites

        attach_matmul_sites(model, config.act_bits, config.act_scale, config.ema_decay, tuple(example_inputs),
                            pow2=config.power_of_two_scales)
    for name, m in chosen:
        _set_submodule(model, name, QuantLayer(m, name, config.bits_for(name), config))
    install_float_islands(model)
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> nn.Module:
    """Set the activation scales from data without training (post-training quantization).

    Runs `model(*batch)` (or `model(batch)`) in eval mode with the scale observers on.
    """
    layers = quant_layers(model)
    if not layers:
        raise NativeqError("calibrate: the model has no quantized layers (call quantize_ first)")
    from nativeq.qat.matmul import matmul_sites

    quantizers = [q for _, m in layers for q in (m.input_quant, m.output_quant) if q is not None]
    quantizers += [q for site in matmul_sites(model) for q in (site.a_quant, site.b_quant, site.output_quant)]
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.observing = True
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for q in quantizers:
            q.observing = False
        model.train(was_training)
    return model
