"""The same Kaldi-style log-mel front end as `features.fbank`, in numpy only (no torch).

For deployment code that must not import torch (e.g. `runtime/` on a Raspberry Pi): audio ->
`fbank(samples)` -> the compiled encoder's `feats` input. Tested equal to `features.fbank`.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 16000
N_MELS = 80
FRAME_LENGTH = 400
FRAME_SHIFT = 160
N_FFT = 512
_EPS = float(np.finfo(np.float32).eps)


def _mel(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def mel_banks(n_mels: int = N_MELS, low_hz: float = 20.0, high_hz: float = SAMPLE_RATE / 2) -> np.ndarray:
    """[N_FFT // 2, n_mels] triangular filters, Kaldi's definition (see features.mel_banks)."""
    mel = _mel(np.arange(N_FFT // 2) * (SAMPLE_RATE / N_FFT))[:, None]
    mel_low, mel_high = float(_mel(low_hz)), float(_mel(high_hz))
    delta = (mel_high - mel_low) / (n_mels + 1)
    left = mel_low + delta * np.arange(n_mels)
    center, right = left + delta, left + 2 * delta
    weights = np.where(mel <= center, (mel - left) / (center - left), (right - mel) / (right - center))
    return np.where((mel > left) & (mel < right), weights, 0.0).clip(min=0)


_WINDOW = (0.5 - 0.5 * np.cos(2 * math.pi * np.arange(FRAME_LENGTH) / (FRAME_LENGTH - 1))) ** 0.85
_BANKS = mel_banks()


def fbank(samples: np.ndarray) -> np.ndarray:
    """Log-mel features [T, 80] float32 of 16 kHz mono samples in [-1, 1]."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1) * 32768.0
    if x.size < FRAME_LENGTH:
        return np.zeros((0, N_MELS), np.float32)
    n = 1 + (x.size - FRAME_LENGTH) // FRAME_SHIFT
    idx = np.arange(FRAME_LENGTH)[None, :] + FRAME_SHIFT * np.arange(n)[:, None]
    frames = x[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * previous) * _WINDOW
    power = np.abs(np.fft.rfft(frames, n=N_FFT)) ** 2
    energies = power[:, : N_FFT // 2] @ _BANKS
    return np.log(np.maximum(energies, _EPS)).astype(np.float32)
