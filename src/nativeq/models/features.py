"""The feature front end: Kaldi-style 80-dim log-mel filterbank in plain torch, and SpecAugment.

It sits OUTSIDE the exported ONNX encoder: the encoder's input `feats` [B, T, 80] is the
output of `fbank()`. Training, evaluation and export all call this one function, so the
front end is the same at train and inference time. It matches `kaldi-native-fbank` with
dither 0 (tested): 25 ms povey window, 10 ms shift, pre-emphasis 0.97, DC removal, 512-point
FFT power spectrum, 80 HTK-mel triangles from 20 Hz to Nyquist, natural log floored at
float32 epsilon, `snip_edges=True`. Samples in [-1, 1] are scaled by 32768 first (Kaldi's
convention for 16-bit audio).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

SAMPLE_RATE = 16000
N_MELS = 80
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512
_EPS = torch.finfo(torch.float32).eps


def _mel(f: torch.Tensor | float) -> torch.Tensor | float:
    return 1127.0 * (torch.log1p(f / 700.0) if isinstance(f, torch.Tensor) else math.log1p(f / 700.0))


def _inverse_mel(m: float) -> float:
    return 700.0 * math.expm1(m / 1127.0)


def vtln_warp_hz(freq: float, warp: float, low_hz: float, high_hz: float,
                 vtln_low: float = 100.0, vtln_high: float = SAMPLE_RATE / 2 - 500.0) -> float:
    """Kaldi's piecewise-linear VTLN warp of a frequency (`MelBanks::VtlnWarpFreq`).

    Inside [l, h] the axis is scaled by 1/warp; below l and above h two linear pieces keep
    low_hz and high_hz fixed, with l = vtln_low * max(1, warp), h = vtln_high * min(1, warp).
    """
    if freq < low_hz or freq > high_hz:
        return freq
    low, high = vtln_low * max(1.0, warp), vtln_high * min(1.0, warp)
    scale = 1.0 / warp
    if freq < low:
        return low_hz + (scale * low - low_hz) / (low - low_hz) * (freq - low_hz)
    if freq < high:
        return scale * freq
    return high_hz + (high_hz - scale * high) / (high_hz - high) * (freq - high_hz)


@functools.lru_cache(maxsize=64)
def mel_banks(n_mels: int = N_MELS, low_hz: float = 20.0, high_hz: float = SAMPLE_RATE / 2,
              vtln_warp: float = 1.0) -> torch.Tensor:
    """Kaldi's triangular mel filters over FFT bins 0..N_FFT/2-1, shape [N_FFT // 2, n_mels] (float64).

    `vtln_warp` != 1 moves the triangles' corners by Kaldi's VTLN warp (`vtln_warp_hz`), which
    acts like a longer (warp > 1) or shorter vocal tract: the vocal-tract-length perturbation
    (VTLP) augmentation of `TrainConfig.vtlp`.
    """
    fft_freqs = torch.arange(N_FFT // 2, dtype=torch.float64) * (SAMPLE_RATE / N_FFT)
    mel = _mel(fft_freqs)
    mel_low, mel_high = _mel(low_hz), _mel(high_hz)
    delta = (mel_high - mel_low) / (n_mels + 1)
    corners = [mel_low + delta * (i + torch.arange(n_mels, dtype=torch.float64)) for i in range(3)]
    if vtln_warp != 1.0:
        corners = [torch.tensor([_mel(vtln_warp_hz(_inverse_mel(float(m)), vtln_warp, low_hz, high_hz)) for m in c],
                                dtype=torch.float64) for c in corners]
    left, center, right = corners
    m = mel[:, None]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    weights = torch.where(m <= center, up, down)
    return torch.where((m > left) & (m < right), weights, torch.zeros(())).clamp_min(0)


@functools.lru_cache(maxsize=1)
def _povey_window() -> torch.Tensor:
    n = torch.arange(FRAME_LENGTH, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (FRAME_LENGTH - 1))) ** 0.85


def num_frames(num_samples: int) -> int:
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def fbank(samples: torch.Tensor, vtln_warp: float = 1.0) -> torch.Tensor:
    """Log-mel features [T, 80] (float32) of 16 kHz mono samples in [-1, 1] (1-D tensor or array).

    `vtln_warp` warps the mel filters (training-time VTLP only; inference always uses 1.0).
    """
    x = torch.as_tensor(samples, dtype=torch.float64).reshape(-1) * 32768.0
    if x.numel() < FRAME_LENGTH:
        return torch.zeros(0, N_MELS)
    frames = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - 0.97 * previous) * _povey_window()
    power = torch.fft.rfft(frames, n=N_FFT).abs().pow(2)[:, : N_FFT // 2]
    energies = power @ mel_banks(vtln_warp=vtln_warp)
    return energies.clamp_min(_EPS).log().to(torch.float32)


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
    """Masks applied to training features (SpecAugment, LD-style but smaller for short utterances)."""

    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width_fraction: float = 0.05
    max_time_width: int = 40


def spec_augment(feats: torch.Tensor, cfg: SpecAugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask random frequency bands and time spans of one utterance's features [T, F] with its mean."""
    feats = feats.clone()
    t, f = feats.shape
    fill = feats.mean()

    def rand(hi: int) -> int:
        return int(torch.randint(0, max(hi, 1), (1,), generator=generator))

    for _ in range(cfg.freq_masks):
        width = rand(cfg.freq_width + 1)
        start = rand(f - width)
        feats[:, start : start + width] = fill
    max_width = min(cfg.max_time_width, int(t * cfg.time_width_fraction))
    for _ in range(cfg.time_masks):
        width = rand(max_width + 1)
        start = rand(t - width)
        feats[start : start + width, :] = fill
    return feats
