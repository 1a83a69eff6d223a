"""Checkpoint averaging: per-epoch snapshots (`--keep-epochs`), `nativeq average`, and its errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nativeq.errors import NativeqError
from nativeq.models.average import AverageConfig, average_run, average_states, list_snapshots
from nativeq.models.conformer import ConformerConfig, ConformerCTC
from nativeq.models.pretrained import load_model
from nativeq.models.train import TrainConfig, save_run, train
from speech_fixtures import synth_tiny_corpus

torch.set_num_threads(1)
SMALL = ConformerConfig(d_model=48, n_layers=2, n_heads=2, ff_mult=2, conv_kernel=7, subsample_channels=8, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_tiny_corpus(tmp_path_factory.mktemp("avg") / "speech", train=12, dev=2, test=2, seed=3)


def test_average_states_means_floats_and_requires_equal_masks_and_buffers():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 8, generator=g) > 0.5).float()
    states = [{"w": torch.randn(4, 8, generator=g), "w_mask": mask.clone(), "layer.weight_mask": mask.clone(),
               "flag": torch.tensor(True)} for _ in range(3)]
    out = average_states(states, ["a", "b", "c"])
    expected = np.mean([s["w"].double().numpy() for s in states], axis=0).astype(np.float32)
    assert np.array_equal(out["w"].numpy(), expected)
    assert torch.equal(out["layer.weight_mask"], mask) and bool(out["flag"])
    assert out["w"].dtype == torch.float32

    states[2]["layer.weight_mask"] = 1 - mask
    with pytest.raises(NativeqError, match="a and c have different sparsity masks"):
        average_states(states, ["a", "b", "c"])
    states[2]["layer.weight_mask"] = mask.clone()
    states[1]["flag"] = torch.tensor(False)
    with pytest.raises(NativeqError, match="different buffers \\(flag\\)"):
        average_states(states, ["a", "b", "c"])
    with pytest.raises(NativeqError, match="other tensors"):
        average_states([states[0], {"w": states[0]["w"]}], ["a", "b"])


def test_float_run_keeps_the_last_epochs_and_averages_them(corpus, tmp_path, nativeq_cli):
    run = tmp_path / "run"
    train(TrainConfig(data=str(corpus), out=str(run), epochs=4, batch_size=4, warmup_steps=2, max_dev=2,
                      keep_epochs=2, progress=False))
    snapshots = list_snapshots(run)
    assert [(s["epoch"], s["step"]) for s in snapshots] == [(3, 9), (4, 12)]
    # the newest snapshot is the run's final model
    assert all(torch.equal(a, b) for a, b in zip(load_file(snapshots[-1]["path"]).values(),
                                                 load_file(run / "model.safetensors").values()))

    r = nativeq_cli("average", run, "-o", tmp_path / "avg", "--last", "2")
    assert r.returncode == 0, r.stderr
    assert "epochs 3-4" in r.stdout
    states = [load_file(s["path"]) for s in snapshots]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    for key, value in averaged.items():
        expected = ((states[0][key].double() + states[1][key].double()) / 2).float()
        assert torch.equal(value, expected), key
    config = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert config["averaged"] == {"source": str(run), "epochs": [3, 4], "steps": [9, 12]} and "dev" not in config
    model, _ = load_model(tmp_path / "avg")
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 60, 80), torch.tensor([60]))
    assert torch.isfinite(logits).all()

    r = nativeq_cli("average", run, "-o", tmp_path / "avg", "--last", "2")
    assert r.returncode == 2 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    r = nativeq_cli("average", run, "-o", tmp_path / "avg3", "--last", "3")
    assert r.returncode == 2 and "keeps only 2 epoch snapshot(s) (epochs 3-4)" in r.stderr
    assert not (tmp_path / "avg3").exists()


def test_qat_run_averages_after_the_masks_froze_and_exports(corpus, tmp_path, nativeq_cli):
    from nativeq.export.lint import lint_qdq
    from nativeq.qat.finetune import load_qat_model
    from nativeq.qat.quantize import quant_layers
    from nativeq.qat.sparsity import sparsity_report

    source = tmp_path / "float"
    source.mkdir()
    torch.manual_seed(0)
    save_run(source, ConformerCTC(SMALL))
    run = tmp_path / "qat"
    # 3 batches per epoch, 9 steps: the 2:4 masks ramp over steps 0-4 and are frozen from step 4 on
    r = nativeq_cli("finetune", source, "--data", corpus, "--weight-bits", "4", "--sparsity", "2:4", "--steps", "9",
                    "--batch-size", "4", "--keep-epochs", "3", "-o", run)
    assert r.returncode == 0, r.stderr
    assert [s["step"] for s in list_snapshots(run)] == [3, 6, 9]

    r = nativeq_cli("average", run, "-o", tmp_path / "all3", "--last", "3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "different sparsity masks" in r.stderr
    average_run(AverageConfig(run=str(run), out=str(tmp_path / "avg"), last=2))
    model, _, qat = load_qat_model(tmp_path / "avg")
    assert qat["sparsity"]["pattern"] == "2:4"
    assert all(r["violations"] == 0 for r in sparsity_report(model).values())
    assert all(bool(layer.mask_frozen) for _, layer in quant_layers(model))
    r = nativeq_cli("export", tmp_path / "avg", "-o", tmp_path / "avg.onnx")
    assert r.returncode == 0, r.stderr
    import onnx

    assert lint_qdq(onnx.load(str(tmp_path / "avg.onnx"))) == []


def test_average_bad_inputs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_run(run, ConformerCTC(SMALL))
    with pytest.raises(NativeqError, match="no epoch snapshots"):
        average_run(AverageConfig(run=str(run), out=str(tmp_path / "o")))
    with pytest.raises(NativeqError, match="not a run directory"):
        average_run(AverageConfig(run=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    with pytest.raises(NativeqError, match="--last 0"):
        average_run(AverageConfig(run=str(run), out=str(tmp_path / "o"), last=0))
