"""The integer numerics of nativeq, defined once.

Every other module (QAT layers, convert, the QDQ writer, the compiler's requantize tests)
takes its rounding, clipping and scale rules from here.

    quantity            bits  integer range   zero point  scale                          rounding
    ------------------  ----  --------------  ----------  -----------------------------  ----------------------------
    activation          8     [-128, 127]     0           absmax / 127 (EMA or LSQ)      half to even, then saturate
    weight              8     [-127, 127]     0           absmax / 127 per out channel   half to even, then saturate
    weight              4     [-7, 7]         0           absmax / 7   per out channel   half to even, then saturate
    weight              2     [-1, 1]         0           absmax / 1   per out channel   half to even, then saturate
    accumulator         32    int32           -           s_act * s_weight               exact (no rounding)
    layer output        8     [-128, 127]     0           absmax / 127 (EMA or LSQ)      half to even, then saturate

Optionally (QuantConfig.power_of_two_scales) every scale is rounded up to a power of two.
Then a QDQ graph's float arithmetic is exact: DequantizeLinear's products are exact, and a
float MatMul/Conv of dequantized operands sums exact multiples of s_x*s_w, so ONNX Runtime
(or any float QDQ executor) reproduces the integer accumulator bit for bit while
|acc| < 2^24, and requantization becomes a shift.

`q = saturate(round_half_even(x / scale))` is exactly ONNX `QuantizeLinear` with a zero
point of 0 (tested against ONNX Runtime on a table of ties); dequantization is `q * scale`.
Weights use the symmetric narrow range (no -2^(b-1)) so that negating a weight never
saturates; activations use the full int8 range as QuantizeLinear does. A scale is never
below `MIN_SCALE` (an all-zero channel gets MIN_SCALE and quantizes to zeros).
"""

from __future__ import annotations

import torch

from nativeq.errors import NativeqError

WEIGHT_BITS = (2, 4, 8)
ACT_BITS = (8,)
MIN_SCALE = 1e-8


def act_range(bits: int = 8) -> tuple[int, int]:
    """Integer range of an activation (full two's-complement range, as ONNX QuantizeLinear)."""
    check_act_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_range(bits: int) -> tuple[int, int]:
    """Integer range of a weight (symmetric narrow range)."""
    check_weight_bits(bits)
    q = 2 ** (bits - 1) - 1
    return -q, q


def check_weight_bits(bits: int) -> None:
    if bits not in WEIGHT_BITS:
        raise NativeqError(f"weight bits {bits} not supported (choose one of {', '.join(map(str, WEIGHT_BITS))})")


def check_act_bits(bits: int) -> None:
    if bits not in ACT_BITS:
        raise NativeqError(f"activation bits {bits} not supported (choose one of {', '.join(map(str, ACT_BITS))})")


def quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """`saturate(round_half_even(x / scale))` as a float tensor holding integers.

    `torch.round` rounds half to even; the division (not a multiplication by 1/scale)
    matches ONNX QuantizeLinear.
    """
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale


def scale_from_absmax(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(absmax.to(torch.float32) / qmax, min=MIN_SCALE)


def power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (so nothing inside absmax saturates)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def weight_scale(weight: torch.Tensor, bits: int, pow2: bool = False) -> torch.Tensor:
    """Per-output-channel scale (dim 0) from the absolute maximum of each channel."""
    _, qmax = weight_range(bits)
    absmax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    scale = scale_from_absmax(absmax, qmax)
    return power_of_two(scale) if pow2 else scale


class _QuantizeSTE(torch.autograd.Function):
    """Round + saturate with a straight-through estimator and a clipping mask.

    d q / d x = 1/scale where qmin <= x/scale <= qmax, else 0.
    d q / d scale (LSQ) = -x/scale^2 inside the range, 0 outside; combined with the
    dequantization `q * scale` downstream this yields LSQ's (q - x/s) inside and
    qmin/qmax outside.
    """

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        v = x / scale
        inside = (v >= qmin) & (v <= qmax)
        ctx.save_for_backward(x, scale, inside)
        return torch.clamp(torch.round(v), qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, inside = ctx.saved_tensors
        g = grad * inside
        grad_x = g / scale
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = -(g * x) / (scale * scale)
            # reduce to the scale's (broadcast) shape
            while grad_scale.dim() > scale.dim():
                grad_scale = grad_scale.sum(0)
            for d, n in enumerate(scale.shape):
                if n == 1 and grad_scale.shape[d] != 1:
                    grad_scale = grad_scale.sum(d, keepdim=True)
        return grad_x, grad_scale, None, None


def quantize_ste(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """`quantize` in the forward pass, straight-through (with clipping mask) in the backward pass."""
    return _QuantizeSTE.apply(x, scale, qmin, qmax)


# ---------------------------------------------------------------- integer products

def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact `a[M, K] @ b[K, N]` of int8 operands with int32 accumulation (`torch._int_mm`)."""
    assert a.dtype == torch.int8 and b.dtype == torch.int8
    return torch._int_mm(a.contiguous(), b.contiguous())


def int_grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact `a[G, M, K] @ b[G, K, N]` of int8 operands, int32 accumulation (batched int32 GEMM)."""
    assert a.dtype == torch.int8 and b.dtype == torch.int8
    if a.shape[0] == 1:
        return int_matmul(a[0], b[0]).unsqueeze(0)
    return torch.bmm(a.to(torch.int32), b.to(torch.int32))


def accumulator_to_float(acc: torch.Tensor, input_scale: torch.Tensor, weight_scale_: torch.Tensor) -> torch.Tensor:
    """Rescale an int32 accumulator by the two scales (float32, as a QDQ graph would)."""
    return acc.to(torch.float32) * (input_scale * weight_scale_)


# ---------------------------------------------------------------- packing for storage

def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers of `bits` (8, 4 or 2) into uint8 bytes, low nibble first (ONNX INT4 order).

    8-bit values are returned as int8 unchanged. The flat length is padded with zeros.
    """
    check_weight_bits(bits)
    flat = q.reshape(-1).to(torch.int16)
    if bits == 8:
        return flat.to(torch.int8)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    mask = (1 << bits) - 1
    u = (flat & mask).reshape(-1, per_byte)
    out = torch.zeros(u.shape[0], dtype=torch.int16)
    for i in range(per_byte):
        out |= u[:, i] << (bits * i)
    return out.to(torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_int`: signed int8 tensor of `shape`."""
    check_weight_bits(bits)
    n = 1
    for s in shape:
        n *= s
    if bits == 8:
        return packed.to(torch.int8).reshape(shape)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int16)
    parts = [(p >> (bits * i)) & mask for i in range(per_byte)]
    u = torch.stack(parts, dim=1).reshape(-1)[:n]
    signed = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return signed.to(torch.int8).reshape(shape)
