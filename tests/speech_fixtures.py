"""A tiny synthesized speech corpus shared by the data and training tests."""

import shutil

import pytest


def require_tts(*tools: str) -> None:
    missing = [t for t in ("espeak-ng", "flite", "sox", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"TTS tools not installed: {' '.join(missing)} (make setup)")


def synth_tiny_corpus(out, train=8, dev=3, test=3, other=0, seed=0):
    from nativeq.models.data import SynthConfig, synthesize_corpus

    require_tts(*(["text2wave"] if other else []))
    synthesize_corpus(out, SynthConfig(train=train, dev=dev, test=test, other=other, seed=seed, jobs=1), progress=False)
    return out
