"""Distillation from the float model during QAT: the frame-level KL against a numpy reference,
its gradient, padded frames left out, and a fine-tune step that uses it."""

import json
import shutil

import numpy as np
import pytest
import torch

from nativeq.qat.distill import DistillationLoss, frame_kl

torch.set_num_threads(1)


def _kl_reference(student, teacher, lengths, t):
    """Mean over valid frames of sum_v p_t (log p_t - log p_s), softmax at temperature t, times t^2 (float64)."""
    def log_softmax(z):
        z = z / t
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    ls, lt = log_softmax(student.astype(np.float64)), log_softmax(teacher.astype(np.float64))
    rows = [(np.exp(lt[b, f]) * (lt[b, f] - ls[b, f])).sum() for b in range(len(lengths)) for f in range(lengths[b])]
    return np.mean(rows) * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frame_kl_matches_the_reference_and_ignores_padding(temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(3, 11, 29)).astype(np.float32) * 3
    teacher = rng.normal(size=(3, 11, 29)).astype(np.float32) * 3
    lengths = np.array([11, 7, 2])
    got = float(frame_kl(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(lengths), temperature))
    assert got == pytest.approx(_kl_reference(student, teacher, lengths, temperature), rel=1e-5)
    # what lies beyond each length does not count
    student[1, 7:] = 100.0
    student[2, 2:] = -100.0
    again = float(frame_kl(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(lengths), temperature))
    assert again == pytest.approx(got, rel=1e-6)


def test_frame_kl_is_zero_on_the_teacher_and_its_gradient_pulls_toward_it():
    rng = np.random.default_rng(1)
    teacher = torch.from_numpy(rng.normal(size=(2, 5, 29)).astype(np.float32))
    lengths = torch.tensor([5, 3])
    assert float(frame_kl(teacher.clone(), teacher, lengths)) == pytest.approx(0.0, abs=1e-6)
    student = torch.from_numpy(rng.normal(size=(2, 5, 29)).astype(np.float32)).requires_grad_(True)
    frame_kl(student, teacher, lengths).backward()
    # d/ds of mean KL = (softmax(s) - softmax(t)) / valid frames on valid frames, 0 on padding
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 8
    expected[1, 3:] = 0
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_distillation_loss_uses_the_frozen_teacher_on_the_same_batch():
    from nativeq.models.conformer import ConformerConfig, ConformerCTC

    torch.manual_seed(0)
    cfg = ConformerConfig(d_model=32, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=5, subsample_channels=4, dropout=0.0)
    teacher, student = ConformerCTC(cfg), ConformerCTC(cfg)
    x, lengths = torch.randn(2, 40, 80), torch.tensor([40, 25])
    loss_fn = DistillationLoss(teacher, weight=0.5)
    logits, out_lengths = student(x, lengths)
    with torch.no_grad():
        teacher_logits, _ = teacher(x, lengths)
    loss = loss_fn(x, lengths, logits, out_lengths)
    expected = 0.5 * float(frame_kl(logits.detach(), teacher_logits, out_lengths))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6) and expected > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # a student identical to its teacher has nothing to learn from it
    same = DistillationLoss(teacher, weight=1.0)(x, lengths, *teacher(x, lengths))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_finetune_with_distillation_trains_and_resumes(tmp_path, monkeypatch):
    from test_finetune import SMALL

    from nativeq.models.conformer import ConformerCTC
    from nativeq.models.data import SynthConfig, synthesize_corpus
    from nativeq.models.train import save_run
    from nativeq.qat.finetune import FinetuneConfig, finetune

    for tool in ("espeak-ng", "flite", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make apt)")
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(train=8, dev=2, test=0, other=0, jobs=1), progress=False)
    torch.manual_seed(0)
    source = tmp_path / "float"
    source.mkdir()
    save_run(source, ConformerCTC(SMALL))
    run = tmp_path / "kd"
    calls = []
    original = DistillationLoss.__call__
    monkeypatch.setattr(DistillationLoss, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    common = dict(source=str(source), data=str(corpus), out=str(run), weight_bits=4, batch_size=4, progress=False,
                  distill=1.0)
    finetune(FinetuneConfig(steps=2, **common))
    finetune(FinetuneConfig(steps=4, resume=True, **common))  # the teacher comes back from the run's source
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["train_loss"]) for r in log)
    assert len(calls) == 4  # the distillation term joined every optimizer step, before and after the resume
    assert json.loads((run / "train_config.json").read_text())["steps"] == 4


def test_negative_distillation_weight_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from nativeq.cli import main

    result = CliRunner().invoke(main, ["finetune", "conformer-tiny", "--data", str(tmp_path), "--distill", "-1",
                                       "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--distill -1.0 must be >= 0" in result.stderr, result.output
