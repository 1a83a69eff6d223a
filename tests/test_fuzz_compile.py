"""Seeded fuzzing of `nativeq compile` (`fuzz_models.py`): every mutated model ends in a clean one-line
NativeqError or in an artifact that agrees with ONNX Runtime, never a crash, a traceback or a wrong answer.

Default suite: a fixed subset of the seed-0 campaign (every 8th of 320 cases, all categories and base
models), run in this process, and a few refusals through the CLI. The whole campaign (333 cases, each
child-process isolated, every 10th refusal also through the CLI) is marked slow; its figures are in
docs/reliability-fuzz.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import qdq_models
from fuzz_models import (CATEGORIES, OUTCOMES, FuzzCase, case_category, cli_problem, make_case, run_campaign, run_case,
                         run_cli)
from onnx import numpy_helper

SEED = 0
CAMPAIGN_CASES = 333
FAST_CASES = list(range(0, 320, 8))
# Refusals from every stage (parse, onnx.checker, validate, TVM's importer) that the CLI must print as one
# `error:` line.
CLI_CASES = (0, 8, 14, 17, 245)


@pytest.mark.parametrize("index", FAST_CASES, ids=[f"{i:03d}-{case_category(i)}" for i in FAST_CASES])
def test_mutated_model_is_refused_cleanly_or_verifies(index, tmp_path):
    case = make_case(index, SEED)
    outcome = run_case(case, tmp_path)
    assert outcome.outcome in ("error", "verified"), f"{case.id} ({case.mutation}): {outcome.outcome}: {outcome.detail}"


def test_fast_subset_covers_every_category():
    assert {case_category(i) for i in FAST_CASES} == set(CATEGORIES)


@pytest.mark.parametrize("index", CLI_CASES)
def test_refused_model_gives_one_cli_error_line(index, tmp_path):
    case = make_case(index, SEED)
    result = run_cli(case, tmp_path)
    assert cli_problem(result) is None, f"{case.id} ({case.mutation}): {result}"
    assert result["returncode"] == 2


@pytest.mark.parametrize("scales", [
    {"x_scale": 1e-18, "fc_wscale": 1e-18},  # accumulator multiplier 1e-36: near the smallest normal float32
    {"x_scale": 1e14, "fc_wscale": 1e14},  # 1e28: an int32 accumulator times it stays below 3.4e38
    {"y_scale": 1e-30},  # requantize multiplier 1e27: every output saturates, as in ORT
], ids=["tiny-multiplier", "huge-multiplier", "tiny-output-scale"])
def test_scales_just_inside_the_bounds_compile_and_agree_with_ort(scales, tmp_path):
    model = qdq_models.qlinear_matmul(k=16, n=8, per_channel=False)
    for k, tensor in enumerate(model.graph.initializer):
        if tensor.name in scales:
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.float32(scales[tensor.name]), tensor.name))
    case = FuzzCase(0, "bounds", "qlinear_matmul", str(scales), model.SerializeToString())
    outcome = run_case(case, tmp_path)
    assert outcome.outcome == "verified", outcome.detail


@pytest.mark.slow
def test_fuzz_campaign(tmp_path):
    records = run_campaign(CAMPAIGN_CASES, SEED, tmp_path / "fuzz.jsonl", tmp_path / "work", cli_every=10)
    assert len(records) == CAMPAIGN_CASES >= 300
    bad = [f"{r['outcome']}: {r['id']} ({r['mutation']}): {r['detail']}" for r in records
           if r["outcome"] not in ("error", "verified")]
    assert not bad, "\n".join(bad)
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    assert counts["error"] and counts["verified"], counts
    assert sum("cli" in r for r in records) >= 20
