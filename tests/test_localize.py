"""verify's localization: the first quantized tensor where nativeq and ONNX Runtime differ, tie or error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.verify import VerifyConfig, verify_artifact

# A rounding tie, found by a numpy search over float32 scales: 63 * 22 * SX * SW / SY1 is
# 80.5000028268177 exactly, which rounds to 81 (nativeq's integer path gives 81), while ONNX
# Runtime's float32 MatMul of the dequantized operands lands on or below 80.5 and rounds to 80.
SX, SW, SY1, QX, QW = np.float32(0.014155486), np.float32(0.0059839534), np.float32(0.0014584123), 63, 22
EXACT = 80.5000028268177
FIRST = "/layer1/MatMul"


def _two_layer_model(sx, sw, sy1, qw: int, qoperator: bool = False, w1_tweak: int = 0) -> onnx.ModelProto:
    """x[1, 4] -> Q/DQ -> MatMul(W1) -> Q/DQ -> MatMul(W2) -> Q/DQ -> y[1, 2] (with `qoperator`: QuantizeLinear ->
    QLinearMatMul(W1) -> QLinearMatMul(W2) -> DequantizeLinear, the products without a QuantizeLinear). W1 column 0
    is (qw, 0, 0, 0), so y1[0, 0] = qx * qw * sx * sw / sy1; W2 carries one step of y1[0, 0] to two steps of
    y[0, 0]. `w1_tweak` is added to W1[1, 1] (one weight step: a planted bug)."""
    w1 = np.array([[qw, 0, 1], [0, 8, 3], [0, 5, -2], [0, 0, 4]], np.int8)
    w1[1, 1] += w1_tweak
    w2 = np.array([[127, 3], [0, 40], [0, -50]], np.int8)
    sw2 = np.float32(0.01)
    sy2 = np.float32(float(sy1) * float(sw2) * 127 / 2)
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in {
        "sx": sx, "zx": np.uint8(0), "w1": w1, "sw1": sw, "zw": np.int8(0), "sy1": sy1, "zy1": np.uint8(0),
        "w2": w2, "sw2": sw2, "sy2": sy2, "zy2": np.uint8(0)}.items()]
    if qoperator:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="/input/QuantizeLinear"),
            helper.make_node("QLinearMatMul", ["xq", "sx", "zx", "w1", "sw1", "zw", "sy1", "zy1"], ["y1q"], name="mm1"),
            helper.make_node("QLinearMatMul", ["y1q", "sy1", "zy1", "w2", "sw2", "zw", "sy2", "zy2"], ["y2q"], name="mm2"),
            helper.make_node("DequantizeLinear", ["y2q", "sy2", "zy2"], ["y"], name="/output/DequantizeLinear"),
        ]
    else:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="/input/QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="/input/DequantizeLinear"),
            helper.make_node("DequantizeLinear", ["w1", "sw1", "zw"], ["w1d"], name="/layer1/w/DequantizeLinear"),
            helper.make_node("MatMul", ["xd", "w1d"], ["y1"], name=FIRST),
            helper.make_node("QuantizeLinear", ["y1", "sy1", "zy1"], ["y1q"], name="/layer1/QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["y1q", "sy1", "zy1"], ["y1d"], name="/layer1/DequantizeLinear"),
            helper.make_node("DequantizeLinear", ["w2", "sw2", "zw"], ["w2d"], name="/layer2/w/DequantizeLinear"),
            helper.make_node("MatMul", ["y1d", "w2d"], ["y2"], name="/layer2/MatMul"),
            helper.make_node("QuantizeLinear", ["y2", "sy2", "zy2"], ["y2q"], name="/layer2/QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["y2q", "sy2", "zy2"], ["y"], name="/output/DequantizeLinear"),
        ]
    graph = helper.make_graph(nodes, "two_layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _tie_model(w1_tweak: int = 0) -> onnx.ModelProto:
    """The QDQ model of the tie above (y1[0, 0] is the tie)."""
    return _two_layer_model(SX, SW, SY1, QW, w1_tweak=w1_tweak)


@pytest.fixture(scope="module")
def tie_case(tmp_path_factory):
    """(onnx, artifact, inputs.npz, artifact compiled from the model with W1[1, 1] one step off)."""
    root = tmp_path_factory.mktemp("tie")
    onnx.save(_tie_model(), root / "tie.onnx")
    onnx.save(_tie_model(w1_tweak=1), root / "tie_bug.onnx")
    cfg = CompileConfig(target="host", use_tuning=False)
    compile_model(root / "tie.onnx", root / "art", cfg)
    compile_model(root / "tie_bug.onnx", root / "art_bug", cfg)
    # x[0, 0] quantizes to QX; with x[0, 1] = 255 one step of W1[1, 1] is about 15 steps of y1[0, 1].
    np.savez(root / "x.npz", x=np.array([[QX * SX, 255 * SX, 100 * SX, 7 * SX]], np.float32))
    return root / "tie.onnx", root / "art", root / "x.npz", root / "art_bug"


def test_the_constructed_value_is_a_tie_onnxruntime_rounds_the_other_way(tie_case):
    import onnxruntime as ort
    from fractions import Fraction

    exact = Fraction(QX * QW) * Fraction(float(SX)) * Fraction(float(SW)) / Fraction(float(SY1))
    assert 0 < exact - Fraction(161, 2) < Fraction(1, 10**5)  # just above 80.5: correctly rounded, 81
    model = _tie_model()
    model.graph.output.append(helper.make_tensor_value_info("y1q", TensorProto.UINT8, [1, 3]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.load(tie_case[2])["x"]
    assert int(session.run(["y1q"], {"x": x})[0][0, 0]) == 80


def test_tie_is_localized_and_accepted(tie_case, nativeq_cli):
    onnx_path, art, x, _ = tie_case
    report = verify_artifact(art, onnx_path, VerifyConfig(inputs=str(x)))
    assert not report.passed
    (loc,) = report.localizations
    assert (loc.kind, loc.site, loc.node, loc.op) == ("tie", "y1q", FIRST, "MatMul")
    assert (loc.index, loc.nativeq, loc.onnxruntime, loc.differing) == ([0, 0], 81, 80, 1)
    assert loc.exact == pytest.approx(EXACT, abs=1e-9) and loc.rounded == 81
    assert loc.isolated_agrees and loc.compiles == 2 and loc.outputs == ["y"]

    failed = nativeq_cli("verify", art, "--onnx", onnx_path, "--inputs", x)
    assert failed.returncode == 1, failed.stderr
    text = " ".join(failed.stdout.split())
    assert f"of MatMul node '{FIRST}'" in text and "a rounding tie, within float32 error of 80.5" in text
    passed = nativeq_cli("verify", art, "--onnx", onnx_path, "--inputs", x, "--accept-ties", "--json")
    assert passed.returncode == 0, passed.stderr
    d = json.loads(passed.stdout)
    assert d["passed"] and d["ties_accepted"] and not d["outputs"][0]["passed"]
    assert {k: d["localization"][k] for k in ("site", "node", "op", "kind", "index", "nativeq", "onnxruntime",
                                              "isolated_agrees", "compiles")} == {
        "site": "y1q", "node": FIRST, "op": "MatMul", "kind": "tie", "index": [0, 0], "nativeq": 81,
        "onnxruntime": 80, "isolated_agrees": True, "compiles": 2}


def _planted_compiler_bug(monkeypatch):
    """Every compile in this process imports W1 with W1[1, 1] one step off, as a compiler bug would."""
    import nativeq.compile.api as compile_api

    real = compile_api.import_model_with_checks

    def buggy(model, path):
        for init in model.graph.initializer:
            if init.name == "w1":
                w = numpy_helper.to_array(init).copy()
                w[1, 1] += 1
                init.CopyFrom(numpy_helper.from_array(w, "w1"))
        return real(model, path)

    monkeypatch.setattr(compile_api, "import_model_with_checks", buggy)


def test_a_planted_compiler_bug_is_an_error_and_not_accepted(tie_case, tmp_path, monkeypatch):
    onnx_path, _, x, _ = tie_case
    _planted_compiler_bug(monkeypatch)
    compile_model(onnx_path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", onnx_path, VerifyConfig(inputs=str(x), accept_ties=True))
    assert not report.passed and not report.ties_accepted
    (loc,) = report.localizations
    assert (loc.kind, loc.site, loc.node, loc.op) == ("error", "y1q", FIRST, "MatMul")
    assert loc.differing == 2 and loc.ties == 1 and loc.index == [0, 1]  # the tie at [0, 0], the bug at [0, 1]
    assert not loc.isolated_agrees and loc.isolated_differing == 2
    table = " ".join(report.table().split())
    assert "not a tie: an error (rounded exactly:" in table and table.endswith("FAIL: y beyond tolerance")


def test_an_artifact_compiled_from_another_model_is_not_localized(tie_case, nativeq_cli):
    """An artifact built from a copy with one weight changed: compiling the given ONNX file again does
    not reproduce it, so no site is named, and --accept-ties does not pass it."""
    onnx_path, _, x, art_bug = tie_case
    report = verify_artifact(art_bug, onnx_path, VerifyConfig(inputs=str(x), accept_ties=True))
    assert not report.passed
    (loc,) = report.localizations
    assert loc.kind == "unlocalized" and "differently from the artifact" in loc.reason
    result = nativeq_cli("verify", art_bug, "--onnx", onnx_path, "--inputs", x, "--accept-ties")
    assert result.returncode == 1 and "not localized" in " ".join(result.stdout.split())


def test_no_localization_when_verify_passes_or_when_turned_off(tie_case):
    onnx_path, art, x, _ = tie_case
    report = verify_artifact(art, onnx_path, VerifyConfig(inputs=str(x), tol_steps=10))
    assert report.passed and report.localizations == []
    report = verify_artifact(art, onnx_path, VerifyConfig(inputs=str(x), localize=False))
    assert not report.passed and report.localizations == []


def _zoo_verified_at_200_frames(name: str, quantizer: str, tmp_path):
    """The zoo entry compiled for the host and verified at T=200 with ties accepted: it must be beyond tolerance and
    pass; its first localization."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import zoo

    onnx_path = Path(zoo.build(name, quantizer, str(tmp_path)))
    compile_model(onnx_path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", onnx_path, VerifyConfig(dims={"T": 200}, accept_ties=True))
    assert not report.within_tolerance and report.passed
    return report.localizations[0]


def test_zoo_transformer_at_200_frames_localizes_to_a_tie(tmp_path):
    loc = _zoo_verified_at_200_frames("transformer_prenorm", "qdq_u8_pc", tmp_path)
    assert (loc.kind, loc.node, loc.op) == ("tie", "/blocks.0/linear1/MatMul", "MatMul")
    assert loc.site == "/blocks.0/linear1/MatMul_output_0_QuantizeLinear_Output" and loc.isolated_agrees


def test_bisection_over_graph_cuts_when_the_extra_outputs_change_the_result(tie_case, monkeypatch):
    """Pretend the copy with every site as an output computed y differently: the model compiled as it
    is reproduces the artifact, so cuts ending at each site are compiled and bisected."""
    import nativeq.verify.localize as localize

    real, calls = localize._reproduces, []

    def first_call_fails(*args):
        calls.append(args)
        return len(calls) > 1 and real(*args)

    monkeypatch.setattr(localize, "_reproduces", first_call_fails)
    onnx_path, art, x, _ = tie_case
    report = verify_artifact(art, onnx_path, VerifyConfig(inputs=str(x), accept_ties=True))
    (loc,) = report.localizations
    assert (loc.kind, loc.site, loc.node) == ("tie", "y1q", FIRST) and report.passed
    assert "bisection over graph cuts" in loc.reason
    assert loc.compiles == 6  # the copy, the model as it is, cuts at y2q, xq, y1q, the site alone


def test_value_before_rounding_of_a_conv_and_of_an_op_without_a_float64_kernel(tmp_path):
    """ONNX Runtime has no float64 Conv or Erf: the Conv is evaluated on integers, Erf in float32."""
    from nativeq.verify import localize

    rng = np.random.default_rng(1)
    xq, wq = rng.integers(0, 256, (1, 3, 9)).astype(np.uint8), rng.integers(-127, 128, (4, 3, 3)).astype(np.int8)
    sx, sw, bias = np.float32(0.02), np.array([0.01, 0.02, 0.005, 0.03], np.float32), np.arange(4, dtype=np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "sx": np.array(sx), "zx": np.array(128, np.uint8), "w": wq, "sw": sw, "zw": np.zeros(4, np.int8), "b": bias,
        "sy": np.array(0.05, np.float32), "zy": np.array(0, np.int8)}.items()]
    nodes = [helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1], name="conv"),
             helper.make_node("Erf", ["c"], ["e"], name="erf"),
             helper.make_node("Add", ["c", "e"], ["y"], name="add"),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"], name="q")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 3, 9])],
                              [helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 4, 9])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    constants, q = localize._constants(model.graph), model.graph.node[-1]
    sub, frontier = localize._subgraph(model, q, constants)
    assert frontier == ["xq"] and len(sub) == 6
    for ops in ({"Erf"}, set()):
        exact_model, feeds = localize._float64_model(sub, q, constants, list(model.opset_import), {"xq": xq}, ops)
        try:
            pre = localize._ort_run(exact_model, "disable", feeds, tmp_path, "exact")["y"]
        except Exception:  # noqa: BLE001
            assert not ops  # without the float32 Erf, ONNX Runtime has no kernel
            continue
    x = (xq.astype(np.float64) - 128) * float(sx)
    w = wq.astype(np.float64) * sw.astype(np.float64)[:, None, None]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1)))
    conv = np.stack([[(xp[0, :, t:t + 3] * w[o]).sum() for t in range(9)] for o in range(4)])[None] + bias[:, None]
    from math import erf
    expected = conv + np.vectorize(erf)(conv)
    assert np.allclose(pre, expected, rtol=1e-6, atol=1e-6)


# A tie where ONNX Runtime's QLinearMatMul rounds the wrong way, found by a numpy search over float32
# scales: 53 * 27 * SX_Q * SW_Q / SY_Q is 49.49999631867146, correctly rounded 49; ONNX Runtime's
# integer kernel requantizes with a float32 multiplier and gives 50.
SX_Q, SW_Q, SY_Q, QX_Q, QW_Q = (np.float32(0.012536394409835339), np.float32(0.006831058766692877),
                                np.float32(0.0024756835773587227), 53, 27)


def _qoperator_tie_model() -> onnx.ModelProto:
    """The QOperator model of the tie above: y1q[0, 0] is the tie."""
    return _two_layer_model(SX_Q, SW_Q, SY_Q, QW_Q, qoperator=True)


@pytest.fixture(scope="module")
def qoperator_tie_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("qoperator_tie")
    onnx.save(_qoperator_tie_model(), root / "tie.onnx")
    compile_model(root / "tie.onnx", root / "art", CompileConfig(target="host", use_tuning=False))
    np.savez(root / "x.npz", x=np.array([[QX_Q * SX_Q, 255 * SX_Q, 100 * SX_Q, 7 * SX_Q]], np.float32))
    return root / "tie.onnx", root / "art", root / "x.npz"


def test_a_qoperator_tie_is_localized_at_the_qlinear_node(qoperator_tie_case, nativeq_cli):
    """The QLinearMatMul output has no QuantizeLinear: it is a site of its own, checked on the QDQ form, and in
    isolation ONNX Runtime runs the QLinearMatMul node itself."""
    import onnxruntime as ort
    from fractions import Fraction

    onnx_path, art, x = qoperator_tie_case
    exact = Fraction(QX_Q * QW_Q) * Fraction(float(SX_Q)) * Fraction(float(SW_Q)) / Fraction(float(SY_Q))
    assert 0 < Fraction(99, 2) - exact < Fraction(1, 10**5)  # just below 49.5: correctly rounded, 49
    model = _qoperator_tie_model()
    model.graph.output.append(helper.make_tensor_value_info("y1q", TensorProto.UINT8, [1, 3]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert int(session.run(["y1q"], {"x": np.load(x)["x"]})[0][0, 0]) == 50

    report = verify_artifact(art, onnx_path, VerifyConfig(inputs=str(x)))
    assert not report.passed
    (loc,) = report.localizations
    assert (loc.kind, loc.site, loc.node, loc.op, loc.quantize_node) == ("tie", "y1q", "mm1", "QLinearMatMul", None)
    assert (loc.index, loc.nativeq, loc.onnxruntime, loc.rounded, loc.differing) == ([0, 0], 49, 50, 49, 1)
    assert loc.exact == pytest.approx(float(exact), abs=1e-9)
    assert loc.isolated_agrees and loc.isolated_differing == 1 and loc.reason is None  # ORT's kernel, in isolation too
    text = " ".join(report.table().split())
    assert "the output of QLinearMatMul node 'mm1'" in text and "a rounding tie, within float32 error of 49.5" in text
    passed = nativeq_cli("verify", art, "--onnx", onnx_path, "--inputs", x, "--accept-ties")
    assert passed.returncode == 0 and "from rounding ties only" in passed.stdout, passed.stdout + passed.stderr


def test_a_planted_compiler_bug_in_a_qoperator_model_is_an_error(qoperator_tie_case, tmp_path, monkeypatch):
    onnx_path, _, x = qoperator_tie_case
    _planted_compiler_bug(monkeypatch)
    compile_model(onnx_path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", onnx_path, VerifyConfig(inputs=str(x), accept_ties=True))
    assert not report.passed and not report.ties_accepted
    (loc,) = report.localizations
    assert (loc.kind, loc.site, loc.node, loc.op) == ("error", "y1q", "mm1", "QLinearMatMul")
    assert loc.differing == 2 and loc.ties == 1 and loc.index == [0, 1] and not loc.isolated_agrees


def test_zoo_dynamic_transformer_localizes_to_a_dynamic_quantize_tie(tmp_path):
    """quantize_dynamic: the activations are quantized at run time (DynamicQuantizeLinear), after float ops whose
    float32 results the engines compute in different orders; the first such site that differs is a tie."""
    loc = _zoo_verified_at_200_frames("transformer_postnorm", "dynamic", tmp_path)
    assert (loc.kind, loc.quantize_op, loc.op) == ("tie", "DynamicQuantizeLinear", "LayerNormalization")
    assert loc.isolated_agrees and abs(loc.exact - round(loc.exact)) == pytest.approx(0.5, abs=1e-3)


def test_value_before_rounding_of_a_float32_op_with_constant_node_inputs(tmp_path):
    """InstanceNormalization (no float64 kernel in ONNX Runtime) with its scale and bias from Constant nodes."""
    from nativeq.verify import localize

    rng = np.random.default_rng(2)
    xq = rng.integers(0, 256, (1, 3, 50)).astype(np.uint8)
    gamma, beta = np.array([1.0, 0.5, 2.0], np.float32), np.array([0.0, 0.1, -0.2], np.float32)
    nodes = [helper.make_node("Constant", [], ["gamma"], value=numpy_helper.from_array(gamma)),
             helper.make_node("Constant", [], ["beta"], value=numpy_helper.from_array(beta)),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("InstanceNormalization", ["xd", "gamma", "beta"], ["y"], name="norm"),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"], name="q")]
    inits = [numpy_helper.from_array(v, k) for k, v in {"sx": np.array(0.02, np.float32), "zx": np.array(128, np.uint8),
                                                       "sy": np.array(0.03, np.float32), "zy": np.array(0, np.int8)}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 3, 50])],
                              [helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 3, 50])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    constants, q = localize._constants(model.graph), model.graph.node[-1]
    sub, frontier = localize._subgraph(model, q, constants)
    exact_model, feeds = localize._float64_model(sub, q, constants, list(model.opset_import), {"xq": xq},
                                                 {"InstanceNormalization"})
    pre = localize._ort_run(exact_model, "disable", feeds, tmp_path, "exact")["y"]
    x = (xq.astype(np.float64) - 128) * 0.02
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    expected = expected * gamma[:, None] + beta[:, None]
    assert frontier == ["xq"] and np.allclose(pre, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nativeq, onnxruntime, tie", [(80, 81, "80.5"), (-9, -8, "-8.5"), (-1, 0, "-0.5")])
def test_a_tie_is_named_by_the_half_between_the_two_integers(nativeq, onnxruntime, tie):
    """The tie of two neighbouring integers is their midpoint, negative ones too (-9 and -8: -8.5, not -9.5)."""
    from nativeq.verify.localize import Localization

    text = Localization(kind="tie", site="s", node="n", op="MatMul", index=[0], nativeq=nativeq,
                        onnxruntime=onnxruntime, exact=float(tie), rounded=onnxruntime, differing=1,
                        outputs=["y"]).paragraph()
    assert f"within float32 error of {tie}," in " ".join(text.split()), text


# value before rounding (as x / scale + zero point), zero point, the two engines' integers, output type -> a tie?
TIE_TABLE = [
    (125.49997, 128, (125, 126), np.uint8, True),  # 3e-5 from k + 0.5 near the zero point: a float32 conv's sum error
    (125.4991, 128, (125, 126), np.uint8, True),  # under a thousandth of a step: the allowance is 2^-17 x 128 = 0.00098
    (125.4985, 128, (125, 126), np.uint8, False),
    (125.4, 128, (125, 126), np.uint8, False),  # a tenth of a step: an error
    (125.49997, 128, (124, 126), np.uint8, False),  # not the two neighbours of the boundary
    (250.4985, 0, (250, 251), np.uint8, True),  # far from the zero point the allowance grows with the value
    (250.497, 0, (250, 251), np.uint8, False),  # 0.003 > 2^-17 x 250.5 = 0.0019
    (-100.4992, 0, (-101, -100), np.int8, True),
    (30421.4973, 30100, (30421, 30422), np.uint16, True),  # 16 bits: 2^-17 x 32768 = a quarter of a step
    (-1200.3, 0, (-1201, -1200), np.int16, True),
    (-1200.2, 0, (-1201, -1200), np.int16, False),  # 0.3 steps from the boundary
]


@pytest.mark.parametrize("exact, zero_point, engines, dtype, tie", TIE_TABLE)
def test_tie_allowance_table(exact, zero_point, engines, dtype, tie):
    from nativeq.verify.localize import _tie_mask

    a, b = (np.array([v]) for v in engines)
    info = np.iinfo(dtype)
    assert bool(_tie_mask(np.array([exact]), np.array([float(zero_point)]), a, b, info)[0]) is tie


@pytest.mark.parametrize("low, high, row_sum", [(-128, 127, 127 * 64), (-32768, 32767, 127 * 64), (0, 65535, 127 * 300),
                                                (-65535, 65535, 127 * 500)])
def test_integer_pieces_reconstruct_and_keep_each_conv_exact_in_float32(low, high, row_sum):
    """A Conv's integer input split into pieces whose float32 Conv with weights of absolute row sum `row_sum` is
    exact (below 2^24): one piece for 8-bit values, a few digits for 16-bit ones (the localization of A16W8 sites
    evaluates their value before rounding through these)."""
    from nativeq.verify.localize import _exact_pieces

    x = np.random.default_rng(0).integers(low, high + 1, 5000)
    x[:2] = low, high
    pieces = _exact_pieces(x, row_sum)
    assert (len(pieces) == 1) == (max(-low, high) * row_sum < 2 ** 24) and len(pieces) <= 3
    assert all(np.abs(p).max() * row_sum < 2 ** 24 for p, _ in pieces)
    np.testing.assert_array_equal(sum(p.astype(np.int64) * int(w) for p, w in pieces), x)
