"""Bounded memory: the manifest's memory formula bounds a call's measured peak, oversized calls are refused
at once with a one-line error, `max_memory` parsing, and `transcribe` streams long audio in windows."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from nativeq.errors import NativeqError
from nativeq.runtime.memory import MemoryFormula, parse_memory

MEASURE = """
import json, sys
import numpy as np
import nativeq
m = nativeq.load(sys.argv[1], max_memory="1TB", threads=1)
spec, T = m.inputs[0], int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((1, T, spec.shape[2]), dtype=np.float32)
m.run({spec.name: x[:, :16]})
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
m.run({spec.name: x})
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"growth": peak - rss, "estimate": m.memory_needed({"T": T})}))
"""


@pytest.fixture(scope="module")
def encoder_artifact(tmp_path_factory):
    import onnx
    from qdq_models import ort_quantized_encoder

    from nativeq.compile import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("memory")
    onnx.save(ort_quantized_encoder(), root / "encoder.onnx")
    with pytest.warns(UserWarning, match="shape condition"):
        compile_model(root / "encoder.onnx", root / "host", CompileConfig(target="host", use_tuning=False))
    return root / "host"


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * 10**9), ("4 GiB", 4 << 30), ("4g", 4 << 30), ("1.5MB", 1_500_000), ("512", 512), (1000, 1000),
])
def test_max_memory_parsing(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "4XB", "-1GB", "0", 0, -5, True, 1.5, None, "GB"])
def test_max_memory_refuses_non_sizes(bad):
    with pytest.raises(NativeqError, match="max_memory") as e:
        parse_memory(bad)
    assert "\n" not in str(e.value)


def test_formula_is_a_polynomial_in_the_sizes():
    formula = MemoryFormula([{"coef": 100.0, "dims": {}}, {"coef": 2.5, "dims": {"T": 1}}, {"coef": 1.0, "dims": {"T": 2}}])
    assert formula.bytes({"T": 10}) == 100 + 25 + 100
    assert formula.bytes({"T": 2**31 - 1}) > 4 * 10**18


def test_manifest_records_the_formula_and_read_manifest_checks_it(encoder_artifact, tmp_path):
    from nativeq.compile.artifact import write_manifest
    from nativeq.runtime import read_manifest

    manifest = read_manifest(encoder_artifact)
    terms = manifest["memory"]["bytes"]
    assert {tuple(t["dims"].items()) for t in terms} == {(), (("T", 1),), (("T", 2),)}
    bad = tmp_path / "bad"
    shutil.copytree(encoder_artifact, bad)
    manifest["memory"]["bytes"][0]["coef"] = "lots"
    write_manifest(bad, manifest)
    with pytest.raises(NativeqError, match=r"'memory.bytes\[0\].coef' must be a finite number"):
        read_manifest(bad)


@pytest.mark.parametrize("frames", [1000, 4000])
def test_estimate_bounds_the_measured_peak(encoder_artifact, frames):
    # NOTE: the peak is VmHWM, not getrusage's ru_maxrss, which a child inherits from its parent across exec.
    out = subprocess.run([sys.executable, "-c", MEASURE, str(encoder_artifact), str(frames)],
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.splitlines()[-1])
    # measured growth of peak RSS: T=1000 14 MB (estimate 87 MB), T=4000 213 MB (estimate 994 MB)
    assert measured["growth"] <= measured["estimate"] <= 8 * measured["growth"], measured


def test_huge_sizes_are_refused_at_once_with_one_line(encoder_artifact):
    import nativeq

    model = nativeq.load(encoder_artifact, threads=1, max_memory="24GB")
    huge = np.broadcast_to(np.zeros((1, 1, 80), np.float32), (1, 2**31 - 1, 80))  # 687 GB, never materialized
    for frames, shown in ((2**31 - 1, "T=2147483647"), (100_000, "T=100000")):
        started = time.perf_counter()
        with pytest.raises(NativeqError) as e:
            model.run({model.inputs[0].name: huge[:, :frames]})
        assert time.perf_counter() - started < 1.0
        message = str(e.value)
        assert "\n" not in message and shown in message and "estimated" in message and "24 GB" in message, message
    nativeq.load(encoder_artifact, threads=1, max_memory="1TB").check_memory({"T": 100_000})  # a larger limit allows it
    small = model.run({model.inputs[0].name: np.zeros((1, 64, 80), np.float32)})
    assert all(np.isfinite(v).all() for v in small.values())


def test_default_limit_is_the_available_memory_less_a_margin(encoder_artifact, monkeypatch):
    import nativeq
    from nativeq.runtime.memory import available_memory

    available = available_memory()
    limit = nativeq.load(encoder_artifact, threads=1).max_memory
    assert available is not None and 0.8 * available <= limit < available
    monkeypatch.setenv("NATIVEQ_MAX_MEMORY", "1GB")
    assert nativeq.load(encoder_artifact, threads=1).max_memory == 10**9
    with pytest.raises(NativeqError, match="max_memory"):
        nativeq.load(encoder_artifact, max_memory="lots")


# ----------------------------------------------------------------------------- transcribe in windows
def test_streamed_features_equal_the_whole_file_ones():
    from nativeq.demo.transcribe import stream_features
    from nativeq.models.frontend_np import fbank

    x = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 7 + 123).astype(np.float32)
    blocks = [x[i:i + 7001] for i in range(0, len(x), 7001)]
    np.testing.assert_array_equal(np.concatenate(list(stream_features(iter(blocks)))), fbank(x))


def test_windows_reproduce_a_local_encoder_exactly():
    """With an encoder whose output frame k reads only feature frames 4k..4k+6 (as the convolution front
    end does), the window centres stitch to the whole-input output."""
    from nativeq.demo.transcribe import stream_ids

    def run(feats):  # [1, T, 80] -> [T', 5], output k from frames 4k .. 4k+6
        f = feats[0]
        n = (len(f) - 7) // 4 + 1
        return np.stack([f[4 * k:4 * k + 7].sum(axis=0)[:5] for k in range(n)])

    feats = np.random.default_rng(1).standard_normal((4 * 333 + 5, 80)).astype(np.float32)
    whole = np.argmax(run(feats[None]), axis=-1)
    for window, context in ((10, 3), (50, 0), (1000, 20)):
        blocks = iter([feats[i:i + 97] for i in range(0, len(feats), 97)])
        np.testing.assert_array_equal(stream_ids(run, blocks, window=window, context=context), whole)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make apt)")
    import soundfile as sf

    from nativeq.models.data import read_wav

    root = tmp_path_factory.mktemp("long")
    parts = []
    for i, text in enumerate(("turn on the lights", "seven three nine", "what time is it",
                              "set an alarm for six in the morning", "play some music in the kitchen")):
        raw = root / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True, capture_output=True)
        parts += [read_wav(raw), np.zeros(8000, np.float32)]
    one = np.concatenate(parts)
    samples = np.resize(one, 60 * 16000)  # 60 s: two windows and a tail
    sf.write(root / "60s.wav", samples, 16000, subtype="PCM_16")
    return root / "60s.wav"


def _word_errors(hyp: str, ref: str) -> float:
    h, r = hyp.split(), ref.split()
    d = list(range(len(r) + 1))
    for i, wh in enumerate(h, 1):
        p, d[0] = d[0], i
        for j, wr in enumerate(r, 1):
            p, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, p + (wh != wr))
    return d[-1] / len(r)


def test_transcribe_in_windows_with_the_shipped_model(long_wav, tmp_path_factory):
    """One window's worth of audio: the same transcript as the whole file. 60 s: the shipped model attends
    over its whole input, so windows change its outputs; the word error rate stays that of the whole file."""
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.demo import transcribe as tr
    from nativeq.export.float_onnx import export_float
    from nativeq.runtime import read_manifest

    root = tmp_path_factory.mktemp("tiny")
    export_float("conformer-tiny", root / "float.onnx")
    compile_model(root / "float.onnx", root / "host", CompileConfig(target="host", use_tuning=False))
    run = tr._encoder_runner(root / "host", read_manifest(root / "host"), 2)
    feats = tr.wav_features(long_wav)
    short = feats[:, :4 * (tr.WINDOW + tr.CONTEXT)]
    assert tr._ids_text(tr.stream_ids(run, iter([short[0]]))) == tr.greedy_text(run(short))
    whole = tr.greedy_text(run(feats))
    [(_, windowed)] = tr.transcribe(tr.TranscribeConfig(artifact=str(root / "host"), wavs=(str(long_wav),), threads=2))
    spoken = " ".join(["turn on the lights seven three nine what time is it set an alarm for six in the morning "
                       "play some music in the kitchen"] * 6)
    spoken = " ".join(spoken.split()[:len(whole.split())])
    assert len(windowed.split()) > 60
    assert _word_errors(windowed, spoken) <= _word_errors(whole, spoken) + 0.05


def test_long_audio_runs_in_bounded_windows(long_wav):
    """A 60 s file: the encoder never sees more than one window with its context, whatever the file's length."""
    from nativeq.demo import transcribe as tr

    sizes = []

    def run(feats):
        sizes.append(feats.shape[1])
        return np.zeros(((feats.shape[1] - 7) // 4 + 1, 5), np.float32)

    ids = tr.stream_ids(run, tr.stream_features(tr.stream_samples(long_wav)))
    assert len(ids) == (6000 - 2 - 7) // 4 + 1  # 60 s: 5998 feature frames
    assert len(sizes) == 2 and max(sizes) <= 4 * (tr.WINDOW + 2 * tr.CONTEXT) + 3
