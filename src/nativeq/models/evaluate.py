"""Evaluation: greedy CTC decoding of a split, WER and CER with jiwer.

`evaluate(model, data_dir, split)` -> {"wer", "cer", "utterances", "hours", "split", ...};
`evaluate_utterances(model, utts)` is the same on an already-read list.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from nativeq.models.data import Utterance, check_audio, read_manifest


def evaluate_utterances(model, utts: list[Utterance], batch_size: int = 16, examples: int = 0) -> dict:
    import jiwer

    from nativeq.models.train import collate, greedy_decode, utterance_features

    was_training = model.training
    model.eval()
    refs, hyps = [], []
    device = next(model.parameters()).device
    ordered = sorted(utts, key=lambda u: u.duration)
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            x, lengths = collate([utterance_features(u) for u in chunk])
            logits, out_lengths = model(x.to(device), lengths.to(device))
            hyps += greedy_decode(logits.cpu(), out_lengths.cpu())
            refs += [u.text for u in chunk]
    model.train(was_training)
    # jiwer refuses empty hypotheses in some versions: an empty output is all deletions.
    safe_hyps = [h if h.strip() else "<empty>" for h in hyps]
    result = {
        "wer": float(jiwer.wer(refs, safe_hyps)),
        "cer": float(jiwer.cer(refs, hyps if all(hyps) else safe_hyps)),
        "utterances": len(utts),
        "hours": sum(u.duration for u in utts) / 3600,
    }
    if examples:
        result["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:examples]]
    return result


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = "conformer-tiny"  # run directory or shipped model name
    data: str = "data/speech"
    split: str = "test"
    batch_size: int = 16
    threads: int = 1
    skip_bad: bool = False
    limit: int = 0  # evaluate only the first N utterances (0 = all)


def evaluate(model, data_dir: str | os.PathLike, split: str = "test", batch_size: int = 16, skip_bad: bool = False,
             limit: int = 0) -> dict:
    """WER/CER of `model` on `<data_dir>/<split>.tsv`."""
    utts = check_audio(read_manifest(data_dir, split), skip_bad)
    if limit:
        utts = utts[:limit]
    result = evaluate_utterances(model, utts, batch_size=batch_size, examples=3)
    result["split"] = split
    return result


def evaluate_run(cfg: EvalConfig) -> dict:
    """`nativeq eval`: load a run directory or shipped model and evaluate it on one split.

    The name `pocketsphinx` evaluates that baseline recognizer instead (see baseline.py).
    """
    from nativeq.models.pretrained import load_model

    if cfg.model == "pocketsphinx" and not os.path.isdir(cfg.model):
        from nativeq.models.baseline import evaluate_pocketsphinx

        return evaluate_pocketsphinx(cfg.data, cfg.split, cfg.limit, cfg.skip_bad)

    torch.set_num_threads(max(1, cfg.threads))
    model, _ = load_model(cfg.model)
    result = evaluate(model, cfg.data, cfg.split, cfg.batch_size, cfg.skip_bad, cfg.limit)
    result["model"] = cfg.model
    return result
