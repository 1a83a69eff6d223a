"""Audio input (`models.audio`): WAV of any width, FLAC and OGG read like the 16-bit WAV they came
from; damaged files are one-line errors naming the file and the problem (exit 2 on the command
line), a truncated file is a warning and the samples present are transcribed."""

import struct
import warnings

import numpy as np
import pytest
import soundfile as sf

from nativeq.errors import NativeqError
from nativeq.models.audio import AudioTruncatedWarning, audio_info, read_audio, resample

RATE = 16000


def _pcm16(n: int = RATE, seed: int = 0) -> np.ndarray:
    """Speech-band int16 test signal: a glide, a tone and noise, well inside full scale."""
    t = np.arange(n) / RATE
    rng = np.random.default_rng(seed)
    x = 6000 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 3000 * np.sin(2 * np.pi * 1234 * t) + rng.normal(0, 800, n)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def _wav(pcm: bytes | None = None, *, rate=RATE, channels=1, bits=16, tag=1, data_size=None, riff_size=None,
         fmt_size=16) -> bytes:
    """A RIFF/WAVE file whose header fields can each lie."""
    if pcm is None:
        pcm = np.tile(_pcm16(), (channels, 1)).T.astype("<i2").tobytes() if bits == 16 else b"\0" * 3200
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    fmt = fmt.ljust(fmt_size, b"\0")[:fmt_size]
    size = len(pcm) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + pcm
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


GOOD = _wav()
HEADER = 44  # bytes before the samples of a plain 16-bit WAV
NAN_FLOAT = _wav(np.array([0.1, np.nan, -0.2] * 2000, "<f4").tobytes(), bits=32, tag=3)

# (file name, its bytes, the words the error must contain)
DAMAGED = [
    ("empty.wav", b"", "empty file (0 bytes)"),
    ("notes.wav", b"meeting notes, not audio\n", "corrupt or unsupported WAV"),
    ("noise.flac", bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "corrupt or unsupported audio file"),
    ("rate0.wav", _wav(rate=0), "sample rate 0 Hz"),
    ("rate4g.wav", _wav(rate=4_000_000_000), "sample rate 4000000000 Hz in the header is not an audio rate"),
    ("rate2m.wav", _wav(rate=2_000_000), "at most 1 MHz"),
    ("rate50.wav", _wav(rate=50), "too low to hold speech"),
    ("mono0.wav", _wav(channels=0, pcm=b"\0" * 100), "0 channels"),
    ("bits0.wav", _wav(bits=0, pcm=b"\0" * 100), "corrupt or unsupported WAV"),
    ("header_only.wav", _wav(b""), "no audio samples"),
    ("cut_in_fmt.wav", GOOD[:30], "ends inside its WAV header"),
    ("cut_before_data.wav", GOOD[:36], "ends before its data chunk"),
    ("no_data_chunk.wav", GOOD[:36] + b"LIST" + struct.pack("<I", 4) + b"INFO", "ends before its data chunk"),
    ("unfinished.wav", _wav(data_size=0), "data chunk is empty but 32000 bytes follow it"),
    ("short_fmt.wav", _wav(fmt_size=12), "'fmt ' chunk is 12 bytes"),
    ("nan.wav", NAN_FLOAT, "samples are NaN or infinite"),
]


@pytest.mark.parametrize("name,data,says", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_files_are_one_line_errors_naming_file_and_problem(tmp_path, name, data, says):
    path = tmp_path / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the way to the error
        with pytest.raises(NativeqError) as info:
            read_audio(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message and says in message, message
    assert not message.rstrip().endswith(":")  # the reason is never empty


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NativeqError, match="missing audio file .*nope.wav"):
        read_audio(tmp_path / "nope.wav")
    with pytest.raises(NativeqError, match="not a file"):
        read_audio(tmp_path)


# (file name, its bytes, frames the header promises, frames present)
TRUNCATED = [
    ("cut_mid_data.wav", GOOD[: HEADER + 10000], 16000, 5000),
    ("cut_mid_sample.wav", GOOD[: HEADER + 10001], 16000, 5000),
    ("claims_2gb.wav", _wav(data_size=2_000_000_000), 1_000_000_000, 16000),
    ("stereo_cut_mid_frame.wav", _wav(channels=2)[: HEADER + 4 * 3000 + 2], 16000, 3000),
]


@pytest.mark.parametrize("name,data,promised,present", TRUNCATED, ids=[t[0] for t in TRUNCATED])
def test_truncated_files_warn_and_give_the_samples_present(tmp_path, name, data, promised, present):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.warns(AudioTruncatedWarning) as caught:
        x = read_audio(path)
    message = str(caught[0].message)
    assert len(message.splitlines()) == 1 and str(path) in message and "truncated" in message
    assert f"promises {promised} frames" in message and f"holds {present}" in message
    np.testing.assert_array_equal(x, _pcm16()[:present] / 32768.0)


def test_tolerated_header_quirks_read_silently(tmp_path):
    """A RIFF size that lies and the streaming writers' 0xFFFFFFFF data size are common and harmless."""
    for name, data in (("riff_lies.wav", _wav(riff_size=2_000_000_000)), ("streamed.wav", _wav(data_size=0xFFFFFFFF))):
        path = tmp_path / name
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(read_audio(path), _pcm16() / 32768.0)


# ----------------------------------------------------------------------------- formats
# (file name, soundfile format, subtype, max |difference| to the int16 WAV's samples)
FORMATS = [
    ("pcm24.wav", "WAV", "PCM_24", 0.0),
    ("pcm32.wav", "WAV", "PCM_32", 0.0),
    ("float32.wav", "WAV", "FLOAT", 0.0),
    ("float64.wav", "WAV", "DOUBLE", 0.0),
    ("extensible.wav", "WAVEX", "PCM_16", 0.0),
    ("pcm16.flac", "FLAC", "PCM_16", 0.0),
    ("pcm24.flac", "FLAC", "PCM_24", 0.0),
    ("unsigned8.wav", "WAV", "PCM_U8", 1 / 128),  # 8 bits keep the top byte of 16
    ("vorbis.ogg", "OGG", "VORBIS", None),  # lossy: compared by signal-to-noise ratio
]


@pytest.mark.parametrize("name,fmt,subtype,tol", FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_read_like_the_int16_wav(tmp_path, name, fmt, subtype, tol):
    pcm = _pcm16()
    (tmp_path / "ref.wav").write_bytes(_wav(pcm.tobytes()))
    ref = read_audio(tmp_path / "ref.wav")
    np.testing.assert_array_equal(ref, pcm / 32768.0)
    path = tmp_path / name
    data = pcm / 32768.0 if subtype in ("FLOAT", "DOUBLE") else pcm
    sf.write(str(path), data, RATE, format=fmt, subtype=subtype)
    x = read_audio(path)
    assert x.dtype == np.float32 and x.shape == ref.shape
    if tol is None:
        snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((x - ref).astype(np.float64) ** 2))
        assert snr > 15, snr  # Vorbis at its default quality: ~20 dB on this signal
    else:
        assert np.abs(x - ref).max() <= tol


def test_channels_are_averaged(tmp_path):
    pcm = _pcm16()
    other = _pcm16(seed=1)
    sf.write(str(tmp_path / "stereo.flac"), np.stack([pcm, other], axis=1), RATE, subtype="PCM_16")
    expected = ((pcm.astype(np.float32) + other) / 2) / 32768.0
    np.testing.assert_allclose(read_audio(tmp_path / "stereo.flac"), expected, atol=1e-7)
    sf.write(str(tmp_path / "six.wav"), np.tile(pcm[:, None], (1, 6)), RATE, subtype="PCM_16")
    np.testing.assert_allclose(read_audio(tmp_path / "six.wav"), pcm / 32768.0, atol=1e-7)
    info = audio_info(tmp_path / "six.wav")
    assert (info.channels, info.rate, info.frames, info.format) == (6, RATE, RATE, "WAV")


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000, 11025 * 3 + 1])
def test_other_rates_are_resampled_to_16k(tmp_path, rate):
    """A band-limited signal sampled at `rate` comes out as the same signal sampled at 16 kHz."""
    freqs, amps = (220.0, 1000.0, 3100.0), (0.3, 0.2, 0.1)

    def signal(sr, seconds=1.0):
        t = np.arange(int(sr * seconds)) / sr
        return sum(a * np.sin(2 * np.pi * f * t) for f, a in zip(freqs, amps))

    sf.write(str(tmp_path / "x.wav"), signal(rate).astype(np.float32), rate, subtype="FLOAT")
    x = read_audio(tmp_path / "x.wav")
    assert abs(len(x) - RATE) <= 1
    inner = slice(800, RATE - 800)  # away from the filter's edge transients
    assert np.abs(x[inner] - signal(RATE)[: len(x)][inner]).max() < 2e-3


def test_resample_keeps_length_and_pitch():
    tone = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    y = resample(tone, 44100, 16000)
    assert len(y) == 16000 and y.dtype == np.float32
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y) - 440) <= 1
    np.testing.assert_array_equal(resample(tone, 16000, 16000), tone)


def test_features_of_a_flac_equal_the_wavs(tmp_path):
    from nativeq.demo.transcribe import wav_features

    pcm = _pcm16()
    (tmp_path / "a.wav").write_bytes(_wav(pcm.tobytes()))
    sf.write(str(tmp_path / "a.flac"), pcm, RATE, subtype="PCM_16")
    np.testing.assert_array_equal(wav_features(tmp_path / "a.flac"), wav_features(tmp_path / "a.wav"))


# ----------------------------------------------------------------------------- the command line
CLI_DAMAGED = [d for d in DAMAGED if d[0] in ("empty.wav", "notes.wav", "rate0.wav", "rate4g.wav", "unfinished.wav")]


@pytest.mark.parametrize("name,data,says", CLI_DAMAGED, ids=[d[0] for d in CLI_DAMAGED])
def test_cli_damaged_file_is_exit_2_with_one_line(nativeq_cli, speech_artifact, tmp_path, name, data, says):
    path = tmp_path / name
    path.write_bytes(data)
    result = nativeq_cli("transcribe", speech_artifact, path)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and name in err[0] and says in err[0], err
    assert "internal error" not in result.stderr and result.stdout == ""


def test_cli_truncated_file_warns_and_is_transcribed(nativeq_cli, speech_artifact, tmp_path):
    cut = tmp_path / "cut.wav"
    cut.write_bytes(GOOD[: HEADER + 20000])
    flac = tmp_path / "whole.flac"
    sf.write(str(flac), _pcm16(), RATE, subtype="PCM_24")
    result = nativeq_cli("transcribe", speech_artifact, cut, flac)
    assert result.returncode == 0, result.stderr
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warned) == 1 and "cut.wav" in warned[0] and "truncated" in warned[0], result.stderr
    assert [ln.split("\t")[0] for ln in result.stdout.splitlines()] == [str(cut), str(flac)]


# ----------------------------------------------------------------------------- the device runner
@pytest.fixture
def device_runner(tmp_path, monkeypatch):
    """`runtime/runner/run.py` as a bundle lays it out (frontend.py beside it), imported as a module."""
    import importlib
    import shutil
    import sys
    from pathlib import Path

    import nativeq

    src = Path(nativeq.__file__).parent
    root = tmp_path / "bundle"
    root.mkdir()
    shutil.copy(src / "runtime" / "runner" / "run.py", root / "run.py")
    shutil.copy(src / "models" / "frontend_np.py", root / "frontend.py")
    monkeypatch.syspath_prepend(str(root))
    # NOTE: run.py sets TVM_USE_RUNTIME_LIB=1 on import unless it is set (for the device). Set here to "0" (undone
    # after the test), it keeps this worker's TVM, and every `nativeq compile` it starts later, with the compiler.
    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "0")
    for name in ("run", "frontend"):
        sys.modules.pop(name, None)
    yield importlib.import_module("run")
    for name in ("run", "frontend"):
        sys.modules.pop(name, None)


def test_device_runner_reads_wav_with_the_standard_library_only(device_runner, tmp_path, capsys):
    import inspect

    assert not any(m in inspect.getsource(device_runner) for m in ("soundfile", "scipy"))
    spec = {"name": "feats", "shape": [1, "T", 80]}
    for name, data, says in (("empty.wav", b"", "ends inside its header"), ("cut.wav", GOOD[:30], "ends inside its header"),
                             ("header_only.wav", _wav(b""), "no audio samples"), ("rate0.wav", _wav(rate=0), "is 0 Hz")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SystemExit) as info:
            device_runner.wav_features(str(tmp_path / name), spec)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and name in err[0] and says in err[0], err
    (tmp_path / "cut_mid_sample.wav").write_bytes(GOOD[: HEADER + 10001])
    feats = device_runner.wav_features(str(tmp_path / "cut_mid_sample.wav"), spec)
    err = capsys.readouterr().err.strip().splitlines()
    assert feats.shape[0] == 1 and feats.shape[2] == 80
    assert len(err) == 1 and err[0].startswith("warning: ") and "truncated" in err[0] and "holds 5000" in err[0]
