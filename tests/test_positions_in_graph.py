"""Positional tables and sizes a model computes from its input's length (`torch.arange(x.shape[1], dtype=float)`,
a constant table sliced to it, reshaped into heads, expanded over the batch, positions counted down, pads to the
length or to whole chunks): lengths stay expressions of the input's symbolic length, and the model matches ONNX
Runtime at any length."""

import io
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import Analyzer, tirx
from nativeq.compile.onnx_import import _without_common_dims, import_onnx
from nativeq.compile.passes import dims_product
from nativeq.runtime import load

VOCAB, DIM = 20, 8


def _assert_matches_onnxruntime(model: onnx.ModelProto, tmp_path, feeds_at_lengths, rtol: float = 1e-5):
    """Compile `model` for the host once and compare output "y" with ONNX Runtime on each feed (shape and values)."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    compiled = load(tmp_path / "art")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds in feeds_at_lengths:
        expected = session.run(None, feeds)[0]
        got = compiled.run(feeds)["y"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


def _token_encoder(range_dtype) -> onnx.ModelProto:
    """ids int64 [1, L] -> embedding [1, L, 8] + sin(Range(0, L, 1) x frequencies) (a text encoder's positions)."""
    rng = np.random.default_rng(0)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(range_dtype))
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"]),
        helper.make_node("Cast", ["length"], ["length_cast"], to=onnx_type),
        helper.make_node("Range", ["start", "length_cast", "delta"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["positions_float", "axis1"], ["column"]),
        helper.make_node("Mul", ["column", "frequencies"], ["angles"]),
        helper.make_node("Sin", ["angles"], ["table_of_positions"]),
        helper.make_node("Add", ["embedded", "table_of_positions"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, range_dtype), "start"),
        numpy_helper.from_array(np.array(1, range_dtype), "delta"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.exp(-np.arange(DIM) / DIM).astype(np.float32), "frequencies"),
    ]
    graph = helper.make_graph(nodes, "token_encoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", DIM])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("range_dtype", [np.int64, np.float32])
def test_the_table_length_is_the_input_length(range_dtype):
    text = import_onnx(_token_encoder(range_dtype))["main"].script()
    assert "range_len" not in text and "R.arange(0, L, 1" in text, text


@pytest.mark.parametrize("range_dtype", [np.int64, np.float32])
def test_token_encoder_matches_onnxruntime(range_dtype, tmp_path):
    rng = np.random.default_rng(1)
    _assert_matches_onnxruntime(_token_encoder(range_dtype), tmp_path,
                                [{"ids": rng.integers(0, VOCAB, (1, length)).astype(np.int64)} for length in (1, 5, 37)],
                                rtol=1e-6)


# ----------------------------------------------------------------------------- tables sliced and reshaped by length
class _RelativeScores(torch.nn.Module):
    """Transformer-XL / Wav2Vec2-Conformer relative attention scores: a constant position table sliced to the 2T - 1
    offsets of the input's length, projected, split into heads with `view(1, 2T - 1, -1, d)` (a -1 Relax sizes as a
    quotient of two symbolic products), and the relative shift (pad, `view` by the scores' own shape, slice)."""

    HEADS, HEAD_DIM, MAX_LEN = 4, 4, 64

    def __init__(self):
        super().__init__()
        dim = self.HEADS * self.HEAD_DIM
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(1, 2 * self.MAX_LEN - 1, dim, generator=generator))
        self.query = torch.nn.Linear(dim, dim)
        self.position = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        batch, length, _ = x.shape
        center = self.MAX_LEN - 1
        positions = self.position(self.table[:, center - length + 1: center + length])
        positions = positions.view(*positions.shape[:2], -1, self.HEAD_DIM).permute(0, 2, 3, 1)
        query = self.query(x).view(batch, length, self.HEADS, self.HEAD_DIM).transpose(1, 2)
        scores = torch.matmul(query, positions)
        shape = scores.shape
        scores = torch.nn.functional.pad(scores, (1, 0)).view(*shape[:2], shape[3] + 1, shape[2])
        return scores[:, :, 1:].reshape(shape)[..., :length]


class _ExpandedTable(torch.nn.Module):
    """A position table sliced to the input's length and expanded over the batch (`expand(batch, -1, -1)`: the
    exporter writes Where(shape == -1, 1, shape), which folds to a constant shape)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x + self.table[:, : x.shape[1]].expand(x.shape[0], -1, -1)


def _torchscript_onnx(module: torch.nn.Module, dim: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 9, dim),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "T"}, "y": {}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("module, dim", [(_RelativeScores(), 16), (_ExpandedTable(), 8)],
                         ids=["relative_scores", "expanded_table"])
def test_tables_sliced_to_the_length_match_onnxruntime_at_any_length(module, dim, tmp_path):
    rng = np.random.default_rng(2)
    _assert_matches_onnxruntime(_torchscript_onnx(module, dim), tmp_path,
                                [{"x": rng.standard_normal((1, length, dim)).astype(np.float32)} for length in (1, 9, 40)])


def test_a_view_with_minus_one_over_symbolic_dims_gets_a_static_size():
    """`view(1, 2T - 1, -1, 4)` of [1, 2T - 1, 16]: the -1 is 4, not a quotient of products of T."""
    text = import_onnx(_torchscript_onnx(_RelativeScores(), 16))["main"].script()
    assert re.search(r"R\.reshape\(\w+, R\.shape\(\[1, T\w* \* 2 - 1, 4, 4\]\)\)", text), text


class _RelativePositions(torch.nn.Module):
    """Relative positions counted down from the input's length (`arange(T - 1, -T, -1)`, a FastConformer / ESPnet
    relative positional encoding) as a sinusoid table [2T - 1, 8]."""

    def forward(self, x):
        length = x.shape[1]
        positions = torch.arange(length - 1, -length, -1, dtype=torch.int64).to(torch.float32)
        return torch.sin(positions[:, None] * torch.exp(-torch.arange(8, dtype=torch.float32) / 8))


def test_positions_counted_down_from_the_length_have_2t_minus_1_rows(tmp_path):
    model = _torchscript_onnx(_RelativePositions(), 4)
    text = import_onnx(model)["main"].script()
    assert "range_len" not in text, text  # the length is 2T - 1, not a fresh variable
    assert re.search(r"R\.Tensor\(\(T\w* \* 2 - 1, 8\)", text), text
    _assert_matches_onnxruntime(model, tmp_path, [{"x": np.zeros((1, length, 4), np.float32)} for length in (1, 9, 40)])


class _PaddedBack(torch.nn.Module):
    """Frames pooled in pairs, repeated back and padded to the input's length (SEW's squeeze / upsample:
    `F.pad(x, (0, 0, 0, n - x.shape[1]))`, pads the exporter computes from shapes at run time)."""

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        upsampled = pooled.repeat_interleave(2, dim=1)
        return torch.nn.functional.pad(upsampled, (0, 0, 0, x.shape[1] - upsampled.shape[1]))


class _PaddedToChunks(torch.nn.Module):
    """Padded to a whole number of 4-frame chunks (chunked attention, windowed encoders)."""

    def forward(self, x):
        return torch.nn.functional.pad(x, (0, 0, 0, (4 - x.shape[1] % 4) % 4), value=0.5)


@pytest.mark.parametrize("module", [_PaddedBack(), _PaddedToChunks()], ids=["padded_back", "padded_to_chunks"])
def test_pads_computed_from_the_length_match_onnxruntime(module, tmp_path):
    rng = np.random.default_rng(3)
    _assert_matches_onnxruntime(_torchscript_onnx(module, 8), tmp_path,
                                [{"x": rng.standard_normal((1, length, 8)).astype(np.float32)} for length in (2, 9, 40)],
                                rtol=1e-6)


def test_reshape_sizes_equal_up_to_the_order_of_their_factors_are_proven_equal():
    """A relative shift's reshape of a waveform model's scores, [1, 4, n, 2n] -> [1, 4, 2n, n] with n a length after
    the conv front end: TVM's simplifier does not expand the products of sums, the cancelled dims prove it (no shape
    condition for the runtime to check, no warning)."""
    samples = tirx.Var("S", "int64")
    n = (samples - 400) // 320 + 1
    before, after = [_int64(1), _int64(4), n, n * 2], [_int64(1), _int64(4), n * 2, n]
    assert not Analyzer().can_prove_equal(dims_product(before), dims_product(after))
    rest_before, rest_after = _without_common_dims(before, after)
    assert len(rest_before) == len(rest_after) == 2  # the static 1 and 4 are left
    assert Analyzer().can_prove_equal(dims_product(rest_before), dims_product(rest_after))


def _int64(value: int):
    return tirx.IntImm("int64", value)


class _RepeatedByLength(torch.nn.Module):
    """A tensor repeated a number of times computed from the length (SEW-D's relative positions repeated per head:
    `x.repeat(q.size(0) // heads, 1, 1)`; a Tile of a shape value, which TVM's importer refuses outright)."""

    def forward(self, x):
        return x.repeat(x.shape[1] // 2 + 1, 1, 1)


def test_repeats_computed_from_the_length_match_onnxruntime(tmp_path):
    rng = np.random.default_rng(4)
    _assert_matches_onnxruntime(_torchscript_onnx(_RepeatedByLength(), 8), tmp_path,
                                [{"x": rng.standard_normal((1, length, 8)).astype(np.float32)} for length in (1, 6, 13)],
                                rtol=0)
