"""Audio files in, 16 kHz mono float32 samples out (for the log-mel front end).

    path -> header checks (stdlib RIFF parser for WAV; libsndfile for every format) -> decode
    with `soundfile` (WAV of any PCM/float width, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...) ->
    mix channels down to mono -> polyphase resampling to 16 kHz (`scipy.signal.resample_poly`)

Every malformed file is a one-line `NativeqError` naming the file and the problem (empty,
not audio, sample rate 0 or outside 1 kHz .. 1 MHz, no channels, no samples, NaN/inf
samples, a WAV data size of 0 with data after it). A file that ends before its header says
(a truncated download or recording, or a header claiming 2 GB) is a warning naming the file;
the samples present are used. Header lengths are never trusted for an allocation: a FLAC stream
whose STREAMINFO gives no length (0, as streaming encoders write it) is read to its end.

Torch-free (numpy, soundfile, scipy), so the host-side transcription path can use it. The
device-side runner (`runtime/runner/run.py`) reads 16 kHz mono 16-bit WAV with the standard
library `wave` and needs none of this.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from nativeq.errors import NativeqError

SAMPLE_RATE = 16000
MIN_RATE = 1_000  # below this a file cannot hold speech; such a header is corrupt
MAX_RATE = 1_000_000
# Resampling ratios are exact while their terms stay at or below this (every common rate: 8k,
# 11.025k, 22.05k, 44.1k, 48k, 96k, 192k); odder rates (e.g. 7999 Hz) use the nearest such ratio,
# off by at most 0.0125 %, which keeps the polyphase filter (20 taps per unit of its larger term) small.
_MAX_RATIO_TERM = 4_000
UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count of a stream whose length its header does not give
_BLOCK_FRAMES = 1 << 16


class AudioTruncatedWarning(UserWarning):
    """The file ends before its header says; the samples present are used."""


@dataclass(frozen=True)
class AudioInfo:
    rate: int
    channels: int
    frames: int  # frames present in the file (libsndfile counts what is there)
    format: str  # "WAV", "FLAC", "OGG", ...
    subtype: str  # "PCM_16", "FLOAT", "VORBIS", ...
    truncated: str | None = None  # why the file looks cut short, if it does


def _fail(path: Path, problem: str) -> NativeqError:
    return NativeqError(f"{path}: {problem}")


@dataclass(frozen=True)
class _RiffHeader:
    channels: int
    rate: int
    bits: int
    data_bytes: int  # what the data chunk header claims
    data_present: int  # bytes after the data chunk header


def _riff_header(path: Path, size: int) -> _RiffHeader | None:
    """The fmt and data chunk fields of a RIFF/WAVE file (stdlib only), None if it is not one."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise _fail(path, "the WAV file ends before its data chunk (cut short in the header, or no audio)")
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                body = f.read(min(length, 64))
                if len(body) < min(length, 16):
                    raise _fail(path, "the file ends inside its WAV header (cut short)")
                if len(body) < 16:
                    raise _fail(path, f"WAV 'fmt ' chunk is {len(body)} bytes; a valid one has at least 16")
                _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                fmt = (channels, rate, bits)
                f.seek(length - len(body) + (length & 1), os.SEEK_CUR)
            elif cid == b"data":
                if fmt is None:
                    raise _fail(path, "WAV data chunk comes before its 'fmt ' chunk")
                return _RiffHeader(*fmt, data_bytes=length, data_present=size - f.tell())
            else:
                f.seek(length + (length & 1), os.SEEK_CUR)


def _check_rate(path: Path, rate: int) -> None:
    if rate <= 0:
        raise _fail(path, f"sample rate {rate} Hz in the header (corrupt file)")
    if rate > MAX_RATE:
        raise _fail(path, f"sample rate {rate} Hz in the header is not an audio rate (corrupt file; at most 1 MHz)")
    if rate < MIN_RATE:
        raise _fail(path, f"sample rate {rate} Hz in the header is too low to hold speech (corrupt file?)")


def _check_wav_header(path: Path, header: _RiffHeader) -> str | None:
    """One-line errors for impossible WAV fields; the truncation note (or None)."""
    _check_rate(path, header.rate)
    if header.channels == 0:
        raise _fail(path, "WAV header says 0 channels (corrupt file)")
    if header.data_bytes == 0 and header.data_present > 0:
        raise _fail(path, f"WAV header says the data chunk is empty but {header.data_present} bytes follow it "
                          f"(an unfinished recording? repair with: sox --ignore-length {path.name} fixed.wav)")
    block = header.channels * max(1, (header.bits + 7) // 8)  # samples are whole bytes (12 bits in 2)
    if header.data_bytes == 0xFFFFFFFF:  # streaming writers' "unknown length": read to the end
        return None
    claimed, present = header.data_bytes // block, header.data_present // block
    if present < claimed:  # whole frames: a partial frame at the end is not audio either way
        return (f"the WAV header promises {claimed} frames ({claimed / header.rate:.2f} s) but the file holds "
                f"{present} ({present / header.rate:.2f} s): truncated")
    return None


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """The header of an audio file, checked (one-line NativeqError naming the file and the problem)."""
    path = Path(path)
    if not path.exists():
        raise NativeqError(f"missing audio file {path}")
    if not path.is_file():
        raise _fail(path, "not a file")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "empty file (0 bytes), not audio")
    try:
        riff = _riff_header(path, size)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    truncated = None if riff is None else _check_wav_header(path, riff)
    sf = _soundfile()
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as e:
        kind = "WAV" if riff is not None or path.suffix.lower() == ".wav" else "audio file"
        reason = str(e).rsplit(": ", 1)[-1].strip().rstrip(".") or "unreadable"
        if reason == "Format not recognised":
            reason = "not in an audio format libsndfile knows (WAV, FLAC, OGG, MP3, AIFF, ...)"
        raise NativeqError(f"corrupt or unsupported {kind} {path}: {reason}") from None
    except (OSError, RuntimeError) as e:
        raise _fail(path, f"cannot read: {e}") from None
    _check_rate(path, int(info.samplerate))
    if info.channels <= 0:
        raise _fail(path, f"{info.channels} channels in the header (corrupt file)")
    if info.frames <= 0:
        what = "the header is all there is" if riff is not None else f"an empty or truncated {info.format} stream"
        raise _fail(path, f"no audio samples ({what})")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), info.format, info.subtype, truncated)


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as e:  # OSError: the wheel's bundled libsndfile failed to load
        raise NativeqError(f"reading audio needs the soundfile package ({e}; install with: pip install soundfile)") from None
    return soundfile


def read_audio(path: str | os.PathLike, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples (full scale ±1) at `rate` Hz of an audio file in any format libsndfile reads.

    Channels are averaged; other sample rates are resampled. A file that ends before its
    header says gives an `AudioTruncatedWarning` and the samples that are there.
    """
    path = Path(path)
    info = audio_info(path)
    sf = _soundfile()
    try:
        x = _decode(sf, path, info.channels)
    except sf.LibsndfileError as e:
        reason = str(e).rsplit(": ", 1)[-1].strip().rstrip(".")
        raise _fail(path, f"cannot decode its {info.format} data ({reason}): truncated or corrupt") from None
    truncated = info.truncated
    if truncated is None and info.frames != UNKNOWN_FRAMES and len(x) < info.frames:
        truncated = f"the header promises {info.frames} frames but only {len(x)} decode: truncated"
    if len(x) == 0:
        raise _fail(path, "no audio samples could be decoded")
    if not np.isfinite(x).all():
        raise _fail(path, f"{int((~np.isfinite(x)).sum())} samples are NaN or infinite (corrupt float audio)")
    if truncated is not None:
        warnings.warn(f"{path}: {truncated}; using the samples present", AudioTruncatedWarning, stacklevel=2)
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if info.rate != rate:
        mono = resample(mono, info.rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode(sf, path: Path, channels: int) -> np.ndarray:
    """Every frame libsndfile decodes from `path`, float32 [frames, channels], read in blocks.

    A header's frame count is not trusted for an allocation: a FLAC stream's STREAMINFO may say 0
    (unknown, as streaming encoders write it; libsndfile then reports `UNKNOWN_FRAMES`) or any length.
    NOTE: soundfile seeks to the end of every read it makes, and libsndfile's FLAC reader refuses to seek
    to (or past) the end of a stream whose STREAMINFO length is wrong or unknown, after which the handle
    stays failed: the read that reaches the end fails after filling its buffer. The end is then found
    by seeking on fresh handles (a seek succeeds exactly before the end), and the frames up to it are read
    with the last frame's read, which fails the same way, into a buffer of its own.
    """
    blocks, done = [], 0
    with sf.SoundFile(str(path)) as f:
        claimed = f.frames
        while True:
            try:
                block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            except sf.LibsndfileError as e:
                if not _seek_past_end(e):
                    raise
                break
            blocks.append(block)
            done += len(block)
            if len(block) < _BLOCK_FRAMES:
                return np.concatenate(blocks)
    # NOTE: a seek to exactly the claimed length succeeds without decoding: the search stays below it.
    end = _stream_end(sf, path, done, min(done + _BLOCK_FRAMES, claimed))
    if end > done:
        with sf.SoundFile(str(path)) as f:
            f.seek(done)
            if end - done > 1:
                blocks.append(f.read(end - done - 1, dtype="float32", always_2d=True))
            last = np.zeros((1, channels), np.float32)
            try:
                f.read(1, dtype="float32", always_2d=True, out=last)
            except sf.LibsndfileError as e:
                if not _seek_past_end(e):
                    raise
            blocks.append(last)
    return np.concatenate(blocks) if blocks else np.zeros((0, channels), np.float32)


def _stream_end(sf, path: Path, low: int, high: int) -> int:
    """The number of frames of a stream known to end in [low, high]: the first position a seek fails at
    (one fresh handle a probe: a failed seek leaves its handle failed)."""
    def can_seek(position: int) -> bool:
        with sf.SoundFile(str(path)) as f:
            try:
                f.seek(position)
                return True
            except sf.LibsndfileError as e:
                if not _seek_past_end(e):
                    raise
                return False

    while low < high:  # invariant: the end is in [low, high]; `high` itself is never probed
        middle = (low + high) // 2
        if can_seek(middle):
            low = middle + 1
        else:
            high = middle
    return low


def _seek_past_end(error) -> bool:
    return "psf_fseek" in str(getattr(error, "error_string", ""))


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling (Kaiser-windowed FIR, `scipy.signal.resample_poly`), float32 out.

    The output has ceil(len(x) * dst_rate / src_rate) samples (for ratios within `_MAX_RATIO_TERM`).
    """
    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate:
        return x.copy()
    from scipy.signal import resample_poly

    ratio = Fraction(int(dst_rate), int(src_rate))
    if max(ratio.numerator, ratio.denominator) > _MAX_RATIO_TERM:  # bound the larger term
        ratio = ratio.limit_denominator(_MAX_RATIO_TERM) if ratio < 1 else 1 / (1 / ratio).limit_denominator(_MAX_RATIO_TERM)
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)
