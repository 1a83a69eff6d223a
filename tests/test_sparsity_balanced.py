"""Balanced block sparsity ("RxCb", e.g. "16x4b"): every band of R outputs keeps the same number
of whole RxC blocks. The mask against a plain numpy reference, ragged shapes, conv weights,
the ramp, and the pattern on the converted integer weights and in the QDQ export."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nativeq.errors import NativeqError
from nativeq.qat.convert import convert, int_layers, storage_bytes
from nativeq.qat.finetune import parse_sparsity
from nativeq.qat.quantize import QuantConfig, calibrate, quant_layers, quantize_
from nativeq.qat.sparsity import (
    SparsityConfig,
    balanced_blocks_kept,
    balanced_layer_pattern,
    band_block_counts,
    compute_mask,
    pattern_violations,
    sparsify_,
    sparsity_report,
    sparsity_summary,
    update_masks,
)
from toy_encoder import ToyEncoder, toy_batches, train_toy

torch.set_num_threads(1)


def reference_mask(w: np.ndarray, r: int, c: int, s: float) -> np.ndarray:
    """The definition, written out loop by loop: the weight as [out, in]; per band of r rows (the
    last may be shorter), blocks of c inputs (the last may be narrower) scored by sum |w|; the
    top round_half_up((1 - s) * blocks) of each band kept (at least 1), ties to the lower index."""
    mat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
    rows, cols = mat.shape
    n_blocks = -(-cols // c)
    keep = max(1, min(n_blocks, int(np.floor((1.0 - s) * n_blocks + 0.5))))
    mask = np.zeros_like(mat)
    for r0 in range(0, rows, r):
        scores = np.array([mat[r0:r0 + r, j * c:(j + 1) * c].sum() for j in range(n_blocks)])
        for j in np.argsort(-scores, kind="stable")[:keep]:
            mask[r0:r0 + r, j * c:(j + 1) * c] = 1.0
    return mask.reshape(w.shape)


def _blocks(mat: torch.Tensor, r: int, c: int) -> list[list[torch.Tensor]]:
    rows, cols = mat.shape
    return [[mat[r0:r0 + r, c0:c0 + c] for c0 in range(0, cols, c)] for r0 in range(0, rows, r)]


def _check_balanced_mask(mask: torch.Tensor, r: int, c: int, s: float) -> None:
    """Each block all zero or all one; every band keeps exactly K blocks."""
    mat = mask.reshape(mask.shape[0], -1)
    n_blocks = -(-mat.shape[1] // c)
    k = balanced_blocks_kept(n_blocks, s)
    for band in _blocks(mat, r, c):
        assert len(band) == n_blocks
        for block in band:
            assert bool(torch.all(block == block.reshape(-1)[0])), "a block is partly pruned"
        assert sum(int(block.reshape(-1)[0]) for block in band) == k


@pytest.mark.parametrize("shape", [(64, 144), (29, 144), (48, 15), (16, 4), (17, 9), (5, 3), (33, 611)])
@pytest.mark.parametrize("pattern", ["16x4b", "8x4b", "1x4b", "4x1b"])
@pytest.mark.parametrize("s", [0.5, 0.75, 0.25])
def test_mask_matches_the_numpy_reference(shape, pattern, s):
    r, c = SparsityConfig(pattern, sparsity=s).block
    for seed in range(3):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        mask = compute_mask(w, SparsityConfig(pattern, sparsity=s), s)
        np.testing.assert_array_equal(mask.numpy(), reference_mask(w.numpy(), r, c, s))
        _check_balanced_mask(mask, r, c, s)


def test_ties_keep_the_lower_input_index():
    # small integers: many blocks tie exactly (block sums are exact in float64)
    w = torch.randint(-2, 3, (40, 36), generator=torch.Generator().manual_seed(1)).float()
    mask = compute_mask(w, SparsityConfig("16x4b", sparsity=0.5), 0.5)
    np.testing.assert_array_equal(mask.numpy(), reference_mask(w.numpy(), 16, 4, 0.5))
    w = torch.ones(16, 16)  # all tie: the first half of the blocks stays
    mask = compute_mask(w, SparsityConfig("16x4b", sparsity=0.5), 0.5)
    assert torch.equal(mask[:, :8], torch.ones(16, 8)) and torch.equal(mask[:, 8:], torch.zeros(16, 8))


def test_16x4_blocks_exact_fraction_and_magnitude_order():
    w = torch.randn(64, 144, generator=torch.Generator().manual_seed(0))
    mask = compute_mask(w, SparsityConfig("16x4b", sparsity=0.5), 0.5)
    assert float((mask == 0).float().mean()) == 0.5  # 36 blocks per band, 18 kept
    assert band_block_counts(mask, (16, 4)).tolist() == [18] * 4
    for band_w, band_m in zip(_blocks(w, 16, 4), _blocks(mask, 16, 4)):
        kept = [float(b.abs().sum()) for b, m in zip(band_w, band_m) if m[0, 0] == 1]
        pruned = [float(b.abs().sum()) for b, m in zip(band_w, band_m) if m[0, 0] == 0]
        assert min(kept) >= max(pruned)
    assert float((compute_mask(w, SparsityConfig("16x4b", sparsity=0.75), 0.75) == 0).float().mean()) == 0.75


def test_ragged_shapes():
    # 29 outputs: a full band of 16 and a short band of 13; 143 inputs: 35 blocks of 4 and one of 3
    w = torch.randn(29, 143, generator=torch.Generator().manual_seed(2))
    mask = compute_mask(w, SparsityConfig("16x4b", sparsity=0.5), 0.5)
    assert mask.shape == w.shape
    assert band_block_counts(mask, (16, 4)).tolist() == [18, 18]
    _check_balanced_mask(mask, 16, 4, 0.5)
    # the short band is ranked on its own rows only
    short = compute_mask(w[16:], SparsityConfig("16x4b", sparsity=0.5), 0.5)
    assert torch.equal(mask[16:], short)


@pytest.mark.parametrize("n_blocks,s,kept", [(36, 0.5, 18), (36, 0.75, 9), (3, 0.5, 2), (4, 0.5, 2), (5, 0.5, 3),
                                             (1, 0.5, 1), (4, 0.9, 1), (38, 0.75, 10), (10, 0.0, 10)])
def test_blocks_kept_per_band(n_blocks, s, kept):
    assert balanced_blocks_kept(n_blocks, s) == kept


def test_conv_weights_use_the_flattened_gemm_view():
    torch.manual_seed(0)
    for weight in (torch.randn(32, 4, 3, 3), torch.randn(48, 8, 3), torch.randn(144, 1, 15)):
        mask = compute_mask(weight, SparsityConfig("16x4b", sparsity=0.5), 0.5)
        assert mask.shape == weight.shape
        np.testing.assert_array_equal(mask.numpy(), reference_mask(weight.numpy(), 16, 4, 0.5))
        _check_balanced_mask(mask.reshape(weight.shape[0], -1), 16, 4, 0.5)


def test_ramp_keeps_every_band_balanced_then_freezes():
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(64, 32)), QuantConfig())
    cfg = SparsityConfig("16x4b", sparsity=0.75, start_step=0, end_step=8, update_every=4)
    sparsify_(model, cfg)
    layer = model[0]
    assert torch.equal(layer.weight_mask, torch.ones_like(layer.weight))  # s(0) = 0: everything kept
    seen = []
    for step in range(1, 13):
        update_masks(model, step)
        s = cfg.sparsity_at(step) if step < 8 else 0.75
        if step % 4 == 0:
            _check_balanced_mask(layer.weight_mask, 16, 4, s)
            seen.append(band_block_counts(layer.weight_mask, (16, 4)).tolist())
    # K over the ramp: s(4) = 0.75 - 0.75 * 0.5^3 = 0.65625 -> round(0.34375 * 16) = 6; then 4 at the end
    assert seen == [[6, 6], [4, 4], [4, 4]]
    assert bool(layer.mask_frozen)
    frozen = layer.weight_mask.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    assert update_masks(model, 20) == 0 and torch.equal(layer.weight_mask, frozen)


def _trained_toy(pattern, s, bits, seed=0, steps=6):
    torch.manual_seed(seed)
    model = quantize_(ToyEncoder(d=48), QuantConfig(weight_bits=bits))
    sparsify_(model, SparsityConfig(pattern, sparsity=s, start_step=0, end_step=4, update_every=2))
    return train_toy(model, steps, seed=seed, after_step=update_masks)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("s", [0.5, 0.75])
def test_integer_weights_after_convert_hold_the_pattern(bits, s):
    model = _trained_toy("16x4b", s, bits)
    int_model = convert(model)
    layers = dict(int_layers(int_model))
    assert set(layers) == {n for n, _ in quant_layers(model)}
    for name, layer in layers.items():
        q = layer.integer_weight()
        assert layer.sparsity_pattern == f"16x4b:{s:g}"
        assert pattern_violations(q, layer.sparsity_pattern) == 0, name
        # the integer zeros cover the mask's zeros (rounding may zero more, never fewer)
        mask = dict(quant_layers(model))[name].weight_mask
        assert bool(torch.all(q[mask == 0] == 0)), name
        cols = q.reshape(q.shape[0], -1).shape[1]
        assert int(band_block_counts(q, (16, 4)).max()) <= balanced_blocks_kept(-(-cols // 4), s)
    assert all(r["violations"] == 0 for r in sparsity_report(model).values())
    summary = sparsity_summary(model)
    assert summary["pattern"] == f"16x4b:{s:g}" and summary["violations"] == 0 and summary["zeros"] >= s - 0.1
    # the checker sees one more non-zero block in a band
    q = layers["qkv"].integer_weight().clone()
    band = q[:16]
    zero_block = next(j for j in range(0, q.shape[1], 4) if bool(torch.all(band[:, j:j + 4] == 0)))
    q[3, zero_block] = 1
    assert pattern_violations(q, f"16x4b:{s:g}") == 1


def test_training_with_the_pattern_is_deterministic():
    a, b = _trained_toy("16x4b", 0.5, 8), _trained_toy("16x4b", 0.5, 8)
    for (name, la), (_, lb) in zip(quant_layers(a), quant_layers(b)):
        assert torch.equal(la.weight_mask, lb.weight_mask), name
        assert torch.equal(la.integer_weight(), lb.integer_weight()), name


def test_storage_bytes_of_one_balanced_layer():
    model = quantize_(nn.Sequential(nn.Linear(64, 32)), QuantConfig(weight_bits=8))
    sparsify_(model, SparsityConfig("16x4b", sparsity=0.5))
    calibrate(model, [torch.randn(4, 64)])
    weight_bytes = 32 * 8 * 4 + 2 * 16 / 8  # 8 of 16 blocks kept in each band of 16 rows, 1 bit per block
    overhead = 32 * 4 + 32 * 4 + 2 * 4
    size = storage_bytes(model)
    assert size["bytes"] == round(weight_bytes + overhead)
    assert size["weight_fraction_of_float"] == weight_bytes / (4 * 64 * 32)
    assert storage_bytes(convert(model))["bytes"] == size["bytes"]


def test_export_records_the_pattern_and_stores_pattern_weights():
    from onnx import numpy_helper

    from nativeq.export.qdq import ExportConfig, to_qdq_onnx

    model = _trained_toy("16x4b", 0.5, 8, steps=4)
    proto = to_qdq_onnx(model, (toy_batches(1)[0],), ExportConfig(dynamic_axes={"x": {0: "B", 1: "T"}}))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nativeq.sparsity"] == "16x4b:0.5"
    layers = json.loads(meta["nativeq.layers"])
    assert all(v["sparsity"] == "16x4b:0.5" for v in layers.values())
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = torch.from_numpy(inits["qkv.weight_q"].astype(np.int8).T.copy())  # Linear weights are stored [in, out]
    assert pattern_violations(w, "16x4b:0.5") == 0 and band_block_counts(w, (16, 4)).tolist() == [6] * 9
    w = torch.from_numpy(inits["grouped.weight_q"].astype(np.int8))  # conv weights as [out, in/groups, k]
    assert pattern_violations(w, "16x4b:0.5") == 0


def test_parse_and_bad_configs():
    cfg = parse_sparsity("16x4b:0.5")
    assert cfg == SparsityConfig("16x4b", sparsity=0.5) and cfg.kind == "balanced" and cfg.block == (16, 4)
    assert parse_sparsity("8x4b:0.75").layer_pattern == "8x4b:0.75"
    assert balanced_layer_pattern("16x4b:0.5") == (16, 4, 0.5)
    assert balanced_layer_pattern("2:4") is None and balanced_layer_pattern("16x4") is None
    for make, match in [
        (lambda: parse_sparsity("16x4b"), "needs a final sparsity"),
        (lambda: parse_sparsity("0x4b:0.5"), "block sizes must be >= 1"),
        (lambda: parse_sparsity("16x4b:1.0"), "must be in \\(0, 1\\)"),
        (lambda: parse_sparsity("16x4bb:0.5"), "not understood"),
        (lambda: pattern_violations(torch.zeros(16, 8), "16x4b"), "needs its sparsity"),
    ]:
        with pytest.raises(NativeqError, match=match) as e:
            make()
        assert "\n" not in str(e.value)
    assert math.isclose(SparsityConfig("16x4b", sparsity=0.5, end_step=10).sparsity_at(5), 0.5 - 0.5 * 0.5 ** 3)


def test_finetune_and_export_cli_end_to_end(tmp_path):
    """`nativeq finetune --sparsity 16x4b:0.5` on a tiny corpus reports the check; `nativeq export` records the pattern."""
    import shutil

    import onnx
    from click.testing import CliRunner

    from nativeq.cli import main
    from nativeq.models.conformer import ConformerConfig, ConformerCTC
    from nativeq.models.data import SynthConfig, synthesize_corpus
    from nativeq.models.train import save_run

    for tool in ("espeak-ng", "flite", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make apt)")
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(train=8, dev=2, test=2, other=0, jobs=1), progress=False)
    torch.manual_seed(0)
    source = tmp_path / "float"
    source.mkdir()
    save_run(source, ConformerCTC(ConformerConfig(d_model=48, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=7,
                                                  subsample_channels=8, dropout=0.0)))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", str(source), "--data", str(corpus), "--sparsity", "16x4b:0.5",
                                       "--steps", "3", "--batch-size", "4", "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert "sparsity 16x4b:0.5: " in result.output and ", 0 pattern violations" in result.output
    assert json.loads((run / "config.json").read_text())["qat"]["sparsity"]["pattern"] == "16x4b"
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sparsity 16x4b:0.5;" in result.output and "QDQ lint: clean" in result.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["nativeq.sparsity"] == "16x4b:0.5"
    assert json.loads(meta["nativeq.layers"])["blocks.0.ff1.fc1"]["sparsity"] == "16x4b:0.5"
