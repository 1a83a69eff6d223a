"""`compile --explain` lists every fused kernel with its schedule and its share of the multiply-accumulates.

The MAC counts are checked against the layer arithmetic (T x K x N for a matmul, T x C_out x C_in/groups x k
for a conv) at the length the report binds the symbolic T to; the kind ("contraction") is read from the
TIR, the schedule from the passes that scheduled each kernel; `manifest["kernels"]` is always written.
"""

import json
import math

import numpy as np
import onnx
import pytest
import qdq_models
from onnx import helper

from nativeq.compile import CompileConfig, compile_model

T = 48  # a multiple of the int8 matmul's row tile: the kernel's padded rows are the layer's rows


def _compile(tmp_path, model, name="m", **cfg):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return compile_model(path, tmp_path / f"{name}_art", CompileConfig(target="host", use_tuning=False, **cfg))


def _contractions(result):
    return [k for k in result.kernels if k["kind"] == "contraction"]


def _mlp(widths=(64, 64, 64, 32), t="T"):
    """x[1, t, 64] -> Q/DQ -> (MatMul(DQ(W[a, b])) -> Q/DQ) per consecutive pair of `widths` -> y."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    h = qdq_models._q_dq(nodes, inits, "x", "x", 0.05, "uint8")
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        w = qdq_models._weight_dq(nodes, inits, f"fc{i}", rng.normal(0, 0.2, (a, b)).astype(np.float32), axis=1)
        nodes.append(helper.make_node("MatMul", [h, w], [f"mm{i}"], name=f"fc{i}_MatMul"))
        h = qdq_models._q_dq(nodes, inits, f"h{i}", f"mm{i}", 0.1, "uint8")
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return qdq_models._model(nodes, inits, [1, t, widths[0]], [1, t, widths[-1]], "mlp")


def test_int8_matmul_is_one_tensorized_contraction_with_all_the_macs(tmp_path):
    result = _compile(tmp_path, qdq_models.qdq_matmul(k=64, n=48, t="T"), explain=True, dims={"T": T})
    (mm,) = _contractions(result)
    assert mm["schedule"] == "int8 tensorized" and mm["rule"] == "int8-matmul"
    assert mm["macs"] == T * 64 * 48 and mm["calls"] == 1 and mm["share"] == 1.0
    assert sum(k["share"] for k in result.kernels) == pytest.approx(1.0)
    assert all(k["macs"] == 0 and k["share"] == 0 for k in result.kernels if k is not mm)
    assert {"name", "kind", "schedule", "macs", "share", "calls"} <= set(mm)
    # written into the artifact, with the sizes the counts assume
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["kernels"] == result.kernels and manifest["kernel_dims"] == {"T": T}
    text = result.summary()
    assert f"MACs share at T={T}" in text and "WARNING" not in text
    (row,) = [ln for ln in text.splitlines() if ln.startswith(mm["name"])]
    assert row.split()[1:] == ["contraction", "int8", "tensorized", "100.0", "1", "fc_MatMul", "+5"], row


def test_shares_follow_macs_times_calls(tmp_path):
    """Three int8 layers: two of the same shape share one kernel (called twice), the third is half their size."""
    result = _compile(tmp_path, _mlp(), dims={"T": T})
    by_macs = {k["macs"]: k for k in _contractions(result)}
    assert sorted(by_macs) == [T * 64 * 32, T * 64 * 64], result.kernels
    square, narrow = by_macs[T * 64 * 64], by_macs[T * 64 * 32]
    assert square["calls"] == 2 and narrow["calls"] == 1
    assert square["share"] == pytest.approx(0.8) and narrow["share"] == pytest.approx(0.2)
    assert sum(k["share"] for k in result.kernels) == pytest.approx(1.0)
    assert [k["name"] for k in result.kernels][:2] == [square["name"], narrow["name"]]  # sorted by share
    # without --explain: one count line, no table
    text = result.summary()
    assert f"kernels: {len(result.kernels)} (2 contraction, 0 on the generic path)" in text, text
    assert "MACs share" not in text and square["name"] not in text


def test_default_length_counts_the_padded_rows(tmp_path):
    """Without --dim, T counts as 64; the int8 kernel pads the 64 rows to whole register tiles and counts them."""
    from nativeq.compile.schedules.intrinsics import dot_intrin_for, row_tile
    from nativeq.targets import get_target

    result = _compile(tmp_path, qdq_models.qdq_matmul(k=64, n=48, t="T"))
    (mm,) = _contractions(result)
    tile = row_tile(dot_intrin_for(get_target("host")))
    assert result.manifest["kernel_dims"] == {"T": 64}
    assert mm["macs"] == math.ceil(64 / tile) * tile * 64 * 48


def test_float_conv_on_the_generic_path_warns(tmp_path):
    """TVM's float path (--no-int8) leaves the conv to the generic rule: the report says so, with its share."""
    result = _compile(tmp_path, qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=3, t="T"), int8=False, explain=True,
                      dims={"T": T})
    (conv,) = _contractions(result)
    assert conv["schedule"] == "generic" and conv["macs"] == T * 48 * 32 * 3 and conv["share"] == 1.0
    warnings = [ln for ln in result.summary().splitlines() if ln.startswith("WARNING")]
    assert warnings == [f"WARNING: contraction kernel {conv['name']} (ONNX conv_Conv) (100.0% of MACs) is on the generic path: "
                        f"expect it to be slow"]
    quiet = _compile(tmp_path, qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=3, t="T"), name="q", int8=False)
    assert "(1 contraction, 1 on the generic path)" in quiet.summary() and "WARNING" not in quiet.summary()


def test_int8_depthwise_conv(tmp_path):
    result = _compile(tmp_path, qdq_models.qdq_conv1d(c_in=32, c_out=32, groups=32, kernel=3, t="T"), explain=True,
                      dims={"T": T})
    (dw,) = _contractions(result)
    assert dw["schedule"] == "int8 depthwise" and dw["macs"] == T * 32 * 3 and dw["share"] == 1.0
    assert "WARNING" not in result.summary()


def test_elementwise_model_has_no_contraction(tmp_path):
    result = _compile(tmp_path, qdq_models.dynamic_shape_arithmetic(), explain=True)
    assert result.kernels and not _contractions(result)
    assert all(k["macs"] == 0 and k["share"] == 0 for k in result.kernels)
    assert all(k["kind"] in ("elementwise", "reduction") for k in result.kernels)
    assert all(k["calls"] >= 1 for k in result.kernels)
    assert "(0 contraction, 0 on the generic path)" in result.summary()


def test_kind_comes_from_the_tir_not_the_name(tmp_path):
    """Layer norm's sum of squares (x * x) and softmax's sums are reductions, not contractions; a kernel named
    after nothing in particular with a multiply-accumulate is one."""
    from nativeq.compile._tvm import T as TS
    from nativeq.compile.kernels import CONTRACTION, ELEMENTWISE, REDUCTION, analyze

    @TS.prim_func(s_tir=True)
    def squares(a: TS.Buffer((8, 16), "float32"), out: TS.Buffer((8,), "float32")):
        for i, k in TS.grid(8, 16):
            with TS.sblock("sumsq"):
                vi, vk = TS.axis.remap("SR", [i, k])
                with TS.init():
                    out[vi] = TS.float32(0)
                out[vi] = out[vi] + a[vi, vk] * a[vi, vk]

    @TS.prim_func(s_tir=True)
    def anything(a: TS.Buffer((8, 16), "int8"), b: TS.Buffer((16, 4), "int8"), c: TS.Buffer((8, 4), "int32")):
        for i, j, k in TS.grid(8, 4, 16):
            with TS.sblock("update"):
                vi, vj, vk = TS.axis.remap("SSR", [i, j, k])
                with TS.init():
                    c[vi, vj] = 0
                c[vi, vj] = c[vi, vj] + TS.Cast("int32", a[vi, vk]) * TS.Cast("int32", b[vk, vj])

    @TS.prim_func(s_tir=True)
    def scale(a: TS.Buffer((8, 16), "float32"), b: TS.Buffer((8, 16), "float32")):
        for i, k in TS.grid(8, 16):
            with TS.sblock("scale"):
                vi, vk = TS.axis.remap("SS", [i, k])
                b[vi, vk] = a[vi, vk] * a[vi, vk]

    assert analyze(squares, {}) == (REDUCTION, 0)
    assert analyze(anything, {}) == (CONTRACTION, 8 * 4 * 16)
    assert analyze(scale, {}) == (ELEMENTWISE, 0)


def test_cli_explain_table_and_json(nativeq_cli, tmp_path):
    onnx.save(qdq_models.qdq_matmul(k=64, n=48, t="T"), tmp_path / "m.onnx")
    res = nativeq_cli("compile", "m.onnx", "--target", "host", "-o", "out", "--no-tuning", "--explain", "--dim", f"T={T}")
    assert res.returncode == 0, res.stderr
    header = [ln for ln in res.stdout.splitlines() if ln.startswith("kernel ")]
    assert header and header[0].split() == ["kernel", "kind", "schedule", "MACs", "%", "calls", "ONNX", "nodes"], res.stdout
    res = nativeq_cli("compile", "m.onnx", "--target", "host", "-o", "out2", "--no-tuning", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (mm,) = [k for k in data["manifest"]["kernels"] if k["kind"] == "contraction"]
    assert mm["schedule"] == "int8 tensorized" and data["manifest"]["kernel_dims"] == {"T": 64}
    assert data["artifact"].endswith("out2")


def test_int8_sites_are_named_by_their_onnx_nodes(tmp_path):
    result = _compile(tmp_path, _mlp(), explain=True)
    assert [s["site"] for s in result.explain] == ["fc0_MatMul", "fc1_MatMul", "fc2_MatMul"]
    assert all(s["status"] == "int8" for s in result.explain)
    assert "fc1_MatMul" in result.explain_table()


# ----------------------------------------------------------------------------- ONNX nodes of each kernel
def _node_names(kernel, op=None):
    return [n["name"] for n in kernel["onnx_nodes"] if op is None or n["op"] == op]


def test_kernels_name_the_onnx_nodes_they_compute(tmp_path):
    result = _compile(tmp_path, qdq_models.qdq_matmul(k=64, n=48), dims={"T": T})
    (mm,) = _contractions(result)
    # compute nodes first (graph order), then the quantize/dequantize nodes folded into the kernel
    assert _node_names(mm)[:2] == ["fc_MatMul", "fc_Add"]
    assert set(_node_names(mm)) == {"fc_MatMul", "fc_Add", "x_DQ", "fc_wDQ", "y_Q", "y_DQ"}
    assert {n["op"] for n in mm["onnx_nodes"]} == {"MatMul", "Add", "QuantizeLinear", "DequantizeLinear"}
    others = {name for k in result.kernels if k is not mm for name in _node_names(k)}
    assert others == {"x_Q"}  # the input's quantize is its own kernel; the Identity computes nothing


def test_a_kernel_shared_by_layers_lists_each_layer(tmp_path):
    """Two 64x64 layers run one kernel (FuseTIR keeps one copy); the 64x32 layer has its own."""
    result = _compile(tmp_path, _mlp(widths=(64, 64, 64, 32)), dims={"T": T})
    by_calls = {k["calls"]: k for k in _contractions(result)}
    assert set(by_calls) == {1, 2}
    assert _node_names(by_calls[2], "MatMul") == ["fc0_MatMul", "fc1_MatMul"] and by_calls[2]["macs"] == T * 64 * 64
    assert _node_names(by_calls[1], "MatMul") == ["fc2_MatMul"] and by_calls[1]["macs"] == T * 64 * 32


def test_rewritten_and_unnamed_nodes_are_named_as_the_user_wrote_them(tmp_path):
    """A QLinearMatMul (rewritten to DequantizeLinear/MatMul/QuantizeLinear before import) is named as itself;
    a node without a name is named after its first output (as nativeq's errors name it)."""
    result = _compile(tmp_path, qdq_models.qlinear_matmul(k=64, n=48), dims={"T": T})
    (mm,) = _contractions(result)
    assert mm["onnx_nodes"][0] == {"op": "QLinearMatMul", "name": "fc_QLinearMatMul"}
    assert not any("_MatMul" in n["name"] and n["op"] == "MatMul" for k in result.kernels for n in k["onnx_nodes"])

    model = _mlp(widths=(64, 32))
    for node in model.graph.node:
        node.name = ""
    result = _compile(tmp_path, model, name="unnamed", dims={"T": T})
    (mm,) = _contractions(result)
    assert mm["onnx_nodes"][0] == {"op": "MatMul", "name": "mm0"}
