"""Conformer-CTC encoder: `ConformerConfig`, named presets, and the model.

    feats [B, T, 80] -> input normalization -> Conv2d subsampling x4 -> N x ConformerBlock
    -> Linear CTC head -> logits [B, T', V]   (T' = ((T - 1) // 2 - 1) // 2)

A block is ½FFN -> MHSA with rotary position -> depthwise conv module -> ½FFN -> LayerNorm.
`logits` are pre-softmax scores: greedy CTC decoding is their argmax and training applies
log_softmax. Every matmul and convolution is a plain `nn.Linear`, `nn.Conv1d` or
`nn.Conv2d` reachable by name through `named_modules()`, so the QAT code can swap them.

Streaming: `chunk_size > 0` limits attention to the frame's own chunk and `left_chunks`
chunks before it (a chunked mask; -1 = all past chunks) and makes the depthwise convolution
causal, so the encoder can run chunk by chunk with bounded look-ahead.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.models.features import N_MELS
from nativeq.models.text import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 4
    conv_kernel: int = 15
    subsample_channels: int = 64
    n_mels: int = N_MELS
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.1
    chunk_size: int = 0  # attention chunk in subsampled frames (40 ms each); 0 = full context
    left_chunks: int = -1  # past chunks visible when chunk_size > 0; -1 = all
    rotary_base: float = 10000.0

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise NativeqError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.conv_kernel % 2 == 0:
            raise NativeqError(f"conv_kernel must be odd, got {self.conv_kernel}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ConformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NativeqError(f"unknown ConformerConfig field(s): {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, ConformerConfig] = {
    # NOTE: no dropout in tiny: it trains for a few epochs of heavily augmented data, and
    # dropout's mask sampling was 12% of a CPU training step.
    "conformer-tiny": ConformerConfig(d_model=144, n_layers=4, n_heads=4, ff_mult=4, conv_kernel=15, subsample_channels=32,
                                      dropout=0.0),
    "conformer-small": ConformerConfig(d_model=256, n_layers=8, n_heads=4, ff_mult=4, conv_kernel=31, subsample_channels=128),
}


def preset(name: str) -> ConformerConfig:
    if name not in PRESETS:
        raise NativeqError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 Conv2d over (time, mel), then a Linear to d_model: time / 4."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        c = cfg.subsample_channels
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=2)
        freq = ((cfg.n_mels - 1) // 2 - 1) // 2
        self.proj = nn.Linear(c * freq, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x.unsqueeze(1)))
        x = torch.relu(self.conv2(x))  # [B, C, T', F']
        b, c, t, f = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))


class FeedForward(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model)
        self.fc2 = nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(nn.functional.silu(self.fc1(self.norm(x))))))


def rotary_tables(t: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for rotary position embedding (pairs (i, i + head_dim/2))."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(t, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary position on queries and keys; explicit matmuls."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.norm = nn.LayerNorm(cfg.d_model)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)

        def heads(proj):
            return proj(h).reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        cos, sin = rotary_tables(t, self.head_dim, self.cfg.rotary_base, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask is not None:  # True = may attend
            scores = scores.masked_fill(~mask, -1e4)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, -1)
        return self.dropout(self.out_proj(out))


class ConvModule(nn.Module):
    """Pointwise Linear + GLU -> depthwise Conv1d -> LayerNorm -> SiLU -> pointwise Linear."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel
        self.causal = cfg.chunk_size > 0
        self.norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Linear(d, 2 * d)
        self.depthwise = nn.Conv1d(d, d, k, groups=d, padding=0)
        self.pad = (k - 1, 0) if self.causal else ((k - 1) // 2, (k - 1) // 2)
        self.conv_norm = nn.LayerNorm(d)
        self.pointwise2 = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        h = nn.functional.glu(self.pointwise1(self.norm(x)), dim=-1)
        if pad_mask is not None:  # zero padded frames so batching does not change the result
            h = h.masked_fill(~pad_mask[..., None], 0.0)
        h = nn.functional.pad(h.transpose(1, 2), self.pad)
        h = self.depthwise(h).transpose(1, 2)
        h = nn.functional.silu(self.conv_norm(h))
        return self.dropout(self.pointwise2(h))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.ff1 = FeedForward(cfg)
        self.attn = SelfAttention(cfg)
        self.conv = ConvModule(cfg)
        self.ff2 = FeedForward(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, attn_mask, pad_mask):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, attn_mask)
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


def attention_mask(t: int, cfg: ConformerConfig, lengths: torch.Tensor | None, device=None) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, T] mask (True = may attend): key padding and the streaming chunk limit."""
    mask = None
    if cfg.chunk_size > 0:
        chunk = torch.div(torch.arange(t, device=device), cfg.chunk_size, rounding_mode="floor")
        q, k = chunk[:, None], chunk[None, :]
        mask = k <= q
        if cfg.left_chunks >= 0:
            mask = mask & (k >= q - cfg.left_chunks)
        mask = mask[None, None]
    if lengths is not None:
        keys = (torch.arange(t, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


class ConformerCTC(nn.Module):
    """The encoder + CTC head. forward(feats [B,T,80], lengths [B] or None) -> (logits [B,T',V], lengths')."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.config = cfg
        # Global feature normalization, set from training data statistics (see train.py).
        self.register_buffer("feat_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("feat_inv_std", torch.ones(cfg.n_mels))
        self.subsample = ConvSubsampling(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None):
        x = (feats - self.feat_mean) * self.feat_inv_std
        x = self.dropout(self.subsample(x))
        out_lengths = None if lengths is None else subsampled_lengths(lengths).clamp_min(0)
        t = x.shape[1]
        attn_mask = attention_mask(t, self.config, out_lengths, x.device)
        pad_mask = None if out_lengths is None else torch.arange(t, device=x.device)[None, :] < out_lengths[:, None]
        for block in self.blocks:
            x = block(x, attn_mask, pad_mask)
        logits = self.head(x)
        return logits, out_lengths


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
