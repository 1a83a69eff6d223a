"""Training: smoke epoch, learning on a tiny corpus, resume, run-dir loading, CLI errors, DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nativeq.errors import NativeqError
from nativeq.models.conformer import ConformerConfig, ConformerCTC
from nativeq.models.data import read_manifest
from nativeq.models.evaluate import EvalConfig, evaluate, evaluate_run
from nativeq.models.pretrained import load_model
from nativeq.models.train import TrainConfig, save_run, train, train_loop
from speech_fixtures import synth_tiny_corpus

SMALL = ConformerConfig(d_model=48, n_layers=2, n_heads=4, conv_kernel=7, subsample_channels=8, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_tiny_corpus(tmp_path_factory.mktemp("t") / "speech", train=8, dev=3, test=3, seed=1)


def _cfg(corpus, out, **kw):
    base = dict(model="conformer-tiny", data=str(corpus), out=str(out), epochs=1, batch_size=4, warmup_steps=2,
                progress=False, max_dev=3)
    base.update(kw)
    return TrainConfig(**base)


def test_one_epoch_smoke_train_then_eval_and_export(corpus, tmp_path, nativeq_cli):
    run = tmp_path / "run"
    metrics = train(_cfg(corpus, run))
    assert set(metrics) >= {"wer", "cer"}
    for name in ("config.json", "model.safetensors", "checkpoint.pt", "log.jsonl"):
        assert (run / name).is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and log[0]["step"] == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    model, cfg = load_model(run)
    assert cfg.d_model == 144
    assert model.feat_mean.abs().sum() > 0  # normalization statistics from the training audio

    result = evaluate_run(EvalConfig(model=str(run), data=str(corpus), split="test"))
    assert result["utterances"] == 3 and 0 <= result["cer"]
    r = nativeq_cli("export-float", run, "-o", tmp_path / "float.onnx")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "float.onnx").stat().st_size > 1e6 and "max |diff|" in r.stdout


def test_training_learns_a_tiny_corpus(corpus, tmp_path):
    torch.manual_seed(0)
    model = ConformerCTC(SMALL)
    utts = read_manifest(corpus, "train")[:4]
    before = evaluate(model, corpus, "train", limit=4)
    losses = []

    def record(m, step):
        losses.append(step)

    cfg = _cfg(corpus, tmp_path / "fit", steps=40, epochs=40, lr=3e-3, warmup_steps=5, spec_augment=False, max_dev=2)
    train_loop(model, utts, utts[:2], cfg, tmp_path / "fit", after_step=record)
    log = [json.loads(line) for line in (tmp_path / "fit" / "log.jsonl").read_text().splitlines()]
    assert losses == list(range(1, 41))
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    after = evaluate(model, corpus, "train", limit=4)
    assert after["cer"] < before["cer"]


def test_resume_continues_from_the_last_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    train(_cfg(corpus, run, steps=4, stop_after_epoch=1))  # stops (as if crashed) after epoch 1 of 2
    with pytest.raises(NativeqError, match="already holds a run"):
        train(_cfg(corpus, run, epochs=2, steps=4))
    train(_cfg(corpus, run, epochs=2, steps=4, resume=True))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 2), (2, 4)]


def test_resume_on_a_bigger_corpus_trains_to_the_new_step_count(corpus, tmp_path):
    # 2 utterances (1 batch per epoch) for 3 steps, then the full 8 (4 batches per epoch) up to step 7:
    # the checkpoint's epoch count is past what the new corpus needs, the step count is not.
    lines = (Path(corpus) / "train.tsv").read_text().splitlines()
    (Path(corpus) / "train-first2.tsv").write_text("\n".join(lines[:2]) + "\n")
    run = tmp_path / "run"
    train(_cfg(corpus, run, steps=3, batch_size=2, train_split="train-first2"))
    train(_cfg(corpus, run, steps=7, batch_size=2, resume=True))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 1), (2, 2), (3, 3), (4, 7)]


def test_init_starts_from_a_models_weights_with_a_fresh_schedule(corpus, tmp_path, nativeq_cli):
    # From the shipped model: its normalization is kept exactly, the step count starts from 0, and
    # two small steps move the weights only slightly (a run from scratch would be far away).
    source, _ = load_model("conformer-tiny")
    run = tmp_path / "run"
    cfg = _cfg(corpus, run, steps=2, init="conformer-tiny", lr=1e-3)
    train(cfg)
    trained, _ = load_model(run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]
    assert torch.equal(trained.feat_mean, source.feat_mean) and torch.equal(trained.feat_inv_std, source.feat_inv_std)
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, source.state_dict()[k])]
    assert moved and all(not k.startswith("feat_") for k in moved)
    # two steps at lr 1e-3 stay close to the start: the run began from the shipped weights, not from scratch
    assert max((trained.state_dict()[k] - source.state_dict()[k]).abs().max() for k in moved) < 0.05
    r = nativeq_cli("train", "--data", corpus, "-o", tmp_path / "both", "--init", "conformer-tiny", "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--init" in r.stderr
    r = nativeq_cli("train", "--data", corpus, "-o", tmp_path / "missing", "--init", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_vtlp_draws_warps_on_a_grid_and_trains(corpus, tmp_path, nativeq_cli):
    from nativeq.models.train import vtlp_warp

    generator = torch.Generator().manual_seed(0)
    warps = [vtlp_warp(0.1, generator) for _ in range(400)]
    assert min(warps) == pytest.approx(0.9) and max(warps) == pytest.approx(1.1)
    assert all(abs(w * 100 - round(w * 100)) < 1e-9 for w in warps) and len(set(warps)) == 21
    assert vtlp_warp(0.0, generator) == 1.0
    train(_cfg(corpus, tmp_path / "run", vtlp=0.1))
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["vtlp"] == 0.1
    r = nativeq_cli("train", "--data", corpus, "-o", tmp_path / "bad", "--vtlp", "0.7")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--vtlp 0.7" in r.stderr


def test_checkpoint_of_another_config_is_one_line_error(corpus, tmp_path, nativeq_cli):
    run = tmp_path / "mixed"
    run.mkdir()
    save_run(run, ConformerCTC(SMALL))
    config = json.loads((run / "config.json").read_text())
    config["model"]["d_model"] = 64
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(NativeqError, match="different model config"):
        load_model(run)
    r = nativeq_cli("eval", run, "--data", corpus)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "different model config" in r.stderr
    with pytest.raises(NativeqError, match="neither a run directory nor a shipped model"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(NativeqError, match="no manifest"):
        train(_cfg(tmp_path, tmp_path / "r"))


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(corpus, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    nativeq = Path(sys.executable).with_name("nativeq")
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(nativeq), "train", "--data", str(corpus), "-o", str(run),
         "--epochs", "2", "--batch-size", "2", "--warmup", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # 8 utterances in batches of 2 = 4 batches, split over 2 ranks: 2 steps per epoch
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 2), (2, 4)]
    load_model(run)


# ----------------------------------------------------------------------------- the shipped model
def _card_metrics():
    from nativeq.models.pretrained import PRETRAINED_DIR

    path = PRETRAINED_DIR / "conformer-tiny" / "metrics.json"
    if not path.is_file():
        pytest.fail("the shipped conformer-tiny has no metrics.json")
    return json.loads(path.read_text())


def test_shipped_model_loads_by_name_and_matches_its_card_on_fresh_audio(tmp_path):
    model, cfg = load_model("conformer-tiny")
    card = _card_metrics()
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    # Fresh utterances from the test voices, a seed the card's numbers were not measured on.
    data = synth_tiny_corpus(tmp_path / "fresh", train=0, dev=0, test=24, seed=1234)
    result = evaluate(model, data, "test")
    # 24 utterances (~100 words): allow sampling noise around the card's 300-utterance WER.
    assert result["wer"] <= card["test"]["wer"] + 0.12, (result, card["test"])


def test_shipped_model_reproduces_its_card_on_recorded_human_speech(tmp_path):
    from nativeq.models.data import HUMAN_SOURCES, build_human_eval

    if not all(path.is_file() for _, path, _ in HUMAN_SOURCES):
        pytest.skip("recorded speech packages not installed (apt-get install pocketsphinx-testdata alsa-utils)")
    build_human_eval(tmp_path)
    model, _ = load_model("conformer-tiny")
    result = evaluate(model, tmp_path, "eval-human")
    card = _card_metrics()["eval-human"]
    assert result["utterances"] == card["utterances"]
    assert abs(result["wer"] - card["wer"]) < 1e-6 and abs(result["cer"] - card["cer"]) < 1e-6
