"""Conformer-CTC: presets, shapes, masking invariants, ONNX export parity in ORT, CTC decoding."""

import numpy as np
import pytest
import torch

from nativeq.errors import NativeqError
from nativeq.models.conformer import PRESETS, ConformerConfig, ConformerCTC, count_parameters, subsampled_lengths
from nativeq.models.text import VOCAB_SIZE, ctc_greedy_collapse, decode, encode, normalize_text, number_to_words
from nativeq.models.train import greedy_decode

TINY_TEST = ConformerConfig(d_model=48, n_layers=2, n_heads=4, conv_kernel=7, subsample_channels=8, dropout=0.0)


def make(cfg=TINY_TEST, seed=0):
    torch.manual_seed(seed)
    return ConformerCTC(cfg).eval()


def test_preset_sizes():
    assert 1e6 <= count_parameters(ConformerCTC(PRESETS["conformer-tiny"])) <= 3e6
    assert 8e6 <= count_parameters(ConformerCTC(PRESETS["conformer-small"])) <= 15e6


def test_output_shape_and_lengths():
    model = make()
    feats = torch.randn(3, 101, 80)
    lengths = torch.tensor([101, 60, 7])
    logits, out_lengths = model(feats, lengths)
    assert logits.shape == (3, ((101 - 1) // 2 - 1) // 2, VOCAB_SIZE)
    assert out_lengths.tolist() == subsampled_lengths(lengths).tolist() == [24, 14, 1]


def test_every_matmul_is_a_swappable_plain_module():
    model = make()
    kinds = {type(m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))}
    assert kinds == {torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d}
    # each is reachable by a dotted name and replaceable there
    name = "blocks.0.ff1.fc1"
    parent = model.get_submodule("blocks.0.ff1")
    setattr(parent, "fc1", torch.nn.Linear(48, 192))
    assert isinstance(model.get_submodule(name), torch.nn.Linear)


def test_padding_does_not_change_results():
    model = make()
    a = torch.randn(1, 90, 80)
    b = torch.randn(1, 130, 80)
    batch = torch.zeros(2, 130, 80)
    batch[0, :90], batch[1] = a[0], b[0]
    logits, lengths = model(batch, torch.tensor([90, 130]))
    alone, _ = model(a)
    torch.testing.assert_close(logits[0, : lengths[0]], alone[0], atol=1e-4, rtol=1e-4)


def test_chunked_attention_limits_lookahead():
    cfg = ConformerConfig(**{**TINY_TEST.__dict__, "chunk_size": 4, "left_chunks": -1})
    model = make(cfg)
    x = torch.randn(1, 203, 80)
    y = x.clone()
    y[:, 120:] = torch.randn(1, 83, 80)  # change the future only
    out_x, out_y = model(x)[0], model(y)[0]
    # subsampled frame 24 sees input frames < 4*24+7 = 103; chunk [24, 28) ends before 120
    torch.testing.assert_close(out_x[:, :24], out_y[:, :24])
    assert not torch.allclose(out_x[:, 28:], out_y[:, 28:])


def test_full_context_sees_the_future():
    model = make()
    x = torch.randn(1, 203, 80)
    y = x.clone()
    y[:, 150:] += 1.0
    assert not torch.allclose(model(x)[0][:, :10], model(y)[0][:, :10])


def test_bad_config_is_one_line_error():
    with pytest.raises(NativeqError, match="heads"):
        ConformerConfig(d_model=50, n_heads=4)
    with pytest.raises(NativeqError, match="unknown ConformerConfig field"):
        ConformerConfig.from_json({"d_model": 64, "layers": 3})


def test_onnx_export_matches_pytorch_at_two_lengths(tmp_path):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from nativeq.export.float_onnx import FloatExportConfig, check_parity, export_float_model

    model = make(ConformerConfig(**{**TINY_TEST.__dict__, "chunk_size": 5}), seed=3)
    with torch.no_grad():
        model.feat_mean.uniform_(5, 10)
    data = export_float_model(model, FloatExportConfig())
    graph = onnx.load_from_string(data).graph
    assert [i.name for i in graph.input] == ["feats"] and [o.name for o in graph.output] == ["logits"]
    t_dim = graph.input[0].type.tensor_type.shape.dim[1]
    assert t_dim.dim_param and not t_dim.dim_value  # symbolic time axis
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for t in (64, 251):
        feats = torch.randn(1, t, 80) * 3 + 7
        ref = model(feats)[0].detach().numpy()
        got = session.run(["logits"], {"feats": feats.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4
    assert check_parity(model, data) < 1e-4


def test_ctc_greedy_decoding():
    # "hello": h e l <blank> l o, with repeats and blanks between
    h, e, l, o = encode("helo")
    ids = [0, h, h, e, 0, l, l, 0, l, o, o, 0]
    assert decode(ctc_greedy_collapse(ids)) == "hello"
    logits = torch.full((1, len(ids), VOCAB_SIZE), -5.0)
    logits[0, torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    assert greedy_decode(logits) == ["hello"]
    assert greedy_decode(logits, torch.tensor([6])) == ["hel"]


def test_text_normalization_and_vocabulary():
    assert number_to_words(0) == "zero"
    assert number_to_words(42) == "forty two"
    assert number_to_words(1905) == "one thousand nine hundred five"
    assert normalize_text("Call Room 42, NOW!") == "call room forty two now"
    assert decode(encode("it's ok")) == "it's ok"
    with pytest.raises(NativeqError, match="empty transcript"):
        normalize_text("  ...  ")
    with pytest.raises(NativeqError, match="outside the vocabulary"):
        normalize_text("café")
