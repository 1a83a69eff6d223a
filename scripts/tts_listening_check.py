"""Is a TTS engine's English intelligible? Synthesize the corpus's kind of text with kokoro and with
espeak-ng, transcribe both with the shipped model and with pocketsphinx, print WER per engine.

    .venv/bin/python scripts/tts_listening_check.py --out /tmp/kokoro-check/listen -n 100

The same N texts (the corpus's text generator) are spoken by:
- kokoro: a voice drawn per utterance from all 70 kokoro voices (train, dev and test blends);
- espeak-ng (corpus voices): a voice variant drawn from all of the corpus's espeak-ng variants,
  with the corpus's random accent, rate, pitch and word gap;
- espeak-ng (en-us): espeak-ng's default en-us voice at its default rate.
Clean audio (no sox effects, no noise): intelligibility of the engine, not noise robustness.

pocketsphinx decodes twice: with its general-English 3-gram LM (`nativeq eval pocketsphinx`,
the criterion) and with a unigram LM over the corpus's vocabulary (every word the text
generator can produce, uniform), which leans on the acoustics instead of the LM.

Criterion: kokoro is intelligible if pocketsphinx's WER on it is within 1.5x of its WER on
espeak-ng (corpus voices). Needs the `tts` extra (kokoro), espeak-ng and pocketsphinx.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from nativeq.models.data import (
    DEV_VARIANTS, KOKORO_VOICES, SAMPLE_RATE, TEST_VARIANTS, TRAIN_VARIANTS, _random_text, _run,
    _synthesize_raw, read_wav, write_wav,
)
from nativeq.models.evaluate import EvalConfig, evaluate_run
from nativeq.models.text import normalize_text

ENGINES = {  # split name -> (engine, voices) ; None voices: espeak-ng's default
    "kokoro": ("kokoro", KOKORO_VOICES["train"] + KOKORO_VOICES["dev"] + KOKORO_VOICES["test"]),
    "espeak-ng": ("espeak-ng", TRAIN_VARIANTS + DEV_VARIANTS + TEST_VARIANTS),
    "espeak-ng-en-us": ("espeak-ng", None),
}
CRITERION = 1.5


def texts(n: int, seed: int) -> list[str]:
    return [_random_text(np.random.default_rng([seed, 99, i])) for i in range(n)]


def corpus_vocabulary_lm(path: Path) -> int:
    """A uniform unigram ARPA LM over the words of the corpus's text generator (in pocketsphinx's dictionary)."""
    from pocketsphinx import Decoder

    words = sorted({w for i in range(20000) for w in _random_text(np.random.default_rng([12345, i])).split()})
    d = Decoder(loglevel="FATAL")
    words = [w for w in words if d.lookup_word(w) is not None]
    logp = -np.log10(len(words) + 1)
    lines = ["\\data\\", f"ngram 1={len(words) + 2}", "", "\\1-grams:", f"{logp:.4f} </s>", "-99.0000 <s>"]
    lines += [f"{logp:.4f} {w}" for w in words]
    path.write_text("\n".join(lines + ["", "\\end\\", ""]))
    return len(words)


def pocketsphinx_wer(data_dir: Path, split: str, lm: Path) -> float:
    """pocketsphinx with the LM at `lm` (else as `nativeq eval pocketsphinx`), jiwer WER."""
    import jiwer
    from pocketsphinx import Decoder

    from nativeq.models.data import read_manifest

    d = Decoder(lm=str(lm), loglevel="FATAL")
    refs, hyps = [], []
    for u in read_manifest(data_dir, split):
        d.start_utt()
        d.process_raw((np.clip(read_wav(u.path), -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        d.end_utt()
        words = [w.split("(")[0] for w in (d.hyp().hypstr if d.hyp() is not None else "").split()]
        refs.append(u.text)
        hyps.append(normalize_text(" ".join(words)) if words else "<empty>")
    return float(jiwer.wer(refs, hyps))


def synthesize(out: Path, split: str, lines: list[str], seed: int) -> None:
    engine, voices = ENGINES[split]
    (out / "wav" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(lines):
        rng = np.random.default_rng([seed, 98, i])
        with tempfile.TemporaryDirectory(prefix="nativeq-listen-") as tmp:
            if voices is None:
                raw = Path(tmp) / "tts.wav"
                _run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], "espeak-ng en-us")
            else:
                voice = voices[int(rng.integers(len(voices)))]
                raw = _synthesize_raw(engine, voice, text, rng, Path(tmp))
            x = read_wav(raw)  # 16 kHz float32 (resampled by audio.read_audio)
        x = x / max(1e-9, float(np.abs(x).max())) * 0.5
        pcm = np.round(x * 32767.0).astype(np.int16)
        rel = f"wav/{split}/{i:04d}.wav"
        write_wav(out / rel, pcm)
        rows.append(f"{rel}\t{len(pcm) / SAMPLE_RATE:.3f}\t{text}")
    (out / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/kokoro-check/listen", help="Scratch corpus directory (replaced).")
    ap.add_argument("-n", type=int, default=100, help="Utterances per engine.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="conformer-tiny", help="Shipped model name or run directory.")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lines = texts(args.n, args.seed)
    lm = out / "corpus-vocabulary.arpa"
    n_words = corpus_vocabulary_lm(lm)
    results = {}
    for split in ENGINES:
        synthesize(out, split, lines, args.seed)
        model = evaluate_run(EvalConfig(model=args.model, data=str(out), split=split, threads=args.threads))
        ps = evaluate_run(EvalConfig(model="pocketsphinx", data=str(out), split=split))
        ps_vocab = pocketsphinx_wer(out, split, lm)
        results[split] = (model["utterances"], model["hours"] * 60, model["wer"], ps["wer"], ps_vocab)
        print(f"done {split}: model WER {model['wer']:.3f}, pocketsphinx WER {ps['wer']:.3f} "
              f"(corpus-vocabulary LM {ps_vocab:.3f})", flush=True)

    print(f"\n| engine | utterances | minutes | {args.model} WER | pocketsphinx WER | "
          f"pocketsphinx WER, {n_words}-word corpus-vocabulary LM |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for split, (n, minutes, wer_model, wer_ps, wer_vocab) in results.items():
        print(f"| {split} | {n} | {minutes:.1f} | {100 * wer_model:.1f}% | {100 * wer_ps:.1f}% | {100 * wer_vocab:.1f}% |")
    ratio = results["kokoro"][3] / max(results["espeak-ng"][3], 1e-9)
    verdict = "intelligible" if ratio <= CRITERION else "NOT intelligible"
    print(f"\npocketsphinx WER kokoro / espeak-ng (corpus voices) = {ratio:.2f} (criterion <= {CRITERION}): {verdict}")
    ratio_vocab = results["kokoro"][4] / max(results["espeak-ng"][4], 1e-9)
    print(f"with the corpus-vocabulary LM: {ratio_vocab:.2f}")


if __name__ == "__main__":
    main()
