"""The trained QAT models nativeq ships as QDQ ONNX files (`nativeq models`): each states its recipe and
measurements, its weights obey that recipe, it compiles by name from any directory and the artifact agrees
with ONNX Runtime exactly."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nativeq._data import shipped_onnx_models

# What the product promises: the shipped float model's two QAT variants.
EXPECTED = {"conformer-tiny-int8": (8, "dense"), "conformer-tiny-int4-2to4": (4, "2:4")}


def _metrics(name: str) -> dict:
    return json.loads((shipped_onnx_models()[name].parent / "metrics.json").read_text())


def _integer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every integer initializer that a DequantizeLinear reads as its x (the quantized weights), by name."""
    initializers = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        tensor = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if tensor is not None and tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4):
            weights[tensor.name] = (numpy_helper.to_array(tensor).astype(np.int32), tensor.data_type)
    return weights


def test_the_two_variants_are_shipped_with_their_recipe_and_measurements():
    assert set(EXPECTED) <= set(shipped_onnx_models())
    for name, (bits, sparsity) in EXPECTED.items():
        metrics = _metrics(name)
        assert metrics["recipe"]["weight_bits"] == bits and metrics["recipe"]["sparsity"] == sparsity
        assert metrics["recipe"]["source"] == "conformer-tiny" and metrics["command"].startswith("nativeq finetune")
        for split, utterances in (("test", 300), ("other", 300), ("eval-human", 20)):
            assert metrics[split]["utterances"] == utterances and 0.0 <= metrics[split]["wer"] <= 1.5
        # the QDQ file in ONNX Runtime transcribes like the PyTorch integer model it was exported from
        assert abs(metrics["test_ort"]["wer"] - metrics["test"]["wer"]) <= 0.005
        assert metrics["onnx_bytes"] == shipped_onnx_models()[name].stat().st_size


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_weights_obey_the_recipe(name):
    bits, sparsity = EXPECTED[name]
    weights = _integer_weights(onnx.load(str(shipped_onnx_models()[name])))
    assert len(weights) >= 40
    low_bit = {k: w for k, (w, dtype) in weights.items() if dtype == onnx.TensorProto.INT4}
    if bits == 8:
        assert not low_bit
        return
    # mixed: the subsampling convs and the CTC head stay 8-bit, every other layer is 4-bit
    assert len(low_bit) >= len(weights) - 4
    for key, w in low_bit.items():
        assert -8 <= w.min() and w.max() <= 7, key
        if sparsity == "2:4" and w.ndim == 2:  # MatMul weight [K, N]: groups of 4 along K keep at most 2
            groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])
            assert (np.count_nonzero(groups, axis=1) <= 2).all(), key
    zeros = sum(int((w == 0).sum()) for w in low_bit.values()) / sum(w.size for w in low_bit.values())
    assert zeros >= 0.5


def test_compiled_by_name_from_another_directory_agrees_with_ort_exactly(nativeq_cli, tmp_path):
    from nativeq.verify import VerifyConfig, verify_artifact

    name = "conformer-tiny-int4-2to4"
    result = nativeq_cli("compile", name, "--target", "host", "-o", "art", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = verify_artifact(tmp_path / "art", name, VerifyConfig(dims={"B": 1, "T": 120}, runs=2))
    assert report.passed
    assert all(o.max_steps == 0 for o in report.outputs), [o.to_json() for o in report.outputs]


def test_models_command_lists_them(nativeq_cli):
    result = nativeq_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    for name in EXPECTED:
        assert rows[name]["kind"] == "QDQ ONNX" and rows[name]["test_wer"] == _metrics(name)["test"]["wer"]
    assert rows["conformer-tiny"]["kind"] == "float checkpoint"


def test_unknown_bare_name_lists_the_shipped_models(nativeq_cli):
    result = nativeq_cli("compile", "conformer-tiny-int3", "--target", "host", "-o", "art")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "conformer-tiny-int3 does not exist" in result.stderr and "conformer-tiny-int8" in result.stderr
