"""Small PyTorch speech models written from the public papers, with seeded random weights.

The zoo is about operators and fusion patterns, not accuracy: every module here is an
edge-ASR-sized instance (d_model 144, 4 heads, ff 576, 2 blocks; conv channels 64-256) of a
published architecture, built deterministically from a seed. Inputs are log-mel features
[1, T, 80] (waveform [1, S] for the wav2vec2 feature extractor, the separator and the VAD, MFCC
[1, 1, 49, 10] for the DS-CNN keyword spotter, log-mel [1, 1, T, 40] for the MobileNetV3 one, feature frames [1, T, 144] for the HuBERT encoder); `export_float_onnx` writes the TorchScript
ONNX export (opset 17) with the time axis symbolic.

Papers: Vaswani et al. 2017 (transformer, post-norm) and Xiong et al. 2020 (pre-norm);
Gulati et al. 2020 (Conformer); Kriman et al. 2020 (QuartzNet) and Majumdar et al. 2021
(Citrinet squeeze-excite); Zhang et al. 2017 "Hello Edge" (DS-CNN); Graves et al. 2013
(LSTM acoustic model); Radford et al. 2022 (Whisper encoder); Baevski et al. 2020 (wav2vec 2.0
feature encoder); Howard et al. 2019 (MobileNetV3); Silero Team 2021 (Silero VAD, v4/v5
architecture); Hsu et al. 2021 (HuBERT, the wav2vec 2.0 transformer encoder).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

N_MELS = 80
D_MODEL = 144
HEADS = 4
FF_DIM = 576
VOCAB = 32


# ----------------------------------------------------------------------------- shared pieces
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """CTC-style output: log-softmax over the vocabulary (last axis)."""
    return torch.log_softmax(logits, dim=-1)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Whisper's fixed positional table [length, dim]: sin on the first half, cos on the second."""
    log_timescale = math.log(10000) / (dim // 2 - 1)
    inv_timescales = torch.exp(-log_timescale * torch.arange(dim // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def randomize_batchnorm_(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm plausible trained statistics (fresh ones are an identity map)."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)


class ConvStem(nn.Module):
    """Conv1d subsampling, stride 2, to d_model: [1, T, 80] -> [1, ceil(T/2), d]."""

    def __init__(self, d: int = D_MODEL):
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, d, kernel_size=3, stride=2, padding=1)

    def forward(self, feats):
        return torch.relu(self.conv(feats.transpose(1, 2))).transpose(1, 2)


class StemBlocksHead(nn.Module):
    """An encoder as a stem, a stack of blocks and a linear head to log-probabilities; subclasses build
    `self.stem`, `self.blocks` and `self.head`, in that order (the order the seeded weights are drawn in)."""

    def forward(self, feats):
        x = self.stem(feats)
        for block in self.blocks:
            x = block(x)
        return log_probs(self.head(x))


# ----------------------------------------------------------------------------- transformer (torch.nn)
class TransformerCTC(StemBlocksHead):
    """Conv stem + torch.nn.TransformerEncoderLayer blocks (GELU) + linear head + log-softmax."""

    def __init__(self, norm_first: bool, blocks: int = 2):
        super().__init__()
        self.stem = ConvStem()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(D_MODEL, HEADS, FF_DIM, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first)
            for _ in range(blocks)
        )
        self.head = nn.Linear(D_MODEL, VOCAB)


# ----------------------------------------------------------------------------- conformer
class FeedForward(nn.Module):
    """Conformer macaron half: LayerNorm -> Linear -> SiLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.fc1, self.fc2 = nn.Linear(D_MODEL, FF_DIM), nn.Linear(FF_DIM, D_MODEL)

    def forward(self, x):
        return self.fc2(nn.functional.silu(self.fc1(self.norm(x))))


class ConvModule(nn.Module):
    """LayerNorm -> pointwise conv (2d) -> GLU -> depthwise Conv1d k=15 -> BatchNorm -> SiLU -> pointwise conv."""

    def __init__(self, kernel: int = 15):
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.pointwise1 = nn.Conv1d(D_MODEL, 2 * D_MODEL, 1)
        self.depthwise = nn.Conv1d(D_MODEL, D_MODEL, kernel, padding=kernel // 2, groups=D_MODEL)
        self.batch_norm = nn.BatchNorm1d(D_MODEL)
        self.pointwise2 = nn.Conv1d(D_MODEL, D_MODEL, 1)

    def forward(self, x):  # [1, T, d]
        h = nn.functional.glu(self.pointwise1(self.norm(x).transpose(1, 2)), dim=1)
        h = nn.functional.silu(self.batch_norm(self.depthwise(h)))
        return self.pointwise2(h).transpose(1, 2)


class ConformerBlock(nn.Module):
    """x + FFN/2, x + MHSA, x + conv, x + FFN/2, LayerNorm (Gulati et al. 2020, fig. 1)."""

    def __init__(self):
        super().__init__()
        self.ff1, self.ff2 = FeedForward(), FeedForward()
        self.attn_norm = nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, dropout=0.0, batch_first=True)
        self.conv = ConvModule()
        self.final_norm = nn.LayerNorm(D_MODEL)

    def attend(self, h):
        return self.attn(h, h, h, need_weights=False)[0]

    def forward(self, x):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attend(self.attn_norm(x))
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class ConformerCTC(StemBlocksHead):
    """Linear stem + Conformer blocks + linear head + log-softmax (full frame rate)."""

    def __init__(self, blocks: int = 2, block=None):
        super().__init__()
        self.stem = nn.Linear(N_MELS, D_MODEL)
        self.blocks = nn.ModuleList((block or ConformerBlock)() for _ in range(blocks))
        self.head = nn.Linear(D_MODEL, VOCAB)


# ----------------------------------------------------------------------------- relative-position Conformer
class RelPositionAttention(nn.Module):
    """Multi-head self-attention with relative positions (Transformer-XL, Dai et al. 2019; ESPnet / NeMo
    RelPositionMultiHeadedAttention): 2T-1 sinusoidal relative positions computed in the graph from the input's
    length, a position projection, learned content and position biases (u, v), content scores as `torch.einsum`
    (Transformer-XL's code), position scores as a matmul against the position table shared by every batch entry,
    aligned by `rel_shift` (a zero column, a reshape to [2T, T], the first row dropped)."""

    def __init__(self):
        super().__init__()
        self.d_k = D_MODEL // HEADS
        self.query, self.key, self.value = (nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
        self.position = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.content_bias = nn.Parameter(0.1 * torch.randn(HEADS, self.d_k))
        self.position_bias = nn.Parameter(0.1 * torch.randn(HEADS, self.d_k))

    @staticmethod
    def relative_positions(frames: int) -> torch.Tensor:
        """[2T-1, D_MODEL]: sin / cos of the offsets T-1 .. -(T-1)."""
        offsets = torch.arange(frames - 1, -frames, -1.0).unsqueeze(1)
        inverse_frequency = torch.exp(torch.arange(0, D_MODEL, 2).float() * (-math.log(10000.0) / D_MODEL))
        return torch.cat([torch.sin(offsets * inverse_frequency), torch.cos(offsets * inverse_frequency)], dim=1)

    @staticmethod
    def rel_shift(scores):  # [B, H, T, 2T-1] -> [B, H, T, T]
        b, h, t, n = scores.shape
        padded = torch.cat([scores.new_zeros(b, h, t, 1), scores], dim=-1).view(b, h, n + 1, t)
        return padded[:, :, 1:].view(b, h, t, n)[:, :, :, : n // 2 + 1]

    def forward(self, x):  # [B, T, d]
        b, t, _ = x.shape
        q = self.query(x).view(b, t, HEADS, self.d_k)
        k = self.key(x).view(b, t, HEADS, self.d_k)
        v = self.value(x).view(b, t, HEADS, self.d_k)
        p = self.position(self.relative_positions(t)).view(-1, HEADS, self.d_k).permute(1, 2, 0)  # [H, d_k, 2T-1]
        content = torch.einsum("bind,bjnd->bnij", q + self.content_bias, k)
        position = self.rel_shift(torch.matmul((q + self.position_bias).transpose(1, 2), p))
        weights = ((content + position) / math.sqrt(self.d_k)).softmax(dim=-1)
        return self.out(torch.einsum("bnij,bjnd->bind", weights, v).reshape(b, t, D_MODEL))


class RelPositionConformerBlock(ConformerBlock):
    """The Conformer block with relative-position self-attention (Gulati et al. 2020 use Transformer-XL's)."""

    def __init__(self):
        super().__init__()
        self.attn = RelPositionAttention()

    def attend(self, h):
        return self.attn(h)


# ----------------------------------------------------------------------------- QuartzNet / Citrinet
class SqueezeExcite(nn.Module):
    """Citrinet SE: mean over time -> Linear -> ReLU -> Linear -> sigmoid -> channel scale."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, channels // reduction), nn.Linear(channels // reduction, channels)

    def forward(self, x):  # [1, C, T]
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SeparableConv(nn.Module):
    """Depthwise Conv1d (kernel k, 'same' padding) -> pointwise Conv1d -> BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv1d(c_in, c_in, kernel, stride=stride, padding=kernel // 2, groups=c_in, bias=False)
        self.pointwise = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.batch_norm = nn.BatchNorm1d(c_out)

    def forward(self, x):
        return self.batch_norm(self.pointwise(self.depthwise(x)))


class QuartzBlock(nn.Module):
    """R separable convs (ReLU between them); the residual (pointwise + BN) joins before the last ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, repeat: int = 2, squeeze_excite: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(SeparableConv(c_in if i == 0 else c_out, c_out, kernel) for i in range(repeat))
        self.se = SqueezeExcite(c_out) if squeeze_excite else None
        self.residual = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))

    def forward(self, x):
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
        if self.se is not None:
            h = self.se(h)
        return torch.relu(h + self.residual(x))


class QuartzNetCTC(nn.Module):
    """C1 (separable k=33, stride 2) -> blocks k=33, 39, 51 (+SE) -> C2 (k=63) -> C3 (1x1) -> C4 (1x1 to vocab)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.c1 = SeparableConv(N_MELS, channels, 33, stride=2)
        self.blocks = nn.ModuleList([
            QuartzBlock(channels, channels, 33),
            QuartzBlock(channels, 192, 39),
            QuartzBlock(192, 192, 51, squeeze_excite=True),
        ])
        self.c2 = SeparableConv(192, 256, 63)
        self.c3 = nn.Sequential(nn.Conv1d(256, 256, 1, bias=False), nn.BatchNorm1d(256))
        self.c4 = nn.Conv1d(256, VOCAB, 1)

    def forward(self, feats):
        x = torch.relu(self.c1(feats.transpose(1, 2)))
        for block in self.blocks:
            x = block(x)
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        return log_probs(self.c4(x).transpose(1, 2))


# ----------------------------------------------------------------------------- DS-CNN keyword spotting
class DepthwiseSeparable2d(nn.Module):
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.pointwise(torch.relu(self.bn1(self.depthwise(x))))))


class DSCNN(nn.Module):
    """DS-CNN-S (Zhang et al. 2017): MFCC [1, 1, 49, 10] -> conv 10x4 /2 -> 4 DS blocks -> avg pool -> 12 classes."""

    def __init__(self, channels: int = 64, classes: int = 12):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1), bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*(DepthwiseSeparable2d(channels) for _ in range(4)))
        self.fc = nn.Linear(channels, classes)

    def forward(self, mfcc):
        x = self.blocks(torch.relu(self.bn(self.conv(mfcc))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- recurrent acoustic models
class RecurrentCTC(nn.Module):
    """2-layer unidirectional LSTM or GRU (hidden 256) + linear head + log-softmax."""

    def __init__(self, cell: str, hidden: int = 256, layers: int = 2):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(N_MELS, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, feats):
        return log_probs(self.head(self.rnn(feats)[0]))


# ----------------------------------------------------------------------------- Whisper encoder
class WhisperAttention(nn.Module):
    """Whisper's MHSA: separate q/k/v projections (k without bias), q and k each scaled by dh^-1/4."""

    def __init__(self):
        super().__init__()
        self.query, self.key = nn.Linear(D_MODEL, D_MODEL), nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.value, self.out = nn.Linear(D_MODEL, D_MODEL), nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        b, t, d = x.shape
        dh = d // HEADS
        scale = dh ** -0.25

        def heads(z):
            return z.reshape(b, t, HEADS, dh).transpose(1, 2)

        q, k, v = heads(self.query(x)) * scale, heads(self.key(x)) * scale, heads(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class WhisperBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_ln, self.attn = nn.LayerNorm(D_MODEL), WhisperAttention()
        self.mlp_ln = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, FF_DIM), nn.GELU(), nn.Linear(FF_DIM, D_MODEL))

    def forward(self, x):
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Conv1d k3 + GELU, Conv1d k3 /2 + GELU, + sinusoidal positions, pre-norm blocks, final LayerNorm."""

    def __init__(self, blocks: int = 2, max_frames: int = 1500):
        super().__init__()
        self.conv1 = nn.Conv1d(N_MELS, D_MODEL, 3, padding=1)
        self.conv2 = nn.Conv1d(D_MODEL, D_MODEL, 3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoid_table(max_frames, D_MODEL))
        self.blocks = nn.ModuleList(WhisperBlock() for _ in range(blocks))
        self.ln_post = nn.LayerNorm(D_MODEL)

    def forward(self, feats):
        x = nn.functional.gelu(self.conv1(feats.transpose(1, 2)))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


# ----------------------------------------------------------------------------- wav2vec 2.0 feature encoder
class Wav2Vec2FeatureExtractor(nn.Module):
    """7 strided Conv1d (no bias), GroupNorm(C, C) after the first, GELU after each; LayerNorm + projection."""

    KERNELS = (10, 3, 3, 3, 3, 2, 2)
    STRIDES = (5, 2, 2, 2, 2, 2, 2)

    def __init__(self, channels: int = 128, out_dim: int = D_MODEL):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(1 if i == 0 else channels, channels, k, stride=s, bias=False)
            for i, (k, s) in enumerate(zip(self.KERNELS, self.STRIDES))
        )
        self.group_norm = nn.GroupNorm(channels, channels)
        self.layer_norm = nn.LayerNorm(channels)
        self.projection = nn.Linear(channels, out_dim)

    def forward(self, waveform):  # [1, S]
        x = waveform.unsqueeze(1)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == 0:
                x = self.group_norm(x)
            x = nn.functional.gelu(x)
        return self.projection(self.layer_norm(x.transpose(1, 2)))


# ----------------------------------------------------------------------------- Conv-TasNet-style separator
class TasNetBlock(nn.Module):
    """1x1 conv, PReLU, GroupNorm(1, C) (global layer norm), dilated depthwise conv, PReLU, gLN, 1x1 conv; residual."""

    def __init__(self, channels: int, hidden: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, hidden, 1), nn.PReLU(), nn.GroupNorm(1, hidden),
            nn.Conv1d(hidden, hidden, 3, padding=dilation, dilation=dilation, groups=hidden), nn.PReLU(),
            nn.GroupNorm(1, hidden), nn.Conv1d(hidden, channels, 1))

    def forward(self, x):
        return x + self.body(x)


class ConvTasNet(nn.Module):
    """Waveform in, one masked source out: strided Conv1d encoder (16 taps, stride 8), a bottleneck, 4 TCN blocks
    (dilations 1-8), a sigmoid mask on the encoding, ConvTranspose1d decoder back to the waveform."""

    def __init__(self, filters: int = 128, channels: int = 64, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Conv1d(1, filters, 16, stride=8, bias=False)
        self.bottleneck = nn.Conv1d(filters, channels, 1)
        self.blocks = nn.Sequential(*(TasNetBlock(channels, hidden, d) for d in (1, 2, 4, 8)))
        self.mask = nn.Conv1d(channels, filters, 1)
        self.decoder = nn.ConvTranspose1d(filters, 1, 16, stride=8, bias=False)

    def forward(self, waveform):  # [1, S]
        encoded = self.encoder(waveform.unsqueeze(1)).relu()
        masked = encoded * torch.sigmoid(self.mask(self.blocks(self.bottleneck(encoded))))
        return self.decoder(masked).squeeze(1)


# ----------------------------------------------------------------------------- ResNet speaker embedding
class BasicBlock(nn.Module):
    """Two 3x3 Conv2d + BatchNorm, ReLU; a strided 1x1 conv + BatchNorm on the shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetSpeaker(nn.Module):
    """Log-mel [1, T, 80] -> Conv2d stem + MaxPool, 3 basic blocks (16, 32 /2, 64 /2 channels), mean over time,
    Linear -> a 128-dim speaker embedding."""

    def __init__(self, embedding: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64 * 10, embedding)

    def forward(self, feats):  # [1, T, 80]
        x = self.blocks(self.stem(feats.unsqueeze(1)))  # [1, 64, T/8, 10]
        return self.head(x.mean(2).flatten(1))


# ----------------------------------------------------------------------------- MobileNetV3 keyword spotting
class HardSqueezeExcite(nn.Module):
    """MobileNetV3 SE: global average pool -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid -> channel scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(pooled))))


class InvertedResidual(nn.Module):
    """MobileNetV3 bneck: 1x1 expand + BN + act, depthwise 3x3 (stride s) + BN + act, squeeze-excite, linear
    1x1 projection + BN; the input is added back where stride and channels allow it."""

    def __init__(self, c_in: int, expand: int, c_out: int, stride: int, activation: str):
        super().__init__()
        act = {"relu": nn.ReLU, "hswish": nn.Hardswish}[activation]
        self.expand = nn.Sequential(nn.Conv2d(c_in, expand, 1, bias=False), nn.BatchNorm2d(expand), act())
        self.depthwise = nn.Sequential(nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
                                       nn.BatchNorm2d(expand), act())
        self.se = HardSqueezeExcite(expand, expand // 4)
        self.project = nn.Sequential(nn.Conv2d(expand, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = self.project(self.se(self.depthwise(self.expand(x))))
        return x + h if self.residual else h


class MobileNetV3KWS(nn.Module):
    """MobileNetV3-small-style keyword spotter (Howard et al. 2019) on log-mel [1, 1, T, 40]: Conv2d 3x3 /2 + BN +
    Hardswish, 4 bnecks (ReLU, /2; ReLU, residual; Hardswish, /2; Hardswish, residual), 1x1 conv + BN + Hardswish,
    global average pool over time and frequency, Linear to 12 classes."""

    BLOCKS = ((16, 64, 24, 2, "relu"), (24, 72, 24, 1, "relu"), (24, 96, 40, 2, "hswish"), (40, 120, 40, 1, "hswish"))

    def __init__(self, last: int = 128, classes: int = 12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(*(InvertedResidual(*cfg) for cfg in self.BLOCKS))
        self.last = nn.Sequential(nn.Conv2d(self.BLOCKS[-1][2], last, 1, bias=False), nn.BatchNorm2d(last),
                                  nn.Hardswish())
        self.fc = nn.Linear(last, classes)

    def forward(self, feats):  # [1, 1, T, 40]
        x = self.last(self.blocks(self.stem(feats)))  # [1, 128, T/8, 5]
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- Silero-VAD-style detector
def stft_basis(filter_length: int) -> torch.Tensor:
    """A periodic-Hann-windowed real DFT as Conv1d weights [2 * (n/2 + 1), 1, n]: the cosines (real parts) of bins
    0..n/2, then the negated sines (imaginary parts)."""
    n = torch.arange(filter_length, dtype=torch.float64)
    k = torch.arange(filter_length // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / filter_length
    window = torch.hann_window(filter_length, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    return basis.unsqueeze(1).float()


class SileroVAD(nn.Module):
    """Silero-VAD-style voice activity detector on 16 kHz audio [1, S]: an STFT as a strided Conv1d with a fixed
    DFT basis (256 taps, hop 128: 129 bins), magnitude sqrt(re^2 + im^2), 4 Conv1d k3 + ReLU (the second /2), a
    1-layer LSTM (64), Linear + sigmoid: a speech probability per 16 ms frame [1, T_out]."""

    FILTER, HOP = 256, 128

    def __init__(self, channels: tuple = (128, 64, 64, 64), hidden: int = 64):
        super().__init__()
        self.bins = self.FILTER // 2 + 1
        self.register_buffer("stft_basis", stft_basis(self.FILTER))
        widths = (self.bins, *channels)
        self.convs = nn.ModuleList(nn.Conv1d(c_in, c_out, 3, stride=2 if i == 1 else 1, padding=1)
                                   for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])))
        for conv in self.convs:  # He init: with no BatchNorm to rescale, torch's default init shrinks the signal
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # ~3x per ReLU conv (a constant output)
        self.lstm = nn.LSTM(channels[-1], hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, waveform):  # [1, S]
        spectrum = nn.functional.conv1d(waveform.unsqueeze(1), self.stft_basis, stride=self.HOP)
        real, imag = spectrum[:, :self.bins], spectrum[:, self.bins:]
        x = torch.sqrt(real * real + imag * imag)
        for conv in self.convs:
            x = torch.relu(conv(x))
        return torch.sigmoid(self.head(self.lstm(x.transpose(1, 2))[0])).squeeze(-1)


# ----------------------------------------------------------------------------- HuBERT / wav2vec 2.0 encoder
class HubertEncoder(nn.Module):
    """The HuBERT / wav2vec 2.0 transformer encoder on feature frames [1, T, 144]: feature projection (LayerNorm +
    Linear), the convolutional positional embedding (grouped Conv1d k31, 16 groups, GELU; HF drops the last frame
    only for an even kernel) added to its input, LayerNorm, 2 post-norm nn.TransformerEncoderLayer (GELU),
    Linear head to the vocabulary."""

    def __init__(self, blocks: int = 2, pos_kernel: int = 31, pos_groups: int = 16):
        super().__init__()
        self.feature_norm = nn.LayerNorm(D_MODEL)
        self.feature_projection = nn.Linear(D_MODEL, D_MODEL)
        self.pos_conv = nn.Conv1d(D_MODEL, D_MODEL, pos_kernel, padding=pos_kernel // 2, groups=pos_groups)
        self.trim = 1 if pos_kernel % 2 == 0 else 0
        self.norm = nn.LayerNorm(D_MODEL)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(D_MODEL, HEADS, FF_DIM, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(blocks)
        )
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, features):  # [1, T, 144]
        x = self.feature_projection(self.feature_norm(features))
        position = self.pos_conv(x.transpose(1, 2))
        if self.trim:
            position = position[:, :, :-self.trim]
        x = self.norm(x + nn.functional.gelu(position).transpose(1, 2))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# ----------------------------------------------------------------------------- U-Net speech enhancer
class UNetEnhancer(nn.Module):
    """Spectral-mask U-Net on a magnitude spectrogram [1, 1, T, 64]: 3 stride-2 Conv2d (LeakyReLU, BatchNorm), 3
    ConvTranspose2d k4 s2 (BatchNorm, PReLU per channel), skip connections concatenated along the channels, a
    sigmoid mask times the input. T a multiple of 8 (the skips' lengths must meet)."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.LeakyReLU(0.2))
        self.e2 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2))
        self.e3 = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2))
        self.d3 = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.PReLU(64))
        self.d2 = nn.Sequential(nn.ConvTranspose2d(128, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.PReLU(32))
        self.d1 = nn.ConvTranspose2d(64, 1, 4, 2, 1)

    def forward(self, spec):
        e1 = self.e1(spec)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        d = self.d2(torch.cat([self.d3(e3), e2], dim=1))
        return spec * torch.sigmoid(self.d1(torch.cat([d, e1], dim=1)))


# ----------------------------------------------------------------------------- ECAPA-TDNN speaker embedding
class ChannelSqueezeExcite(nn.Module):
    """Squeeze-excite over time: mean, 1x1 Conv1d + ReLU, 1x1 Conv1d + sigmoid, channel gate."""

    def __init__(self, c: int, bottleneck: int = 64):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(c, bottleneck, 1), nn.Conv1d(bottleneck, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=2, keepdim=True)))))


class Res2Conv1d(nn.Module):
    """Res2Net's hierarchical conv: 4 channel chunks, each after the first a dilated Conv1d (ReLU, BatchNorm) of
    itself plus the previous chunk's output, concatenated back along the channels."""

    def __init__(self, c: int, kernel: int, dilation: int, scale: int = 4):
        super().__init__()
        self.scale, width = scale, c // scale
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, dilation=dilation, padding=dilation * (kernel // 2))
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(scale - 1))

    def forward(self, x):
        chunks = torch.chunk(x, self.scale, dim=1)
        out, y = [chunks[0]], None
        for i in range(1, self.scale):
            y = self.bns[i - 1](torch.relu(self.convs[i - 1](chunks[i] if y is None else chunks[i] + y)))
            out.append(y)
        return torch.cat(out, dim=1)


class SERes2Block(nn.Module):
    def __init__(self, c: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 1), nn.BatchNorm1d(c)
        self.res2 = Res2Conv1d(c, kernel, dilation)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 1), nn.BatchNorm1d(c)
        self.se = ChannelSqueezeExcite(c)

    def forward(self, x):
        y = self.bn2(torch.relu(self.conv2(self.res2(self.bn1(torch.relu(self.conv1(x)))))))
        return x + self.se(y)


class AttentiveStatsPool(nn.Module):
    """ECAPA's channel- and context-dependent attentive statistics pooling: attention weights over time from the
    frames and their global mean and std, then the weighted mean and std."""

    def __init__(self, c: int, attention: int = 64):
        super().__init__()
        self.att1, self.bn, self.att2 = nn.Conv1d(3 * c, attention, 1), nn.BatchNorm1d(attention), nn.Conv1d(attention, c, 1)

    def forward(self, x):  # [1, C, T]
        mean = x.mean(dim=2, keepdim=True)
        std = torch.sqrt(torch.clamp(x.var(dim=2, keepdim=True, unbiased=False), min=1e-4))
        context = torch.cat([x, mean.expand_as(x), std.expand_as(x)], dim=1)
        w = torch.softmax(self.att2(torch.tanh(self.bn(torch.relu(self.att1(context))))), dim=2)
        mu = torch.sum(x * w, dim=2)
        sigma = torch.sqrt(torch.clamp(torch.sum(x * x * w, dim=2) - mu * mu, min=1e-4))
        return torch.cat([mu, sigma], dim=1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN on MFCC-like frames [1, 80, T]: Conv1d k5, 3 SE-Res2Net blocks (dilation 2, 3, 4), their outputs
    concatenated into a 1x1 Conv1d, attentive statistics pooling, Linear to a 192-d embedding (BatchNorms between)."""

    def __init__(self, c: int = 128, embedding: int = 192):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(N_MELS, c, 5, padding=2), nn.BatchNorm1d(c)
        self.blocks = nn.ModuleList([SERes2Block(c, 3, 2), SERes2Block(c, 3, 3), SERes2Block(c, 3, 4)])
        self.mfa = nn.Conv1d(3 * c, 3 * c, 1)
        self.pool, self.bn_pool = AttentiveStatsPool(3 * c), nn.BatchNorm1d(6 * c)
        self.fc, self.bn_embedding = nn.Linear(6 * c, embedding), nn.BatchNorm1d(embedding)

    def forward(self, feats):
        x = self.bn(torch.relu(self.conv(feats)))
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.bn_pool(self.pool(torch.relu(self.mfa(torch.cat(outs, dim=1)))))
        return self.bn_embedding(self.fc(x))


# ----------------------------------------------------------------------------- construction and export
def seeded(factory, seed: int) -> nn.Module:
    """`factory()` with weights drawn from `seed` (global RNG state is left untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
        randomize_batchnorm_(module, torch.Generator().manual_seed(seed + 1))
    return module.eval()


@dataclass(frozen=True)
class OnnxIO:
    """Names and axes of an exported graph: `dynamic_axes` as torch.onnx.export takes it."""

    input_name: str
    output_name: str
    dynamic_axes: dict


def _packed_projection_as_split(q, k, v, w, b=None):
    """torch 1.x's self-attention in-projection: one packed Linear, then a 3-way Split."""
    if q is k and k is v:
        return nn.functional.linear(q, w, b).chunk(3, dim=-1)
    return _TORCH_PACKED_PROJECTION(q, k, v, w, b)


_TORCH_PACKED_PROJECTION = nn.functional._in_projection_packed


@contextlib.contextmanager
def _exportable_attention():
    """Trace nn.TransformerEncoderLayer / nn.MultiheadAttention into ops the TorchScript exporter handles.

    - In eval mode without grad they dispatch to `aten::_transformer_encoder_layer_fwd`, which the
      exporter refuses (UnsupportedOperatorError at opset 17): the fast path is turned off.
    - NOTE: torch 2.13 splits the packed QKV projection with unflatten/transpose/squeeze/index; the
      exporter's shape inference then freezes the key length at the example's length (a Reshape to
      [T_example, 4, 36] fails at any other T). The projection is traced as torch 1.x did it (one
      MatMul + Split): the same numbers, and the time axis stays symbolic.
    """
    was_enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    nn.functional._in_projection_packed = _packed_projection_as_split
    try:
        yield
    finally:
        nn.functional._in_projection_packed = _TORCH_PACKED_PROJECTION
        torch.backends.mha.set_fastpath_enabled(was_enabled)


def export_float_onnx(module: nn.Module, example: torch.Tensor, io_names: OnnxIO, opset: int = 17) -> bytes:
    """TorchScript ONNX export (dynamo=False) of `module` on `example`; returns the serialized model."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _exportable_attention():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[io_names.input_name], output_names=[io_names.output_name],
            dynamic_axes=io_names.dynamic_axes or None,
        )
    return buf.getvalue()


def export_dynamo_onnx(module: nn.Module, example: torch.Tensor, input_name: str, symbolic: dict[int, str],
                       opset: int = 18) -> bytes:
    """`torch.onnx.export(dynamo=True)` of `module` (the exporter torch uses by default), the axes named in
    `symbolic` (axis -> name) dynamic from a quarter of the example's size up; returns the serialized model."""
    dims = {axis: torch.export.Dim(name, min=max(2, example.shape[axis] // 4), max=example.shape[axis] * 100)
            for axis, name in symbolic.items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name], opset_version=opset,
                                    dynamic_shapes={input_name: dims} if dims else None, verbose=False)
    return program.model_proto.SerializeToString()


BUILDERS = {
    "transformer_postnorm": lambda: TransformerCTC(norm_first=False),
    "transformer_prenorm": lambda: TransformerCTC(norm_first=True),
    "conformer": ConformerCTC,
    "relpos_conformer": lambda: ConformerCTC(block=RelPositionConformerBlock),
    "quartznet": QuartzNetCTC,
    "dscnn_kws": DSCNN,
    "lstm_am": lambda: RecurrentCTC("lstm"),
    "gru_am": lambda: RecurrentCTC("gru"),
    "whisper_encoder": WhisperEncoder,
    "wav2vec2_fe": Wav2Vec2FeatureExtractor,
    "convtasnet": ConvTasNet,
    "resnet_speaker": ResNetSpeaker,
    "mobilenetv3_kws": MobileNetV3KWS,
    "silero_vad": SileroVAD,
    "hubert_encoder": HubertEncoder,
    "unet_enhancer": UNetEnhancer,
    "ecapa_tdnn": ECAPATDNN,
}
