"""Integer activation x activation products (attention's Q·Kᵀ and P·V) without touching the model's code.

`attach_matmul_sites(model, config, example_inputs)` runs the model once and records every
`torch.matmul` / `@` / `torch.bmm` call whose two operands are float activations (not
parameters), in call order, under the name of the module that made it
("blocks.0.attn.matmul0", ...). From then on, while the model runs, a torch function mode
routes call number i to site i, which quantizes both operands per tensor to int8 and
multiplies them exactly (int32 accumulation), then rescales and quantizes the product to
int8 — the same rules as `QuantLayer` (from `numerics`), with an STE backward.

NOTE: sites are matched by call order, so the model's forward must make the same sequence
of activation products on every call (true of any model without data-dependent control
flow around its matmuls); a different count raises a NativeqError.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nativeq.errors import NativeqError
from nativeq.qat import numerics as nx

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


def _is_activation_product(func, args) -> bool:
    if func not in _MATMULS or len(args) < 2:
        return False
    a, b = args[0], args[1]
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()
            and b.is_floating_point() and not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter))


def int_batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 (broadcast batched) matmul with int32 accumulation."""
    assert a.dtype == torch.int8 and b.dtype == torch.int8
    return torch.matmul(a.to(torch.int32), b.to(torch.int32))


class _IntegerMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, aq, bq):
        ctx.save_for_backward(aq, bq)
        return int_batched_matmul(aq.to(torch.int8), bq.to(torch.int8)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        aq, bq = ctx.saved_tensors
        with torch.enable_grad():
            a = aq.detach().requires_grad_(True)
            b = bq.detach().requires_grad_(True)
            ga, gb = torch.autograd.grad(torch.matmul(a, b), (a, b), grad)
        return ga, gb


class MatmulSite(nn.Module):
    """One activation product: scales of both operands and of the result."""

    def __init__(self, name: str, act_bits: int, mode: str, ema_decay: float, pow2: bool = False):
        super().__init__()
        from nativeq.qat.quantize import ActQuantizer

        self.site_name = name
        self.act_bits = act_bits
        self.a_quant = ActQuantizer(act_bits, mode, ema_decay, pow2)
        self.b_quant = ActQuantizer(act_bits, mode, ema_decay, pow2)
        self.output_quant = ActQuantizer(act_bits, mode, ema_decay, pow2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lo, hi = nx.act_range(self.act_bits)
        s_a, s_b = self.a_quant(a), self.b_quant(b)
        acc = _IntegerMatmul.apply(nx.quantize_ste(a, s_a, lo, hi), nx.quantize_ste(b, s_b, lo, hi))
        y = nx.accumulator_to_float(acc, s_a, s_b)
        s_y = self.output_quant(y)
        return nx.quantize_ste(y, s_y, lo, hi) * s_y

    def extra_repr(self) -> str:
        return f"{self.site_name}: a{self.act_bits} x a{self.act_bits}"


class IntMatmulSite(nn.Module):
    """Inference form of a MatmulSite (fixed scales); same arithmetic as its eval forward."""

    def __init__(self, site: MatmulSite):
        super().__init__()
        from nativeq.qat.convert import _eval_scale

        self.site_name, self.act_bits = site.site_name, site.act_bits
        self.register_buffer("a_scale", _eval_scale(site.a_quant))
        self.register_buffer("b_scale", _eval_scale(site.b_quant))
        self.register_buffer("output_scale", _eval_scale(site.output_quant))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lo, hi = nx.act_range(self.act_bits)
        aq = nx.quantize(a, self.a_scale, lo, hi).to(torch.int8)
        bq = nx.quantize(b, self.b_scale, lo, hi).to(torch.int8)
        y = nx.accumulator_to_float(int_batched_matmul(aq, bq).to(torch.float32), self.a_scale, self.b_scale)
        return nx.quantize(y, self.output_scale, lo, hi) * self.output_scale

    def extra_repr(self) -> str:
        return f"{self.site_name}: a{self.act_bits} x a{self.act_bits}"


class _RouteMatmuls(TorchFunctionMode):
    """While active, the i-th activation product goes to `sites[i]` (or `route(i, a, b)`)."""

    def __init__(self, sites, route=None):
        super().__init__()
        self.sites, self.route, self.count = sites, route, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_activation_product(func, args):
            return func(*args, **kwargs)
        if self.count >= len(self.sites):
            raise NativeqError(f"the model made more activation products ({self.count + 1}) than were recorded "
                               f"({len(self.sites)}): its forward is not the same on every call")
        i = self.count
        self.count += 1
        a, b = args[0], args[1]
        return self.route(i, a, b) if self.route is not None else self.sites[i](a, b)


class _Discover(TorchFunctionMode):
    def __init__(self, stack):
        super().__init__()
        self.stack, self.owners = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _is_activation_product(func, args):
            self.owners.append(self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


SITES_ATTR = "nativeq_matmuls"


def _discover(model: nn.Module, example_inputs: tuple) -> list[str]:
    stack: list[str] = []
    hooks = []

    def push(name):
        return lambda mod, args: stack.append(name)  # returns None: inputs unchanged

    def pop(mod, args, out):
        stack.pop()

    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(push(name)))
        hooks.append(m.register_forward_hook(pop, always_call=True))
    mode = _Discover(stack)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            model(*example_inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    names, counts = [], {}
    for owner in mode.owners:
        k = counts.get(owner, 0)
        counts[owner] = k + 1
        names.append(f"{owner}.matmul{k}" if owner else f"matmul{k}")
    return names


def _install_router(model: nn.Module) -> None:
    state = {}

    def enter(mod, args):
        mode = _RouteMatmuls(getattr(mod, SITES_ATTR), getattr(mod, "_nativeq_route", None))
        mode.__enter__()
        state["mode"] = mode

    def leave(mod, args, out):
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)
            if mode.count != len(mode.sites) and out is not None:
                raise NativeqError(f"the model made {mode.count} activation products, {len(mode.sites)} were recorded")

    model._nativeq_router_hooks = (model.register_forward_pre_hook(enter),
                                   model.register_forward_hook(leave, always_call=True))


def attach_matmul_sites(model: nn.Module, act_bits: int, act_scale: str, ema_decay: float,
                        example_inputs: tuple, pow2: bool = False) -> list[str]:
    """Record the activation products of `model` and quantize them from now on; returns the site names."""
    names = _discover(model, example_inputs)
    setattr(model, SITES_ATTR, nn.ModuleList(MatmulSite(n, act_bits, act_scale, ema_decay, pow2) for n in names))
    _install_router(model)
    return names


def matmul_sites(model: nn.Module) -> list:
    return list(getattr(model, SITES_ATTR, []))


def convert_matmul_sites(model: nn.Module) -> None:
    """Swap MatmulSites for IntMatmulSites in place (the router hooks stay)."""
    sites = getattr(model, SITES_ATTR, None)
    if sites is not None:
        setattr(model, SITES_ATTR, nn.ModuleList(IntMatmulSite(s) if isinstance(s, MatmulSite) else s for s in sites))
