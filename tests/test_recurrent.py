"""ONNX LSTM / GRU / RNN (compile/recurrent.py) through the user path: `compile_model` for `host`, then
`verify_artifact` against ONNX Runtime (optimizations disabled) at two lengths of the symbolic time axis.

Models: torch exports (batch-first and time-major, bidirectional, two layers, a Linear after) and
hand-built `onnx.helper` graphs for what torch does not export (sequence_lens, peepholes, initial
states as graph inputs, clip, input_forget, layout=1, GRU linear_before_reset=0, reverse, Relu,
only Y_h requested); a `quantize_static` QDQ model with an LSTM between two Linears; refusals.
Several recurrent nodes share one graph so that each case costs a single compile.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from disassembly import aarch64_disassembly

from nativeq.compile.api import CompileConfig, compile_model
from nativeq.errors import NativeqError
from nativeq.verify.api import VerifyConfig, verify_artifact

# float32 recurrences over 37 steps: the kernels sum in ORT's order and use MLAS's sigmoid/tanh, so
# they differ from ORT by a few ulps (measured <= 4.8e-7 up to T=200; RNN with Relu bit-exact).
FLOAT_TOLERANCE = 1e-6
LENGTHS = (6, 37)  # the hand-built graphs' sequence_lens subtract up to 5 from T


def _compile_and_verify_lengths(model: onnx.ModelProto, tmp_path, lengths=LENGTHS):
    """Compile once for host; verify at each time length; return the reports."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "out", CompileConfig(target="host"))
    reports = []
    for steps in lengths:
        report = verify_artifact(tmp_path / "out", path, VerifyConfig(runs=2, dims={"T": steps}))
        assert report.passed, report.table()
        reports.append(report)
    return reports


def _assert_float_close(reports, expected_outputs: int):
    for report in reports:
        assert len(report.outputs) == expected_outputs, report.table()
        for out in report.outputs:
            assert out.max_abs <= FLOAT_TOLERANCE, report.table()
            assert np.prod(out.shape) > 0


# ---------------------------------------------------------------------------------------------
# torch exports


def _torch_export(module, example, dynamic_axes, tmp_path) -> onnx.ModelProto:
    import torch

    path = tmp_path / "torch.onnx"
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": dynamic_axes}, opset_version=17, dynamo=False)
    return onnx.load(path)


def test_torch_batch_first_stack_matches_ort(tmp_path):
    """Two-layer bidirectional LSTM -> GRU -> RNN(relu) -> Linear, batch_first=True, x [1, T, 16]."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True)
            self.gru = nn.GRU(48, 20, batch_first=True)
            self.rnn = nn.RNN(20, 12, nonlinearity="relu", batch_first=True)
            self.out = nn.Linear(12, 5)

        def forward(self, x):
            return self.out(self.rnn(self.gru(self.lstm(x)[0])[0])[0])

    model = _torch_export(Stack(), torch.randn(1, 10, 16), {1: "T"}, tmp_path)
    assert {n.op_type for n in model.graph.node} >= {"LSTM", "GRU", "RNN"}
    _assert_float_close(_compile_and_verify_lengths(model, tmp_path), expected_outputs=1)


def test_time_steps_split_over_threads_match_ort(tmp_path, monkeypatch):
    """Hidden sizes whose time step runs as several parallel slices of the hidden units (72: slices of 32, 32
    and 8 units; 136: 48, 48 and 40; split here whatever their size), LSTM -> GRU -> RNN, batch 2: the same sums
    per unit as one thread, within ORT's few ulps."""
    import torch
    from torch import nn

    from nativeq.compile import recurrent

    monkeypatch.setattr(recurrent, "_MIN_PARALLEL_STEP_MACS", 0)
    assert recurrent._part_bounds(72, 4)[0] == 3 and recurrent._part_bounds(136, 3)[0] == 3
    torch.manual_seed(2)

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 72, batch_first=True)
            self.gru = nn.GRU(72, 136, batch_first=True)
            self.rnn = nn.RNN(136, 72, batch_first=True)
            self.out = nn.Linear(72, 5)

        def forward(self, x):
            return self.out(self.rnn(self.gru(self.lstm(x)[0])[0])[0])

    model = _torch_export(Wide(), torch.randn(2, 10, 16), {1: "T"}, tmp_path)
    _assert_float_close(_compile_and_verify_lengths(model, tmp_path), expected_outputs=1)


@pytest.mark.parametrize("op, hidden, parallel", [("LSTM", 64, False), ("LSTM", 128, False), ("GRU", 128, False),
                                                 ("LSTM", 256, True), ("GRU", 256, True)])
def test_a_small_time_step_runs_on_the_calling_thread(op, hidden, parallel, tmp_path):
    """A time step of fewer than `_MIN_PARALLEL_STEP_MACS` multiply-adds (Silero VAD's 64-unit LSTM, DeepSpeech2's
    128-unit ones) runs without a parallel launch per step, which cost more than the step (a 128-unit
    bidirectional LSTM at T = 1000: 123 -> 35 ms); a 256-unit LSTM or GRU still splits its steps over threads."""
    import torch
    from torch import nn

    from nativeq.compile.api import import_model

    module = (nn.LSTM if op == "LSTM" else nn.GRU)(32, hidden, batch_first=True)
    model = _torch_export(module, torch.randn(1, 10, 32), {1: "T"}, tmp_path)
    mod = import_model(model, tmp_path / "model.onnx")
    (recurrence,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith(f"{op.lower()}_forward")]
    assert ("T.parallel(" in recurrence.script()) == parallel


def _lstm_model(hidden: int = 64, inputs: int = 16) -> onnx.ModelProto:
    """One forward LSTM, x [T, B, inputs] (time-major), random weights."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, size)).astype(np.float32), name)
               for name, size in (("W", inputs), ("R", hidden))]
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1, "B", hidden])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_lstm_step_reads_each_panel_of_rt_once_for_the_whole_batch():
    """A batch of sequences (a dual-path model's LSTM over its chunks): time steps outermost, each panel of Rᵀ taken
    by every batch element in turn while it is in L1 (each element over all of Rᵀ before the next streamed it again
    from L2, once per batch element and step: SQUIM's LSTMs 1.7x their time)."""
    from nativeq.compile.onnx_import import import_onnx

    mod = import_onnx(_lstm_model())
    (recurrence,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("lstm_forward")]
    loops = [(len(line) - len(line.lstrip()), line.strip()) for line in recurrence.script().splitlines()
             if line.strip().startswith("for ")]
    time_loop = next(i for i, (_, text) in enumerate(loops) if text.startswith("for t in"))
    panel_loops = [i for i, (_, text) in enumerate(loops) if i > time_loop and text.startswith("for q, p in")]
    # a batch of one has its own copy, without the batch loop (its accumulators stay in registers on NEON)
    inner = sorted(loops[i + 1][1] for i in panel_loops if loops[i + 1][0] > loops[i][0])
    assert inner == ["for b in range(1):", "for b in range(batch):"] or inner == ["for b in range(batch):"], inner
    assert all(loops[time_loop][0] < loops[i][0] for i in panel_loops)


@pytest.mark.parametrize("vector_bits, rows", [(512, 8), (256, 4), (128, 4)])
def test_the_projection_gets_the_register_tile_of_the_target(vector_bits, rows):
    """Built at import with 4 rows x 16 columns (16 NEON / 8 AVX2 registers); on AVX-512 that is 4 independent FMA
    chains, half of what two FMA units need, so `RecurrentProjectionTiles` rebuilds it with 8 rows there."""
    from nativeq.compile.onnx_import import import_onnx
    from nativeq.compile.schedules.recurrent_projection import RecurrentProjectionTiles

    tiles = RecurrentProjectionTiles(vector_bits)
    mod = tiles(import_onnx(_lstm_model()))
    (projection,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("lstm_projection")]
    assert f"acc = T.alloc_local(({rows}, 16))" in projection.script()
    assert tiles.rebuilt == (rows != 4)


def test_projection_tiles_of_8_and_4_rows_give_the_same_sums(tmp_path):
    """The AVX-512 build (8-row tiles) and the AVX2 build (4-row tiles) of an LSTM and a GRU, on this machine:
    bit-identical outputs at a length that leaves a partial last row block."""
    import torch
    from torch import nn

    import nativeq
    from nativeq.runtime.cpu import cpu_features

    if "avx512_vnni" not in cpu_features():
        pytest.skip("needs an AVX-512 VNNI host")
    torch.manual_seed(5)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(40, 64, batch_first=True)
            self.gru = nn.GRU(64, 48, batch_first=True, bidirectional=True)

        def forward(self, x):
            return self.gru(self.lstm(x)[0])[0]

    model = _torch_export(Stack(), torch.randn(3, 10, 40), {1: "T"}, tmp_path)
    onnx.save(model, tmp_path / "stack.onnx")
    for target in ("x86-avx512-vnni", "x86-avx2"):
        compile_model(tmp_path / "stack.onnx", tmp_path / target, CompileConfig(target=target))
    x = np.random.default_rng(2).standard_normal((3, 29, 40)).astype(np.float32)
    wide, narrow = (nativeq.load(tmp_path / target).run({"x": x}) for target in ("x86-avx512-vnni", "x86-avx2"))
    assert np.array_equal(wide["y"], narrow["y"])


def test_packed_recurrent_weights_give_the_same_sums(tmp_path, monkeypatch):
    """Hidden sizes whose Rᵀ is packed in column panels (LSTM 64, GRU 128 with linear_before_reset=1 as torch exports
    it: panels of 64, one thread a step; RNN 32: 32) compute
    bit-identically to Rᵀ read row by row (the same FMAs in the same order), and within ORT's few ulps."""
    import torch
    from torch import nn

    import nativeq
    from nativeq.compile import recurrent

    torch.manual_seed(3)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 64, batch_first=True)
            self.gru = nn.GRU(64, 128, batch_first=True)
            self.rnn = nn.RNN(128, 32, batch_first=True)

        def forward(self, x):
            return self.rnn(self.gru(self.lstm(x)[0])[0])[0]

    model = _torch_export(Packed(), torch.randn(2, 10, 16), {1: "T"}, tmp_path)
    reports = _compile_and_verify_lengths(model, tmp_path, lengths=(37,))
    _assert_float_close(reports, expected_outputs=1)
    monkeypatch.setattr(recurrent, "_panel_width", lambda spec: None)
    compile_model(tmp_path / "model.onnx", tmp_path / "rows", CompileConfig(target="host"))
    x = np.random.default_rng(0).standard_normal((2, 37, 16)).astype(np.float32)
    packed, rows = (nativeq.load(tmp_path / name).run({"x": x}) for name in ("out", "rows"))
    assert np.array_equal(packed["y"], rows["y"])


def test_torch_time_major_bidirectional_matches_ort(tmp_path):
    """Bidirectional GRU and tanh RNN, time-major (batch_first=False) with batch 2, then a Linear."""
    import torch
    from torch import nn

    torch.manual_seed(1)

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(16, 24, bidirectional=True)
            self.rnn = nn.RNN(48, 16, bidirectional=True)
            self.out = nn.Linear(32, 4)

        def forward(self, x):
            return self.out(self.rnn(self.gru(x)[0])[0])

    model = _torch_export(TimeMajor(), torch.randn(10, 2, 16), {0: "T"}, tmp_path)
    _assert_float_close(_compile_and_verify_lengths(model, tmp_path), expected_outputs=1)


# ---------------------------------------------------------------------------------------------
# hand-built graphs: what torch does not export

BATCH, INPUT, HIDDEN = 4, 8, 6


def _weights(rng, name: str, *shape, scale: float = 0.4):
    return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)


def _recurrent_features_model() -> onnx.ModelProto:
    """x [T, 4, 8] (and initial states as graph inputs) -> six recurrent nodes, one per feature set.

    sequence_lens = (T - [0, 2, 5, 0]) * [1, 1, 1, 0] is computed from x's shape, so it stays valid
    for every T >= 6 and covers a full-length, two shorter and one empty batch element.
    """
    rng = np.random.default_rng(0)
    d1, d2 = 1, 2
    inits = [numpy_helper.from_array(np.array([0], np.int64), "time_axis_start"),
             numpy_helper.from_array(np.array([1], np.int64), "time_axis_end"),
             numpy_helper.from_array(np.array([0, 2, 5, 0], np.int64), "lens_shortening"),
             numpy_helper.from_array(np.array([1, 1, 1, 0], np.int64), "lens_mask")]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape_value"], name="x_shape"),
        # a tensor, not a shape value: TVM's importer cannot Sub a shape value
        helper.make_node("Cast", ["x_shape_value"], ["x_shape"], to=TensorProto.INT64, name="x_shape_tensor"),
        helper.make_node("Slice", ["x_shape", "time_axis_start", "time_axis_end"], ["steps"], name="steps"),
        helper.make_node("Sub", ["steps", "lens_shortening"], ["lens_unmasked"], name="lens_sub"),
        helper.make_node("Mul", ["lens_unmasked", "lens_mask"], ["lens64"], name="lens_mask"),
        helper.make_node("Cast", ["lens64"], ["lens"], to=TensorProto.INT32, name="lens_cast"),
    ]
    outputs = []

    def lstm(name, d, **attrs):
        inits.extend([_weights(rng, f"{name}_W", d, 4 * HIDDEN, INPUT), _weights(rng, f"{name}_R", d, 4 * HIDDEN, HIDDEN),
                      _weights(rng, f"{name}_B", d, 8 * HIDDEN, scale=0.2), _weights(rng, f"{name}_P", d, 3 * HIDDEN)])

    # 1. LSTM forward: sequence_lens, initial_h/initial_c graph inputs, peepholes, clip.
    lstm("lstm_full", d1)
    nodes.append(helper.make_node("LSTM", ["x", "lstm_full_W", "lstm_full_R", "lstm_full_B", "lens", "h0", "c0", "lstm_full_P"],
                                  ["lstm_full_Y", "lstm_full_Yh", "lstm_full_Yc"], name="lstm_full",
                                  hidden_size=HIDDEN, clip=0.9))
    outputs += [("lstm_full_Y", ["T", d1, BATCH, HIDDEN]), ("lstm_full_Yh", [d1, BATCH, HIDDEN]),
                ("lstm_full_Yc", [d1, BATCH, HIDDEN])]
    # 2. LSTM bidirectional, input_forget, sequence_lens, only Y_h requested.
    lstm("lstm_bi", d2)
    nodes.append(helper.make_node("LSTM", ["x", "lstm_bi_W", "lstm_bi_R", "lstm_bi_B", "lens", "", "", "lstm_bi_P"],
                                  ["", "lstm_bi_Yh"], name="lstm_bi", hidden_size=HIDDEN, direction="bidirectional",
                                  input_forget=1))
    outputs += [("lstm_bi_Yh", [d2, BATCH, HIDDEN])]
    # 3. GRU reverse, linear_before_reset=0, sequence_lens, clip, initial_h.
    inits.extend([_weights(rng, "gru_rev_W", d1, 3 * HIDDEN, INPUT), _weights(rng, "gru_rev_R", d1, 3 * HIDDEN, HIDDEN),
                  _weights(rng, "gru_rev_B", d1, 6 * HIDDEN, scale=0.3)])
    nodes.append(helper.make_node("GRU", ["x", "gru_rev_W", "gru_rev_R", "gru_rev_B", "lens", "h0"],
                                  ["gru_rev_Y", "gru_rev_Yh"], name="gru_rev", hidden_size=HIDDEN, direction="reverse",
                                  linear_before_reset=0, clip=1.5))
    outputs += [("gru_rev_Y", ["T", d1, BATCH, HIDDEN]), ("gru_rev_Yh", [d1, BATCH, HIDDEN])]
    # 4. GRU bidirectional, linear_before_reset=1, sequence_lens, non-default activations.
    inits.extend([_weights(rng, "gru_bi_W", d2, 3 * HIDDEN, INPUT), _weights(rng, "gru_bi_R", d2, 3 * HIDDEN, HIDDEN),
                  _weights(rng, "gru_bi_B", d2, 6 * HIDDEN, scale=0.3)])
    nodes.append(helper.make_node("GRU", ["x", "gru_bi_W", "gru_bi_R", "gru_bi_B", "lens"], ["gru_bi_Y", "gru_bi_Yh"],
                                  name="gru_bi", hidden_size=HIDDEN, direction="bidirectional", linear_before_reset=1,
                                  activations=["Sigmoid", "Tanh", "Sigmoid", "Relu"]))
    outputs += [("gru_bi_Y", ["T", d2, BATCH, HIDDEN]), ("gru_bi_Yh", [d2, BATCH, HIDDEN])]
    # 5. RNN reverse with Relu, sequence_lens, no bias.
    inits.extend([_weights(rng, "rnn_rev_W", d1, HIDDEN, INPUT), _weights(rng, "rnn_rev_R", d1, HIDDEN, HIDDEN)])
    nodes.append(helper.make_node("RNN", ["x", "rnn_rev_W", "rnn_rev_R", "", "lens"], ["rnn_rev_Y", "rnn_rev_Yh"],
                                  name="rnn_rev", hidden_size=HIDDEN, direction="reverse", activations=["Relu"]))
    outputs += [("rnn_rev_Y", ["T", d1, BATCH, HIDDEN]), ("rnn_rev_Yh", [d1, BATCH, HIDDEN])]
    # 6. LSTM layout=1 (batch-major) bidirectional, initial states [B, D, H] as graph inputs, peepholes, no sequence_lens.
    lstm("lstm_bm", d2)
    nodes.append(helper.make_node("Transpose", ["x"], ["x_batch_major"], perm=[1, 0, 2], name="x_batch_major"))
    nodes.append(helper.make_node("LSTM", ["x_batch_major", "lstm_bm_W", "lstm_bm_R", "lstm_bm_B", "", "h0_bm", "c0_bm", "lstm_bm_P"],
                                  ["lstm_bm_Y", "lstm_bm_Yh", "lstm_bm_Yc"], name="lstm_bm", hidden_size=HIDDEN,
                                  direction="bidirectional", layout=1))
    outputs += [("lstm_bm_Y", [BATCH, "T", d2, HIDDEN]), ("lstm_bm_Yh", [BATCH, d2, HIDDEN]),
                ("lstm_bm_Yc", [BATCH, d2, HIDDEN])]

    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", BATCH, INPUT]),
                    helper.make_tensor_value_info("h0", TensorProto.FLOAT, [d1, BATCH, HIDDEN]),
                    helper.make_tensor_value_info("c0", TensorProto.FLOAT, [d1, BATCH, HIDDEN]),
                    helper.make_tensor_value_info("h0_bm", TensorProto.FLOAT, [BATCH, d2, HIDDEN]),
                    helper.make_tensor_value_info("c0_bm", TensorProto.FLOAT, [BATCH, d2, HIDDEN])]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs]
    graph = helper.make_graph(nodes, "recurrent_features", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="nativeq-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _batch_major_as_time_major(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every `layout=1` recurrent node spelled as Transposes around a `layout=0` one.

    ONNX Runtime refuses `layout=1` ("Batchwise recurrent operations are not supported"); this
    equivalent is its reference for the batch-major nodes.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        if node.op_type not in ("LSTM", "GRU", "RNN") or layout != 1:
            nodes.append(node)
            continue
        inputs, outputs = list(node.input), list(node.output)
        for k in (0, 5, 6):  # X, initial_h, initial_c: batch-major -> time-major
            if k < len(inputs) and inputs[k]:
                nodes.append(helper.make_node("Transpose", [inputs[k]], [inputs[k] + "_tm"], perm=[1, 0, 2]))
                inputs[k] += "_tm"
        for k, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2]), (2, [1, 0, 2])):  # Y, Y_h, Y_c back to batch-major
            if k < len(outputs) and outputs[k]:
                nodes.append(helper.make_node("Transpose", [outputs[k] + "_tm"], [outputs[k]], perm=perm))
                outputs[k] += "_tm"
        attrs = [a for a in node.attribute if a.name != "layout"]
        time_major = helper.make_node(node.op_type, inputs, outputs, name=node.name)
        time_major.attribute.extend(attrs)
        nodes.insert(len(nodes) - sum(1 for o in outputs if o), time_major)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


def test_hand_built_recurrent_features_match_ort(tmp_path):
    """sequence_lens, peepholes, initial states as inputs, clip, input_forget, reverse, GRU both resets,
    Relu, only Y_h, layout=1: 13 outputs of six nodes, each within rounding of ORT at T = 6 and 37."""
    model = _recurrent_features_model()
    path, reference = tmp_path / "model.onnx", tmp_path / "reference.onnx"
    onnx.save(model, path)
    onnx.save(_batch_major_as_time_major(model), reference)
    compile_model(path, tmp_path / "out", CompileConfig(target="host"))
    for steps in LENGTHS:
        report = verify_artifact(tmp_path / "out", reference, VerifyConfig(runs=2, dims={"T": steps}))
        assert report.passed, report.table()
        _assert_float_close([report], expected_outputs=13)
        by_name = {out.name: out for out in report.outputs}
        assert by_name["lstm_bm_Y"].shape == (BATCH, steps, 2, HIDDEN)


# ---------------------------------------------------------------------------------------------
# quantize_static QDQ model: the LSTM stays float between quantized Linears


def _quantized_lstm_model(tmp_path) -> onnx.ModelProto:
    """Linear(40->32) -> LSTM(32, 32) -> Linear(32->10), x [1, T, 40], quantized by ORT's
    `quantize_static` (QDQ, per-channel int8 weights, uint8 activations)."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from torch import nn

    torch.manual_seed(2)

    class LinearLstmLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(40, 32)
            self.lstm = nn.LSTM(32, 32, batch_first=True)
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            return self.out(self.lstm(torch.relu(self.inp(x)))[0])

    class RandomFeatures(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self._batches = iter([{"x": rng.normal(0, 1, (1, t, 40)).astype(np.float32)} for t in (20, 37, 50)])

        def get_next(self):
            return next(self._batches, None)

    float_model = _torch_export(LinearLstmLinear(), torch.randn(1, 20, 40), {1: "T"}, tmp_path)
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(float_model, float_path)
    quantize_static(str(float_path), str(qdq_path), RandomFeatures(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(qdq_path)


def test_quantize_static_qdq_lstm_within_one_step_of_ort(tmp_path):
    model = _quantized_lstm_model(tmp_path)
    ops = {n.op_type for n in model.graph.node}
    assert {"LSTM", "QuantizeLinear", "DequantizeLinear"} <= ops
    for report in _compile_and_verify_lengths(model, tmp_path, lengths=(20, 53)):
        (logits,) = report.outputs
        assert logits.quantized, report.table()
        assert logits.max_steps <= 1 + 1e-4 and logits.exact_pct >= 99.0, report.table()


# ---------------------------------------------------------------------------------------------
# refusals


def _single_lstm(**attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [_weights(rng, "W", 1, 4 * HIDDEN, INPUT), _weights(rng, "R", 1, 4 * HIDDEN, HIDDEN)]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], name="/rnn/LSTM", hidden_size=HIDDEN, **attrs)
    graph = helper.make_graph([node], "single_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, INPUT])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, 1, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("attrs, expected", [
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, "node '/rnn/LSTM' (LSTM): activations HardSigmoid is not supported"),
    ({"activation_alpha": [0.5]}, "node '/rnn/LSTM' (LSTM): activation_alpha is not supported"),
])
def test_unsupported_attribute_is_a_one_line_error(attrs, expected, tmp_path, capfd):
    path = tmp_path / "model.onnx"
    onnx.save(_single_lstm(**attrs), path)
    with pytest.raises(NativeqError) as err:
        compile_model(path, tmp_path / "out", CompileConfig(target="host"))
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message
    assert "Error converting operator" not in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------
# Raspberry Pi targets: cross-compiled, run under qemu-aarch64 (see tests/test_arm.py)


@pytest.mark.arm
@pytest.mark.parametrize("target, case", [("rpi4", "qdq"), ("rpi5", "features")])
def test_raspberry_pi_artifact_matches_ort_under_qemu(target, case, tmp_path):
    if case == "qdq":
        model = _quantized_lstm_model(tmp_path)
        reference_model = model
    else:
        model = _recurrent_features_model()
        reference_model = _batch_major_as_time_major(model)
    path, reference = tmp_path / "model.onnx", tmp_path / "reference.onnx"
    onnx.save(model, path)
    onnx.save(reference_model, reference)
    compile_model(path, tmp_path / "out", CompileConfig(target=target))
    report = verify_artifact(tmp_path / "out", reference, VerifyConfig(runs=1, dims={"T": 23}))
    assert report.passed and "emulated" in report.execution, report.table()
    for out in report.outputs:
        if out.quantized:
            assert out.max_steps <= 1 + 1e-4 and out.exact_pct >= 99.0, report.table()
        else:
            assert out.max_abs <= FLOAT_TOLERANCE, report.table()


def _innermost_fma_loop(disassembly: str, function: str) -> list[str]:
    """The instructions of `function`'s innermost loop (a backward branch with no branch inside) with the most
    `fmla`s, from objdump -d text."""
    lines, inside = [], False
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            inside = line.endswith(f"<{function}>:")
        elif inside and ":\t" in line:
            address, text = line.split(":\t", 1)
            lines.append((int(address, 16), text.split("//")[0].strip()))
    best: list[str] = []
    for position, (address, text) in enumerate(lines):
        target = text.split()[-2] if text.startswith("b.") and len(text.split()) >= 3 else None
        if target is None or int(target, 16) >= address:
            continue
        body = [t for a, t in lines[:position + 1] if a >= int(target, 16)]
        if any(t.startswith("b.") for t in body[:-1]):
            continue  # not innermost
        if sum(t.startswith("fmla") for t in body) > sum(t.startswith("fmla") for t in best):
            best = body
    return best


@pytest.mark.arm
def test_projection_loads_its_weight_panels_in_pairs_on_arm(tmp_path):
    """The input projection reads Wᵀ in 16-column panels contiguous over k, so its unrolled k-steps load weights as
    `ldp q` pairs (a row of an unpacked Wᵀ is G·4 bytes away, past `ldp`'s 1 KB reach: single `ldr q`s), and a
    k-step's 4 rows of X as one vector read by lane (not a scalar load per row or pair of rows).
    LSTM(64 -> 40) then GRU(40 -> 20) (a gate width of 60: a zero-padded last panel), rpi5 under qemu vs ORT."""
    import torch
    from torch import nn

    torch.manual_seed(4)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(64, 40, batch_first=True)
            self.gru = nn.GRU(40, 20, batch_first=True)

        def forward(self, x):
            return self.gru(self.lstm(x)[0])[0]

    model = _torch_export(Stack(), torch.randn(1, 10, 64), {1: "T"}, tmp_path)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "out", CompileConfig(target="rpi5"))
    loop = _innermost_fma_loop(aarch64_disassembly(tmp_path / "out", raw_bytes=False),
                               "lstm_projection_i64_g160_compute_")
    fmla = sum(t.startswith("fmla") for t in loop)
    pairs = sum(t.split()[0] == "ldp" and t.split()[1].startswith("q") for t in loop)
    other_loads = [t for t in loop if t.split()[0] in ("ldr", "ldur", "ld1r") or (t.split()[0] == "ldp" and t.split()[1][0] != "q")]
    assert fmla >= 64 and not other_loads, loop
    # a weight vector serves 4 rows (fmla / 4 of them), one vector of X a k-step's 16 FMAs; two vectors per ldp
    assert pairs * 2 == fmla // 4 + fmla // 16, loop
    report = verify_artifact(tmp_path / "out", path, VerifyConfig(runs=1, dims={"T": 23}))
    assert report.passed and "emulated" in report.execution, report.table()
    _assert_float_close([report], expected_outputs=1)
