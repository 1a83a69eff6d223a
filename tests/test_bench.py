"""`nativeq bench`: the report's structure and arithmetic (no timing assertions: machines are noisy)."""

import json

import onnx
import pytest

import qdq_models


@pytest.fixture(scope="module")
def qdq_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "mm.onnx"
    onnx.save(qdq_models.qdq_matmul(k=32, n=16), str(path))
    return path


def test_bench_json_reports_every_engine_and_the_ratio(nativeq_cli, qdq_model_path):
    proc = nativeq_cli("bench", qdq_model_path, "--dim", "T=8", "--repeat", "3", "--warmup", "1", "--threads", "1",
                       "--float-onnx", qdq_model_path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names = [e["name"] for e in report["engines"]]
    assert names[0].startswith("nativeq int8")
    assert {"ort qdq (opt all)", "ort qdq (opt disabled)", "ort fp32 (opt all)"} <= set(names)
    assert report["dims"] == {"T": 8} and report["threads"] == 1
    for e in report["engines"]:
        assert e["runs"] == 3
        assert 0 < e["p10_ms"] <= e["median_ms"] <= e["p90_ms"]
    ort = [e for e in report["engines"] if e["name"].startswith("ort")]
    best = min(ort, key=lambda e: e["median_ms"])
    assert report["ort_best"] == best["name"]
    assert report["ratio_compiled_to_ort_best"] == pytest.approx(report["engines"][0]["median_ms"] / best["median_ms"])


def test_bench_rejects_unknown_dim(nativeq_cli, qdq_model_path):
    proc = nativeq_cli("bench", qdq_model_path, "--dim", "Q=8", "--repeat", "1")
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "Q" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.arm
def test_bench_emulate_counts_instructions_of_arm_builds(nativeq_cli, qdq_model_path):
    proc = nativeq_cli("bench", qdq_model_path, "--emulate", "--no-ort", "--dim", "T=8", "--repeat", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [(r["target"], r["int8"]) for r in rows] == [("rpi4", True), ("rpi5", True), ("rpi4", False)]
    assert all(r["insns_per_inference"] > 0 for r in rows)


def test_bench_burst_reports_steady_runs_and_first_runs_apart(nativeq_cli, qdq_model_path):
    proc = nativeq_cli("bench", qdq_model_path, "--dim", "T=8", "--repeat", "2", "--burst", "3", "--warmup", "1",
                       "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["burst"] == 3
    for e in report["engines"]:
        assert e["runs"] == 2 * 2  # runs 2..3 of each of the 2 turns
        assert e["after_switch_median_ms"] > 0
    ort = [e for e in report["engines"] if e["name"].startswith("ort")]
    best = min(ort, key=lambda e: e["after_switch_median_ms"])
    assert report["ratio_after_switch"] == pytest.approx(report["engines"][0]["after_switch_median_ms"] / best["after_switch_median_ms"])


def test_time_interleaved_splits_each_turn_into_first_and_steady_runs():
    from nativeq.verify.bench import time_interleaved

    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeat=2, burst=3)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert [len(t.times_ms) for t in timings] == [4, 4] and [len(t.after_switch_ms) for t in timings] == [2, 2]


@pytest.mark.parametrize("engines", [2, 3, 4, 5])
def test_switch_order_follows_each_engine_by_each_other_equally_often(engines):
    """Round-robin in a fixed order has each engine always follow the same one (nativeq always right after ORT's
    float session, whose weights evict the most); the cycle has every ordered pair once, never one engine twice in a
    row, also where the cycle repeats."""
    from collections import Counter

    from nativeq.verify.bench import switch_order, time_interleaved

    cycle = switch_order(engines)
    pairs = Counter(zip(cycle, cycle[1:] + cycle[:1]))
    assert set(pairs) == {(i, j) for i in range(engines) for j in range(engines) if i != j}
    assert set(pairs.values()) == {1}
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abcde"[:engines]}
    timings = time_interleaved(runners, warmup=0, repeat=5)
    assert all(a != b for a, b in zip(calls, calls[1:]))
    assert len({len(t.times_ms) for t in timings}) == 1 and len(timings[0].times_ms) >= 5
