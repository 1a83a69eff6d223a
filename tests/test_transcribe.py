"""`nativeq transcribe`: a compiled Conformer (float ONNX export) turns espeak-ng WAVs into the same
text as the PyTorch model's greedy decoding of the same audio; bad WAVs are one-line errors."""

import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

from nativeq.models.conformer import ConformerConfig, ConformerCTC

torch.set_num_threads(1)
SMALL = ConformerConfig(d_model=48, n_layers=2, n_heads=2, ff_mult=2, conv_kernel=7, subsample_channels=8, dropout=0.0)
SENTENCES = ("turn on the lights", "seven three nine", "what time is it")


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make apt)")
    root = tmp_path_factory.mktemp("wavs")
    paths = []
    for i, text in enumerate(SENTENCES):
        raw = root / f"raw{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True, capture_output=True)
        # espeak-ng writes 22.05 kHz: transcribe must resample it like the training front end would
        paths.append(raw)
    return paths


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    from nativeq.models.train import save_run

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run") / "float"
    run.mkdir()
    save_run(run, ConformerCTC(SMALL))
    return run


def pytorch_transcripts(run, paths):
    from nativeq.models.data import read_wav
    from nativeq.models.features import fbank
    from nativeq.models.pretrained import load_model
    from nativeq.models.train import greedy_decode

    model, _ = load_model(run)
    out = []
    with torch.no_grad():
        for p in paths:
            feats = fbank(torch.from_numpy(read_wav(p)))[None]
            out.append(greedy_decode(model(feats)[0])[0])
    return out


def compiled(run, tmp_path_factory, target):
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.export.float_onnx import export_float

    root = tmp_path_factory.mktemp(f"artifact-{target}")
    export_float(run, root / "float.onnx")
    compile_model(root / "float.onnx", root / target, CompileConfig(target=target, use_tuning=False))
    return root / target


@pytest.fixture(scope="module")
def host_artifact(float_run, tmp_path_factory):
    return compiled(float_run, tmp_path_factory, "host")


def test_transcribe_matches_pytorch_greedy_decoding(nativeq_cli, host_artifact, float_run, wavs):
    expected = pytorch_transcripts(float_run, wavs)
    assert any(t.strip() for t in expected)  # a random model still emits characters: the comparison means something
    result = nativeq_cli("transcribe", host_artifact, *wavs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"{p}\t{t}" for p, t in zip(wavs, expected)]


def test_transcribe_bad_wavs_are_one_line_errors(nativeq_cli, host_artifact, tmp_path):
    not_wav = tmp_path / "notes.wav"
    not_wav.write_text("not audio")
    no_rate = tmp_path / "no_rate.wav"  # a header with sample rate 0 (8-, 24-bit, float, FLAC, OGG all read: test_audio)
    with wave.open(str(no_rate), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(16000, np.int16).tobytes())
    header = bytearray(no_rate.read_bytes())
    header[24:28] = bytes(4)
    no_rate.write_bytes(bytes(header))
    short = tmp_path / "short.wav"
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(500, np.int16).tobytes())
    for bad, says in ((not_wav, "corrupt or unsupported WAV"), (no_rate, "sample rate 0 Hz"), (short, "too short"),
                      (tmp_path / "missing.wav", "missing audio file")):
        result = nativeq_cli("transcribe", host_artifact, bad)
        assert result.returncode != 0
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(bad.name) in err[0] and says in err[0], err
        assert "Traceback" not in result.stderr


def test_transcribe_refuses_a_non_speech_artifact(nativeq_cli, matmul_artifact, wavs):
    _, artifact = matmul_artifact
    result = nativeq_cli("transcribe", artifact, wavs[0])
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and "speech encoder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.arm
def test_transcribe_aarch64_artifact_under_qemu(nativeq_cli, float_run, wavs, tmp_path_factory):
    from nativeq.runtime.emulate import arm_runtime_dir

    if shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (make apt)")
    if not (arm_runtime_dir() / "lib" / "libtvm_runtime.so").is_file():
        pytest.skip("no aarch64 TVM runtime (nativeq setup-arm)")
    artifact = compiled(float_run, tmp_path_factory, "rpi5")
    expected = pytorch_transcripts(float_run, wavs[:2])
    result = nativeq_cli("transcribe", artifact, *wavs[:2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{p}\t{t}" for p, t in zip(wavs[:2], expected)]


def test_front_end_and_decoding_import_no_torch(wavs):
    """What `transcribe` runs besides the TVM runtime (WAV reading, numpy log-mel, CTC decoding) needs no torch."""
    import sys

    code = ("import sys, numpy as np; from nativeq.demo.transcribe import wav_features, greedy_text; "
            f"f = wav_features({str(wavs[0])!r}); assert f.shape[0] == 1 and f.shape[2] == 80; "
            "greedy_text(np.random.rand(f.shape[1] // 4, 29)); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
