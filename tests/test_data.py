"""Corpus synthesis (determinism, disjoint voices, no digital silence) and bad-input handling."""

import wave

import numpy as np
import pytest

from nativeq.errors import NativeqError
from nativeq.models.data import (
    SPLIT_VOICES, check_audio, read_manifest, read_wav, resample, write_wav,
)
from speech_fixtures import synth_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_tiny_corpus(tmp_path_factory.mktemp("c") / "speech", train=6, dev=2, test=2, other=2, seed=5)


def test_voice_sets_of_splits_are_disjoint():
    voices = {split: set(v) for split, v in SPLIT_VOICES.items()}
    for a in voices:
        for b in voices:
            if a != b:
                assert not voices[a] & voices[b], (a, b)
    train_engines = {engine for engine, _ in voices["train"]}
    assert {engine for engine, _ in voices["other"]}.isdisjoint(train_engines)
    assert len(voices["test"]) >= 8


def test_manifests_list_the_voices_of_their_split(corpus):
    for split in ("train", "dev", "test", "other"):
        rows = [line.split("\t") for line in (corpus / f"{split}.voices.tsv").read_text().splitlines()]
        allowed = {f"{e}:{v}" for e, v in SPLIT_VOICES[split]}
        assert rows and all(voice in allowed for _, voice in rows)


def test_manifest_durations_transcripts_and_no_digital_silence(corpus):
    for split in ("train", "test", "other"):
        for u in read_manifest(corpus, split):
            x = read_wav(u.path)
            assert abs(len(x) / 16000 - u.duration) < 1e-3
            assert u.text and u.text == u.text.lower()
            assert 0.3 < u.duration < 15
            # noise/dither padding: no 50 ms stretch of exact zeros anywhere
            ints = np.round(x * 32768).astype(np.int64)
            zero_run = np.convolve((ints == 0).astype(int), np.ones(800, dtype=int), "valid").max()
            assert zero_run < 800
            assert np.abs(x).max() <= 1.0


def test_synthesis_is_deterministic_from_the_seed(corpus, tmp_path):
    again = synth_tiny_corpus(tmp_path / "again", train=6, dev=2, test=2, other=2, seed=5)
    other_seed = synth_tiny_corpus(tmp_path / "seed6", train=6, dev=0, test=0, other=0, seed=6)
    for split in ("train", "dev", "test", "other"):
        assert (again / f"{split}.tsv").read_text() == (corpus / f"{split}.tsv").read_text()
    for u, v in zip(read_manifest(corpus, "train"), read_manifest(again, "train")):
        assert u.path.read_bytes() == v.path.read_bytes()
    assert (other_seed / "train.tsv").read_text() != (corpus / "train.tsv").read_text()


def test_existing_output_is_refused_without_force(corpus, nativeq_cli):
    r = nativeq_cli("data", "synth", "-o", corpus, "--train", "1", "--dev", "0", "--test", "0", "--other", "0")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--force" in r.stderr
    assert "Traceback" not in r.stderr


def _write_manifest(tmp_path, text, rel="a.wav", make_audio=True):
    if make_audio:
        write_wav(tmp_path / rel, (np.sin(np.arange(16000) * 0.1) * 8000).astype(np.int16))
    (tmp_path / "x.tsv").write_text(f"{rel}\t1.0\t{text}\n")


def test_bad_manifests_are_one_line_errors(tmp_path):
    _write_manifest(tmp_path, "")
    with pytest.raises(NativeqError, match="x.tsv:1: empty transcript"):
        read_manifest(tmp_path, "x")
    _write_manifest(tmp_path, "naïve café")
    with pytest.raises(NativeqError, match="outside the vocabulary"):
        read_manifest(tmp_path, "x")
    (tmp_path / "x.tsv").write_text("a.wav\tone second\thello\n")
    with pytest.raises(NativeqError, match="not a number"):
        read_manifest(tmp_path, "x")
    with pytest.raises(NativeqError, match="no manifest .*nope.tsv .*splits in .*: x"):
        read_manifest(tmp_path, "nope")


def test_missing_and_corrupt_audio_are_named_or_skipped(tmp_path):
    _write_manifest(tmp_path, "hello")
    (tmp_path / "x.tsv").write_text("a.wav\t1.0\thello\nmissing.wav\t1.0\tworld\nbroken.wav\t1.0\tagain\n")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    utts = read_manifest(tmp_path, "x")
    with pytest.raises(NativeqError, match="missing audio file .*missing.wav .*--skip-bad"):
        check_audio(utts)
    with pytest.warns(UserWarning):
        good = check_audio(utts, skip_bad=True)
    assert [u.path.name for u in good] == ["a.wav"]
    with pytest.raises(NativeqError, match="corrupt or unsupported WAV .*broken.wav"):
        read_wav(tmp_path / "broken.wav")


def test_other_sample_rates_are_resampled(tmp_path):
    t = np.arange(8000) / 8000
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    path = tmp_path / "eight_k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(tone.tobytes())
    x = read_wav(path)
    assert len(x) == 16000
    peak_hz = np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x)
    assert abs(peak_hz - 440) <= 1
    assert np.allclose(resample(x, 16000, 16000), x, atol=1e-6)


def test_merged_corpus_lists_every_sources_utterances_with_their_audio(corpus, tmp_path, nativeq_cli):
    second = synth_tiny_corpus(tmp_path / "second", train=3, dev=0, test=1, other=0, seed=9)
    (second / "extra.tsv").write_text((second / "test.tsv").read_text())  # a split only one source has
    mixed = tmp_path / "mix" / "both"
    r = nativeq_cli("data", "merge", "-o", mixed, corpus, second)
    assert r.returncode == 0, r.stderr
    assert "train: 9 utterances" in r.stdout and "extra: 1 utterances" in r.stdout
    for split, sources in {"train": (corpus, second), "dev": (corpus,), "test": (corpus, second), "extra": (second,)}.items():
        expected = [u for src in sources for u in read_manifest(src, split)]
        merged = read_manifest(mixed, split)
        assert [(u.text, u.duration) for u in merged] == [(u.text, u.duration) for u in expected]
        # the merged rows point at the sources' own audio (relative to the merged corpus)
        assert all(m.path.resolve() == u.path.resolve() and m.path.read_bytes() == u.path.read_bytes()
                   for m, u in zip(merged, expected))
    voices = (mixed / "train.voices.tsv").read_text().splitlines()
    assert [v.split("\t")[1] for v in voices] == [
        line.split("\t")[1] for src in (corpus, second) for line in (src / "train.voices.tsv").read_text().splitlines()]
    assert not (mixed / "extra.voices.tsv").exists()
    r = nativeq_cli("data", "merge", "-o", mixed, corpus, second)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    r = nativeq_cli("data", "merge", "-o", tmp_path / "bad", corpus, tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing" in r.stderr
    assert not (tmp_path / "bad").exists()
