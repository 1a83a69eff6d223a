"""`nativeq demo --quick` end to end: every stage runs, the report and summary hold real, consistent
numbers, the artifacts load, the plots are real images; bad options are one-line errors."""

import json
import struct

import pytest
import torch

from speech_fixtures import require_tts


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    """The shipped conformer-tiny when present, else a float run of the same architecture (random weights)."""
    from nativeq.models.conformer import ConformerCTC, preset
    from nativeq.models.pretrained import pretrained_names
    from nativeq.models.train import save_run

    if "conformer-tiny" in pretrained_names():
        return "conformer-tiny"
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("source") / "float"
    run.mkdir()
    save_run(run, ConformerCTC(preset("conformer-tiny")))
    return str(run)


@pytest.fixture(scope="module")
def demo_out(source_model, tmp_path_factory):
    import subprocess
    import sys
    from pathlib import Path

    require_tts()
    root = tmp_path_factory.mktemp("demo")
    exe = Path(sys.executable).with_name("nativeq")
    proc = subprocess.run([str(exe), "demo", "--quick", "--out", "out", "--model", source_model, "--threads", "1"],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "out", proc.stdout


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


def test_quick_demo_report_has_real_numbers(demo_out):
    out, stdout = demo_out
    summary = json.loads((out / "summary.json").read_text())
    # one progress line per stage, each with its time
    stage_lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(stage_lines) == 9 and all(" s, total " in line for line in stage_lines)
    assert set(summary["stage_seconds"]) == {"data", "float", "qat", "export", "shipped", "compile", "verify", "bench",
                                             "report"}
    assert all(s > 0 for s in summary["stage_seconds"].values())

    wers = [summary["float"]["wer"]] + [v["wer"] for v in summary["variants"].values()]
    assert all(0.0 <= w <= 5.0 for w in wers)
    assert all(v["stored_bytes"] < summary["float"]["stored_bytes"] for v in summary["variants"].values())
    for name, e in summary["export"].items():
        assert e["layer_max_steps"] <= 1 and 0 < e["layer_exact_pct"] <= 100

    targets = summary["config"]["targets"]
    assert set(summary["artifacts"]) == {f"{v}-{t}" for v in summary["variants"] for t in targets}
    for key, art in summary["artifacts"].items():
        assert (out / "artifacts" / key / "manifest.json").is_file()
        v = summary["verify"][key]
        assert v["passed"] and v["max_steps"] is not None and v["max_steps"] <= 1 and 0 < v["exact_pct"] <= 100
    assert any(v["execution"].startswith("emulated") for v in summary["verify"].values())  # rpi5 ran under qemu

    import nativeq
    from nativeq.runtime import machine_arch

    host = [k for k, a in summary["artifacts"].items() if a["arch"] == machine_arch()]
    assert host and set(summary["bench"]) == set(host)
    for key in host:
        nativeq.load(out / "artifacts" / key)
        engines = {e["name"]: e["median_ms"] for e in summary["bench"][key]["engines"]}
        kinds = {name.split(" (")[0] for name in engines}
        assert kinds == {"nativeq int8", "ort qdq", "ort fp32", "pytorch fp32"} and len(engines) == 5
        assert all(ms > 0 for ms in engines.values())
        assert 0.0 <= summary["bench"][key]["compiled_wer"] <= 5.0

    # the shipped QAT model of a variant is what gets compiled; bit-exact with ORT, so the same transcripts
    from nativeq._data import shipped_onnx_models

    shipped = summary["shipped"]
    for key, art in summary["artifacts"].items():
        expected = f"{summary['float']['model']}-{art['variant']}"
        assert (art["model"] == "shipped") == (expected in shipped_onnx_models()), key
        if art["model"] == "shipped":
            assert shipped[art["variant"]]["name"] == expected
            assert (out / art["onnx"]).read_bytes() == shipped_onnx_models()[expected].read_bytes()
    for key in host:
        variant = summary["bench"][key]["variant"]
        if variant in shipped:
            assert summary["bench"][key]["compiled_wer"] == pytest.approx(shipped[variant]["wer"], abs=1e-12)

    report = (out / "report.md").read_text()
    assert f"{100 * summary['float']['wer']:.1f}" in report
    for key in summary["artifacts"]:
        assert f"| {key} |" in report
    for png in ("wer_vs_size.png", "latency.png", "verify.png"):
        width, height, size = _png_size(out / png)
        assert width >= 400 and height >= 150 and size > 10_000
        assert f"({png})" in report
    assert not list(out.parent.glob(".out.*"))  # no temporary directory left beside OUT


def test_demo_bad_options_are_one_line_errors(nativeq_cli, tmp_path):
    for args, says in ((["--targets", "host,nosuch"], "nosuch"), (["--variants", "int3"], "int3"),
                       (["--model", str(tmp_path / "nope")], "nope")):
        result = nativeq_cli("demo", "--quick", "--out", tmp_path / "o", *args)
        assert result.returncode != 0 and result.stderr.startswith("error: ") and says in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
