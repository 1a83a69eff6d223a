"""`nativeq transcribe`: WAV files in, text out, through a compiled speech-recognition artifact.

    WAV -> read_wav (16 kHz mono) -> numpy log-mel (`models.frontend_np.fbank`) -> compiled
    encoder (`feats` [1, T, 80] -> `logits` [1, T', V]) -> best-path CTC -> text

Long audio streams through in constant memory (`stream_ids`): 16 kHz files are read in
blocks, features are computed as samples arrive, and the encoder runs on overlapping windows of
`WINDOW` output frames (40 ms each) with `CONTEXT` frames of left and right context around them;
only each window's centre frames are kept (their best-path ids), and CTC is collapsed once at the
end. A file no longer than one window runs in one call, exactly as the whole utterance. The
shipped Conformer attends over its whole input (no streaming chunks; its depthwise convolutions
see 7 frames each side per layer): across windows every frame sees at least `CONTEXT` frames (5 s)
of audio either side and at most `WINDOW + 2 * CONTEXT` in all, instead of the whole file. Its
outputs therefore differ from a whole-file run's for files longer than one window (a 60 s file:
most words differ, the word error rate against the spoken text is the same, 0.96 vs 0.97; the model
was trained on utterances of a few seconds and transcribes neither well). Other sample rates are
read whole and resampled (scipy's polyphase filter keeps no state between blocks).

The artifact runs natively when it was built for this machine's architecture and under
qemu-user (`runtime.emulate`) otherwise, so an aarch64 (Raspberry Pi) build can be tried on
an x86 workstation. Deployment code: this module imports no torch and no TVM compiler.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError


WINDOW = 750  # centre output frames per encoder call (30 s)
CONTEXT = 125  # output frames of context each side of a window (5 s)
_BLOCK = 16000 * 10  # samples read at a time


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


def stream_samples(path: str | Path) -> Iterator[np.ndarray]:
    """16 kHz mono float32 blocks of an audio file: read block by block when it is 16 kHz, else whole."""
    from nativeq.models.audio import AudioTruncatedWarning, _soundfile, audio_info
    from nativeq.models.data import read_wav
    from nativeq.models.frontend_np import SAMPLE_RATE

    info = audio_info(path)
    if info.rate != SAMPLE_RATE:
        yield read_wav(path)
        return
    if info.truncated is not None:
        warnings.warn(f"{path}: {info.truncated}; using the samples present", AudioTruncatedWarning, stacklevel=2)
    sf = _soundfile()
    count = 0
    try:
        for block in sf.blocks(str(path), blocksize=_BLOCK, dtype="float32", always_2d=True):
            if not np.isfinite(block).all():
                raise NativeqError(f"{path}: {int((~np.isfinite(block)).sum())} samples are NaN or infinite "
                                   f"(corrupt float audio)")
            count += len(block)
            yield block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else np.ascontiguousarray(block[:, 0])
    except sf.LibsndfileError as e:
        reason = str(e).rsplit(": ", 1)[-1].strip().rstrip(".")
        raise NativeqError(f"{path}: cannot decode its {info.format} data ({reason}): truncated or corrupt") from None
    if count == 0:
        raise NativeqError(f"{path}: no audio samples could be decoded")


def stream_features(blocks) -> Iterator[np.ndarray]:
    """float32 [n, 80] log-mel frames of a stream of sample blocks, equal to `fbank` of their concatenation."""
    from nativeq.models.frontend_np import FRAME_LENGTH, FRAME_SHIFT, fbank

    pending = np.zeros(0, np.float32)  # samples from the start of the next frame on
    for block in blocks:
        pending = np.concatenate([pending, block])
        if len(pending) >= FRAME_LENGTH:
            feats = fbank(pending)
            pending = pending[len(feats) * FRAME_SHIFT:]
            yield feats


def stream_ids(run, features, window: int = WINDOW, context: int = CONTEXT) -> np.ndarray:
    """Best-path token ids [T'] of the encoder `run` (feats [1, T, 80] -> logits [T', V]) over a feature stream.

    Output frame k reads feature frames 4k .. 4k+6 (two 3x3 stride-2 convolutions), so a window of
    output frames [a, b) runs on feature frames [4a, 4b+3) and each window starts on a multiple of 4.
    Windows cover `window` centre frames with `context` frames of left and right context; features
    older than the next window's left context are dropped.
    """
    buffered, base, total = [], 0, 0  # feature blocks, the global index of their first frame, frames seen
    ids, start = [], 0  # centre ids so far; the next centre frame

    def frames(lo: int, hi: int) -> np.ndarray:
        return np.concatenate(buffered)[lo - base:hi - base]

    def emit(a: int, b: int, lo: int, hi: int) -> None:
        logits = run(np.ascontiguousarray(frames(4 * a, 4 * b + 3))[None])
        ids.append(np.argmax(logits[lo - a:hi - a], axis=-1))

    for block in features:
        buffered.append(block)
        total += len(block)
        while total >= 4 * (start + window + context) + 3:
            a = max(start - context, 0)
            emit(a, start + window + context, start, start + window)
            start += window
            keep = 4 * max(start - context, 0)
            joined = np.concatenate(buffered)[keep - base:]
            buffered, base = [joined], keep
    if total < 7:
        return np.zeros(0, np.int64) if not ids else np.concatenate(ids)
    last = (total - 7) // 4 + 1
    if start < last:
        emit(max(start - context, 0), last, start, last)
    return np.concatenate(ids)


def transcribe(cfg: TranscribeConfig) -> list[tuple[str, str]]:
    """(path, transcript) for each WAV in cfg.wavs, in order. Every header is checked before the model runs."""
    from nativeq.runtime import read_manifest

    if cfg.threads < 1:
        raise NativeqError(f"--threads must be at least 1, got {cfg.threads}")
    artifact = Path(cfg.artifact)
    manifest = read_manifest(artifact)
    _speech_io(manifest, artifact)
    frames = _fixed_frames(manifest)
    if frames is not None:  # a fixed-length artifact: whole files of exactly that many frames
        features = [(str(p), wav_features(p)) for p in cfg.wavs]
        for path, feats in features:
            if feats.shape[1] != frames:
                raise NativeqError(f"{path}: {feats.shape[1]} feature frames, but {artifact} was compiled for "
                                   f"exactly {frames} (compile the ONNX file with a symbolic time axis)")
        run = _encoder_runner(artifact, manifest, cfg.threads)
        return [(path, greedy_text(run(feats))) for path, feats in features]
    from nativeq.models.audio import audio_info
    from nativeq.models.frontend_np import FRAME_LENGTH, SAMPLE_RATE

    for p in cfg.wavs:  # every header is checked before the model runs
        audio_info(p)
    run = _encoder_runner(artifact, manifest, cfg.threads)
    results = []
    for p in cfg.wavs:
        ids = stream_ids(run, stream_features(stream_samples(p)))
        if len(ids) == 0:
            raise NativeqError(f"{p}: too short to transcribe (needs ≥ {(6 * 160 + FRAME_LENGTH) / SAMPLE_RATE * 1000:.0f} "
                               f"ms of audio)")
        results.append((str(p), _ids_text(ids)))
    return results


def _ids_text(ids: np.ndarray) -> str:
    from nativeq.models.text import ctc_greedy_collapse, decode

    return decode(ctc_greedy_collapse(ids.tolist()))


def onnx_model_wer(onnx_path: str | Path, utterances, threads: int = 1) -> dict:
    """WER/CER of an ONNX speech model (`feats` [1, T, 80] -> logits) in ONNX Runtime, greedy CTC, one utterance
    per run (no padding), on `utterances` (`models.data.Utterance`s)."""
    import jiwer
    import onnx

    from nativeq.export.fidelity import ort_session

    session = ort_session(onnx.load(str(onnx_path)), threads=threads)
    refs = [u.text for u in utterances]
    hyps = [greedy_text(session.run(None, {"feats": wav_features(u.path)})[0][0]) or "<empty>" for u in utterances]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)), "utterances": len(refs)}
