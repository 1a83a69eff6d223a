"""The baseline a user might pick instead: pocketsphinx (CMU GMM-HMM en-US acoustic model with
its general-English 3-gram LM and dictionary, from the PyPI wheel; decodes offline).

`evaluate_pocketsphinx(data_dir, split)` scores it exactly like `evaluate` scores ours (same
manifest, same normalization, jiwer WER/CER), so the model card compares like with like.
"""

from __future__ import annotations

import os

import numpy as np

from nativeq.errors import NativeqError
from nativeq.models.data import check_audio, read_manifest, read_wav
from nativeq.models.text import normalize_text


def evaluate_pocketsphinx(data_dir: str | os.PathLike, split: str = "test", limit: int = 0, skip_bad: bool = False) -> dict:
    import jiwer

    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise NativeqError("the pocketsphinx baseline needs the pocketsphinx package (pip install pocketsphinx)") from None
    utts = check_audio(read_manifest(data_dir, split), skip_bad)
    if limit:
        utts = utts[:limit]
    decoder = Decoder(loglevel="FATAL")
    refs, hyps = [], []
    for u in utts:
        pcm = (np.clip(read_wav(u.path), -1, 1) * 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp().hypstr if decoder.hyp() is not None else ""
        # pocketsphinx writes alternative pronunciations as word(2); keep the word only
        words = [w.split("(")[0] for w in hyp.split()]
        try:
            hyp = normalize_text(" ".join(words)) if words else ""
        except NativeqError:
            hyp = " ".join(words)
        refs.append(u.text)
        hyps.append(hyp)
    safe = [h if h.strip() else "<empty>" for h in hyps]
    return {"wer": float(jiwer.wer(refs, safe)), "cer": float(jiwer.cer(refs, safe)), "utterances": len(utts),
            "hours": sum(u.duration for u in utts) / 3600, "split": split, "model": "pocketsphinx",
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
