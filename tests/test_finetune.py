"""Fine-tune smoke test on a tiny synthesized corpus: `nativeq finetune` (int4 + 2:4), resume, `nativeq export`,
and the bad inputs (another architecture's checkpoint, a float run where a finetune run is expected)."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from nativeq.models.conformer import ConformerConfig, ConformerCTC
from nativeq.models.train import save_run

torch.set_num_threads(1)
SMALL = ConformerConfig(d_model=48, n_layers=2, n_heads=2, ff_mult=2, conv_kernel=7, subsample_channels=8, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from nativeq.models.data import SynthConfig, synthesize_corpus

    for tool in ("espeak-ng", "flite", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make apt)")
    out = tmp_path_factory.mktemp("speech") / "corpus"
    synthesize_corpus(out, SynthConfig(train=12, dev=4, test=4, other=0, jobs=1), progress=False)
    return out


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("float") / "run"
    run.mkdir()
    save_run(run, ConformerCTC(SMALL))
    return run


@pytest.fixture(scope="module")
def qat_run(corpus, float_run, tmp_path_factory):
    from click.testing import CliRunner

    from nativeq.cli import main

    out = tmp_path_factory.mktemp("qat") / "int4-2to4"
    args = ["finetune", str(float_run), "--data", str(corpus), "--weight-bits", "4", "--act-bits", "8",
            "--sparsity", "2:4", "--mixed", "--steps", "3", "--batch-size", "4", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_finetune_writes_a_quantized_sparse_run(qat_run):
    from nativeq.qat.finetune import load_qat_model
    from nativeq.qat.quantize import quant_layers
    from nativeq.qat.sparsity import sparsity_report

    config = json.loads((qat_run / "config.json").read_text())
    assert config["qat"]["quant"]["weight_bits"] == 4 and config["qat"]["sparsity"]["pattern"] == "2:4"
    log = [json.loads(line) for line in (qat_run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3
    model, _, _ = load_qat_model(qat_run)
    bits = {n: l.weight_bits for n, l in quant_layers(model)}
    assert bits["head"] == 8 and bits["subsample.conv1"] == 8 and bits["blocks.0.ff1.fc1"] == 4
    report = sparsity_report(model)
    assert all(r["violations"] == 0 for r in report.values())
    assert report["blocks.1.attn.q_proj"]["zeros"] >= 0.5  # the ramp ends at step 2 of 3: masks final and frozen
    assert all(bool(l.mask_frozen) for _, l in quant_layers(model))
    # `nativeq eval` (models.load_model) reads a finetune run as its integer QAT model
    from nativeq.models.pretrained import load_model

    loaded, _ = load_model(qat_run)
    assert len(quant_layers(loaded)) == len(quant_layers(model)) and not loaded.training


def test_resume_continues_from_the_checkpoint(qat_run, corpus, tmp_path):
    from nativeq.qat.finetune import FinetuneConfig, finetune

    run = tmp_path / "resumed"
    shutil.copytree(qat_run, run)
    before = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    finetune(FinetuneConfig(source="unused", data=str(corpus), out=str(run), weight_bits=4, sparsity="2:4", mixed=True,
                            steps=6, batch_size=4, resume=True, progress=False))
    after = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert (before, after) == (3, 6)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]


def test_export_cli_writes_a_linted_qdq_file(qat_run, nativeq_cli, tmp_path):
    from nativeq.export.fidelity import ort_session
    from nativeq.qat.convert import convert
    from nativeq.qat.finetune import load_qat_model

    out = tmp_path / "asr.onnx"
    r = nativeq_cli("export", qat_run, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "weights 4-bit" in r.stdout and "sparsity 2:4" in r.stdout and "QDQ lint: clean" in r.stdout
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nativeq.weight_bits"] == "4,8" and "2:4" in meta["nativeq.sparsity"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "T", 80]
    int_model = convert(load_qat_model(qat_run)[0])
    head_scale = float(int_model.head.output_scale)
    sess = ort_session(proto)
    for t in (60, 131):  # two lengths through the symbolic time axis
        feats = np.random.default_rng(t).normal(size=(1, t, 80)).astype(np.float32)
        logits = sess.run(None, {"feats": feats})[0]
        with torch.no_grad():
            ref = int_model(torch.from_numpy(feats))[0].numpy()
        assert logits.shape == ref.shape == (1, ((t - 1) // 2 - 1) // 2, 29)
        assert np.mean(np.abs(logits - ref) <= head_scale * 1.0001) >= 0.99
    # refusing to overwrite
    r = nativeq_cli("export", qat_run, "-o", out)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "already exists" in r.stderr


def _cli(*args):
    """In-process CLI run (same error handling as the `nativeq` process, without its start-up cost)."""
    from click.testing import CliRunner

    from nativeq.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


def test_bad_inputs_are_one_line_errors(qat_run, float_run, corpus, nativeq_cli, tmp_path):
    # a float run where a finetune run is expected (as a real process: no traceback)
    r = nativeq_cli("export", float_run, "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "float run, not a finetune run" in r.stderr and "Traceback" not in r.stderr
    # a checkpoint of another architecture
    other = tmp_path / "other"
    shutil.copytree(qat_run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["d_model"] = 64
    config["model"]["n_heads"] = 2
    (other / "config.json").write_text(json.dumps(config))
    code, err = _cli("finetune", "x", "--data", corpus, "--weight-bits", "4", "--sparsity", "2:4", "--steps", "4",
                     "--resume", "-o", other)
    assert code == 2 and "different model config" in err and len(err.strip().splitlines()) == 1
    # fine-tuning a finetune run again
    code, err = _cli("finetune", qat_run, "--data", corpus, "-o", tmp_path / "again")
    assert code == 2 and "already a finetune run" in err
    # bad configs
    for args, msg in [(["--weight-bits", "3"], "weight bits 3 not supported"),
                      (["--sparsity", "4:2"], "need 1 <= N < M"),
                      (["--sparsity", "1.0"], "must be in (0, 1)")]:
        code, err = _cli("finetune", float_run, "--data", corpus, "-o", tmp_path / "bad", *args)
        assert code == 2 and msg in err and err.startswith("error: "), err


@pytest.mark.slow
def test_export_fidelity_on_a_trained_conformer(tmp_path):
    """ORT on the exported QDQ file vs the PyTorch integer model, on real test-split speech.

    Source: $NATIVEQ_FLOAT_RUN, else the shipped conformer-tiny; data: $NATIVEQ_DATA or data/speech.
    """
    import os
    from pathlib import Path

    from nativeq.export.fidelity import compare_layers, compare_layers_isolated, ort_session
    from nativeq.models.data import read_manifest
    from nativeq.models.pretrained import load_model, pretrained_names
    from nativeq.models.train import greedy_decode, utterance_features
    from nativeq.qat.convert import convert
    from nativeq.qat.finetune import ExportRunConfig, FinetuneConfig, export_run, finetune

    source = os.environ.get("NATIVEQ_FLOAT_RUN") or ("conformer-tiny" if "conformer-tiny" in pretrained_names() else None)
    data = Path(os.environ.get("NATIVEQ_DATA", Path(__file__).resolve().parents[1] / "data" / "speech"))
    if source is None or not (data / "test.tsv").exists():
        pytest.skip("needs a trained float model ($NATIVEQ_FLOAT_RUN or shipped conformer-tiny) and data/speech")
    run = tmp_path / "qat"
    finetune(FinetuneConfig(source=source, data=str(data), out=str(run), weight_bits=4, mixed=True, sparsity="2:4",
                            steps=40, max_dev=20, progress=False))
    result = export_run(ExportRunConfig(run=str(run), out=str(tmp_path / "m.onnx")))
    assert result["lint"] == []
    proto = onnx.load(str(tmp_path / "m.onnx"))
    int_model = convert(load_model(run)[0])
    feeds = [{"feats": utterance_features(u)[None].numpy()} for u in read_manifest(data, "test")[:30]]
    isolated = compare_layers_isolated(int_model, proto, feeds)
    assert all(r.exact == 1.0 for r in isolated), [r for r in isolated if r.exact < 1]
    # End to end: the float ops between the integer layers (LayerNorm, softmax, SiLU) run as ORT runs them
    # (qat.float_islands), so a flipped int8 value is rare (rotary's Cos/Sin still come from PyTorch).
    propagated = compare_layers(int_model, proto, feeds)
    total = sum(r.elements for r in propagated)
    exact = sum(r.exact * r.elements for r in propagated) / total
    sess = ort_session(proto)
    step = float(int_model.head.output_scale)
    within, same = 0, 0
    for feed in feeds:
        ort_logits = torch.from_numpy(sess.run(None, feed)[0])
        with torch.no_grad():
            logits = int_model(torch.from_numpy(feed["feats"]))[0]
        within += int((ort_logits - logits).abs().max() <= step * 1.0001)
        same += int(greedy_decode(ort_logits) == greedy_decode(logits))
    print(f"propagated: {exact:.7f} exact ({round(total * (1 - exact))} of {total} differ), "
          f"max {max(r.max_steps for r in propagated)} steps; "
          f"logits within 1 step {within}/{len(feeds)}; transcripts identical {same}/{len(feeds)}")
    # the bar: >= 99.99% exact, never more than 1 step, logits within 1 step, same transcripts
    assert exact >= 0.9999 and max(r.max_steps for r in propagated) <= 1
    assert within == len(feeds) and same == len(feeds)
