"""The float ops between integer layers, computed in eval mode as ONNX Runtime's CPU kernels compute them.

Where it sits: installed on the model by `quantize_` (beside the activation-product router
of `qat.matmul`), active whenever the QAT or converted model runs in eval mode; training
uses PyTorch's own kernels (and their gradients).

Why: every float island of a QDQ model (LayerNorm, Softmax, Sigmoid, Erf) ends in a
QuantizeLinear. PyTorch's kernels differ from MLAS's by an ulp in a good share of elements
(LayerNorm's summation order, Sleef's exp against MLAS's polynomials), and an ulp at a .5
rounding boundary flips an int8 value by one step, which then spreads through every later
layer (a 4-block Conformer: 96.5% of the head's int8 logits equal to ORT's). Computed with
MLAS's formulas, operation order and FMAs (the same ones `compile/passes/legalize_like_ort`
builds into the compiled kernels, constants in `nativeq/_ort_formulas.py`), the PyTorch
integer model, ONNX Runtime and the compiled artifact agree bit for bit.

    torch call                        ONNX op ORT runs            computed here as
    --------------------------------  --------------------------  ---------------------------------------
    F.layer_norm (last dims)          LayerNormalization          MLAS: float64 mean, 8-lane FMA variance
    torch.softmax / F.softmax         Softmax                     MLAS: its exp, 16-lane sum, * (1 / sum)
    torch.sigmoid / F.sigmoid         Sigmoid                     MLAS logistic (rational, FMA Horner)
    F.silu(x)                         Mul(x, Sigmoid(x))          x * logistic(x)
    F.glu(x, dim)                     Split, Sigmoid, Mul         a * logistic(b)
    torch.erf                         Erf                         MLAS erf (two polynomials, MLAS exp)
    torch.sin / torch.cos             Sin / Cos                   Eigen psincos_float (no FMA), packets of 4

`fma(a, b, c)` is evaluated in float64 and rounded to float32: a*b is exact in float64, so
it differs from a single-rounding FMA only by double rounding (about 1 in 2^29 operations).
LayerNorm rows whose length is not a multiple of 8 match in most but not all rows (measured:
n = 13 and 37 differ by an ulp in ~1% of rows; 4, 64, 100, 144, 288 in none; tested).
Cos/Sin (rotary position tables) follow Eigen's psincos_float without FMA, which ORT runs on
packets of 4; the last n % 4 elements of a tensor, which ORT sends to libm, and |x| beyond
Eigen's huge-argument thresholds keep PyTorch's kernel (the Conformer's tables have n % 4 == 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nativeq import _ort_formulas as ort


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _fma(a: torch.Tensor, b, c) -> torch.Tensor:
    """a * b + c rounded once (up to double rounding, see the module docstring)."""
    a64 = a.double()
    b64 = b.double() if isinstance(b, torch.Tensor) else _f32(b).double()
    c64 = c.double() if isinstance(c, torch.Tensor) else _f32(c).double()
    return (a64 * b64 + c64).float()


def _divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded once. NOTE: PyTorch turns a division by a scalar into a multiplication by its reciprocal."""
    return a / torch.full_like(a, b)


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root. NOTE: torch.sqrt on CPU is not (~15% of results are an ulp off)."""
    return torch.sqrt(a.double()).float()


def _horner(v: torch.Tensor, coefficients) -> torch.Tensor:
    """c0*v^n + ... + cn, every step one FMA (as MLAS's FMA3 kernels evaluate it)."""
    acc = torch.full_like(v, float(_f32(coefficients[0])))
    for coefficient in coefficients[1:]:
        acc = _fma(acc, v, coefficient)
    return acc


def logistic(x: torch.Tensor) -> torch.Tensor:
    """MLAS's sigmoid (MlasComputeLogistic)."""
    v = x.clamp(-ort.LOGISTIC_CLAMP, ort.LOGISTIC_CLAMP)
    v2 = v * v
    p = _horner(v2, ort.LOGISTIC_ALPHA) * v
    q = _horner(v2, ort.LOGISTIC_BETA)
    return (p / q + 0.5).clamp(0.0, 1.0)


def _mlas_exp(value: torch.Tensor, lower: float = ort.EXP_LOWER) -> tuple[torch.Tensor, torch.Tensor]:
    """MLAS's exp range reduction: (reduced argument, 2^n as float32 bits source `biased`)."""
    value = value.clamp(min=lower)
    biased = _fma(value, ort.EXP_LOG2E, ort.EXP_ROUNDING_BIAS)
    m = biased - ort.EXP_ROUNDING_BIAS
    reduced = _fma(m, ort.EXP_LN2_LOW, _fma(m, ort.EXP_LN2_HIGH, value))
    return reduced, biased


def _float_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding a 32-bit pattern (wrapped modulo 2^32) -> the float32 it encodes."""
    bits = bits & 0xFFFFFFFF
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _sum_exp_element(value: torch.Tensor) -> torch.Tensor:
    """exp(value) for value <= 0 as MLAS's MlasComputeSumExpVector computes it."""
    reduced, biased = _mlas_exp(value)
    scale = _float_from_bits(biased.view(torch.int32).to(torch.int64) * (1 << 23) + 0x3F800000)
    return _horner(reduced, ort.EXP_POLY) * scale


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """MLAS's softmax along `dim` (MlasComputeSoftmax, AVX-512F kernel)."""
    x = x.float().movedim(dim, -1)
    n, lanes = x.shape[-1], ort.SOFTMAX_LANES
    e = _sum_exp_element(x - x.amax(dim=-1, keepdim=True))
    chunks = -(-n // lanes)
    padded = F.pad(e, (0, chunks * lanes - n)).reshape(*e.shape[:-1], chunks, lanes)
    acc = padded[..., 0, :]
    for c in range(1, chunks):
        acc = acc + padded[..., c, :]
    a = [acc[..., i] + acc[..., i + lanes // 2] for i in range(lanes // 2)]
    while len(a) > 1:
        a = [a[2 * i] + a[2 * i + 1] for i in range(len(a) // 2)]
    return (e * (1.0 / a[0])[..., None]).movedim(-1, dim)


def erf(x: torch.Tensor) -> torch.Tensor:
    """MLAS's erf (MlasComputeErf, FMA3 kernel)."""
    magnitude = x.abs().clamp(max=ort.ERF_CLAMP)
    small = _fma(_horner(magnitude * magnitude, ort.ERF_SMALL), magnitude, magnitude)
    is_big = magnitude > ort.ERF_SPLIT
    big_input = torch.where(is_big, magnitude, torch.zeros_like(magnitude))
    big_poly = _fma(_horner(big_input, ort.ERF_BIG), big_input, big_input)
    reduced, biased = _mlas_exp(-big_poly)
    rounded = biased - ort.EXP_ROUNDING_BIAS
    power = _float_from_bits((rounded.to(torch.int64) + 127) * (1 << 23))
    big = 1.0 - _horner(reduced, ort.ERF_EXP) * power
    result = torch.where(is_big, big, small)
    return torch.where(x < 0, -result, result)


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """ORT's LayerNormalization over the trailing `normalized_shape` dims (MLAS's kernel for n >= 8)."""
    dims = len(tuple(normalized_shape))
    rows = x.reshape(*x.shape[: x.dim() - dims], -1).float()
    n = rows.shape[-1]
    gamma = torch.ones(n) if weight is None else weight.reshape(-1).float()
    beta = torch.zeros(n) if bias is None else bias.reshape(-1).float()
    if n < ort.LAYER_NORM_LANES:
        y = _layer_norm_welford(rows, gamma, beta, eps)
    else:
        mean = (rows.double().sum(-1, keepdim=True) / n).float()
        d = rows - mean
        lanes = ort.LAYER_NORM_LANES
        whole = n // lanes * lanes
        chunks = d[..., :whole].reshape(*d.shape[:-1], n // lanes, lanes)
        acc = torch.zeros_like(chunks[..., 0, :])
        for c in range(n // lanes):
            acc = _fma(chunks[..., c, :], chunks[..., c, :], acc)
        a = [acc[..., i] for i in range(lanes)]
        s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
        for i in range(whole, n):
            s = s + d[..., i] * d[..., i]
        inv = 1.0 / _sqrt(_divide(s, float(n)) + _f32(eps))
        y = _fma(d * inv[..., None], gamma, beta)
    return y.reshape(x.shape)


def _layer_norm_welford(rows: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    n = rows.shape[-1]
    mean = torch.zeros_like(rows[..., 0])
    m2 = torch.zeros_like(mean)
    for i in range(n):
        delta = rows[..., i] - mean
        mean = mean + _divide(delta, float(i + 1))
        m2 = m2 + delta * (rows[..., i] - mean)
    std = _sqrt(_divide(m2, float(n)) + _f32(eps))
    return (rows - mean[..., None]) / std[..., None] * gamma + beta


def _sincos(x: torch.Tensor, sine: bool) -> torch.Tensor:
    """Eigen's psincos_float without FMA (every multiply and add rounded), as ORT's Sin/Cos."""
    magnitude = x.abs()
    y_round = magnitude * ort.SINCOS_TWO_OVER_PI + ort.SINCOS_ROUNDING_MAGIC
    octant = y_round.view(torch.int32)
    y = y_round - ort.SINCOS_ROUNDING_MAGIC
    reduced = magnitude
    for piece in ort.SINCOS_REDUCTION:
        reduced = y * piece + reduced
    x2 = reduced * reduced

    def horner(coefficients):
        acc = torch.full_like(x, coefficients[0])
        for coefficient in coefficients[1:]:
            acc = acc * x2 + coefficient
        return acc

    cos_poly = horner(ort.SINCOS_COS_POLY)
    sin_poly = (horner(ort.SINCOS_SIN_POLY) * x2) * reduced + reduced
    even = (octant & 1) == 0
    if sine:
        result = torch.where(even, sin_poly, cos_poly)
        sign = x.view(torch.int32) ^ (octant << 30)
    else:
        result = torch.where(even, cos_poly, sin_poly)
        sign = (octant + 1) << 30
    eigen = (result.view(torch.int32) ^ (sign & -(2**31))).view(torch.float32)
    flat = torch.arange(x.numel(), device=x.device).reshape(x.shape)
    in_packet = (flat < x.numel() // ort.SINCOS_PACKET * ort.SINCOS_PACKET) & (magnitude < ort.SINCOS_HUGE["sin" if sine else "cos"])
    plain = torch.sin(x) if sine else torch.cos(x)  # the libm tail (inside the mode's handler: PyTorch's kernel)
    return torch.where(in_packet, eigen, plain)


def _glu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    a, b = x.chunk(2, dim=dim)
    return a * logistic(b)


def _softmax_call(x, dim=None, *args, **kwargs):
    if dim is None or kwargs.get("dtype") not in (None, torch.float32) or x.dtype != torch.float32:
        return None
    return softmax(x, dim)


def _layer_norm_call(x, normalized_shape, weight=None, bias=None, eps=1e-5, *args):
    return None if x.dtype != torch.float32 else layer_norm(x, normalized_shape, weight, bias, eps)


def _float32_only(fn):
    return lambda x, *args, **kwargs: fn(x, *args, **kwargs) if x.dtype == torch.float32 else None


_ROUTES = {
    F.layer_norm: _layer_norm_call,
    torch.layer_norm: _layer_norm_call,
    torch.softmax: _softmax_call,
    F.softmax: _softmax_call,
    torch.Tensor.softmax: _softmax_call,
    torch.sigmoid: _float32_only(logistic),
    F.sigmoid: _float32_only(logistic),
    torch.Tensor.sigmoid: _float32_only(logistic),
    F.silu: _float32_only(lambda x, inplace=False: x * logistic(x)),
    F.glu: _float32_only(_glu),
    torch.erf: _float32_only(erf),
    torch.Tensor.erf: _float32_only(erf),
    torch.sin: _float32_only(lambda x: _sincos(x.contiguous(), sine=True)),
    torch.Tensor.sin: _float32_only(lambda x: _sincos(x.contiguous(), sine=True)),
    torch.cos: _float32_only(lambda x: _sincos(x.contiguous(), sine=False)),
    torch.Tensor.cos: _float32_only(lambda x: _sincos(x.contiguous(), sine=False)),
}


class OrtFloatIslands(TorchFunctionMode):
    """While active, the float ops of `_ROUTES` are computed as ONNX Runtime computes them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            result = route(*args, **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)


def install_float_islands(model: nn.Module) -> None:
    """Run `model`'s float ops like ONNX Runtime whenever it is in eval mode (idempotent)."""
    if getattr(model, "_nativeq_island_hooks", None) is not None:
        return
    state: list[OrtFloatIslands] = []

    def enter(mod, args):
        # NOTE: an ONNX export (a trace) must record the plain ops (LayerNormalization, Softmax, ...)
        if not mod.training and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            mode = OrtFloatIslands()
            mode.__enter__()
            state.append(mode)

    def leave(mod, args, out):
        if state:
            state.pop().__exit__(None, None, None)

    model._nativeq_island_hooks = (model.register_forward_pre_hook(enter),
                                   model.register_forward_hook(leave, always_call=True))
