"""`nativeq transcribe`: WAV files in, text out, through a compiled speech-recognition artifact.

    WAV -> read_wav (16 kHz mono) -> numpy log-mel (`models.frontend_np.fbank`) -> compiled
    encoder (`feats` [1, T, 80] -> `logits` [1, T', V]) -> best-path CTC -> text

The artifact runs natively when it was built for this machine's architecture and under
qemu-user (`runtime.emulate`) otherwise, so an aarch64 (Raspberry Pi) build can be tried on
an x86 workstation. Deployment code: this module imports no torch and no TVM compiler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError


@dataclass(frozen=True)
class TranscribeConfig:
    artifact: str
    wavs: tuple[str, ...]
    threads: int = 1


def _speech_io(manifest: dict, artifact: Path) -> tuple[str, str, int]:
    """(input name, output name, mel bins) of an ASR encoder artifact, or a one-line refusal."""
    from nativeq.models.frontend_np import N_MELS

    inputs, outputs = manifest.get("inputs", []), manifest.get("outputs", [])
    if len(inputs) != 1 or not outputs:
        raise NativeqError(f"{artifact}: not a speech encoder artifact (needs one input feats [B, T, {N_MELS}], "
                           f"has {len(inputs)} inputs)")
    spec = inputs[0]
    shape = spec.get("shape") or []
    if spec.get("dtype") != "float32" or len(shape) != 3 or shape[2] != N_MELS:
        raise NativeqError(f"{artifact}: input {spec.get('name')} is {spec.get('dtype')}{list(shape)}; a speech "
                           f"encoder takes float32 [B, T, {N_MELS}] log-mel features")
    return spec["name"], outputs[0]["name"], int(shape[2])


def _fixed_frames(manifest: dict) -> int | None:
    time_dim = manifest["inputs"][0]["shape"][1]
    return time_dim if isinstance(time_dim, int) else None


def _encoder_runner(artifact: Path, manifest: dict, threads: int):
    """feats [1, T, 80] -> logits [T', V] with `threads` TVM threads: native when the artifact is for this
    CPU, else under qemu."""
    from nativeq.runtime import load, machine_arch

    input_name, output_name, _ = _speech_io(manifest, artifact)
    if manifest["target"].get("arch") == machine_arch():
        model = load(artifact, threads=threads)
        return lambda feats: np.asarray(model.run({input_name: feats})[output_name])[0]
    from nativeq.runtime.emulate import run_emulated

    index = [o["name"] for o in manifest["outputs"]].index(output_name)
    return lambda feats: np.asarray(run_emulated(artifact, {input_name: feats}, threads=threads)[index])[0]


def greedy_text(logits: np.ndarray) -> str:
    """Best-path CTC transcript of logits [T', V]."""
    from nativeq.models.text import ctc_greedy_collapse, decode

    return decode(ctc_greedy_collapse(np.argmax(logits, axis=-1).tolist()))


def wav_features(path: str | Path) -> np.ndarray:
    """float32 [1, T, 80] log-mel features of a WAV file (a one-line error for unreadable or too-short audio)."""
    from nativeq.models.data import read_wav
    from nativeq.models.frontend_np import FRAME_LENGTH, SAMPLE_RATE, fbank

    feats = fbank(read_wav(path))
    if feats.shape[0] < 7:  # the encoder's two stride-2 3x3 convs need 7 frames for one output step
        raise NativeqError(f"{path}: {feats.shape[0]} feature frames; too short to transcribe "
                           f"(needs ≥ {(6 * 160 + FRAME_LENGTH) / SAMPLE_RATE * 1000:.0f} ms of audio)")
    return feats[None]


def transcribe(cfg: TranscribeConfig) -> list[tuple[str, str]]:
    """(path, transcript) for each WAV in cfg.wavs, in order. Every WAV is read before the model runs."""
    from nativeq.runtime import read_manifest

    if cfg.threads < 1:
        raise NativeqError(f"--threads must be at least 1, got {cfg.threads}")
    artifact = Path(cfg.artifact)
    manifest = read_manifest(artifact)
    _speech_io(manifest, artifact)
    features = [(str(p), wav_features(p)) for p in cfg.wavs]
    frames = _fixed_frames(manifest)
    if frames is not None:
        for path, feats in features:
            if feats.shape[1] != frames:
                raise NativeqError(f"{path}: {feats.shape[1]} feature frames, but {artifact} was compiled for "
                                   f"exactly {frames} (compile the ONNX file with a symbolic time axis)")
    run = _encoder_runner(artifact, manifest, cfg.threads)
    return [(path, greedy_text(run(feats))) for path, feats in features]
