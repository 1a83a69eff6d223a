"""LutElementwise: elementwise chains of 8-bit tensors become 256-entry table lookups, bit-exactly."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qdq_models
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.api import import_model
from nativeq.compile.passes import int8 as int8_passes
from nativeq.compile.passes.int8 import lowering_passes
from nativeq.compile.passes.lut_elementwise import LUT_BLOCK, worth_a_table
from nativeq.runtime import load
from nativeq.targets import get_target


@pytest.mark.parametrize("ops, worth", [
    (["relax.dequantize"], False),
    (["relax.dequantize", "relax.nn.relu", "relax.quantize", "relax.dequantize"], False),
    (["relax.dequantize", "relax.multiply", "relax.quantize", "relax.dequantize", "relax.quantize"], False),
    (["relax.dequantize", "relax.quantize", "relax.divide", "relax.quantize"], True),
    (["relax.dequantize", "relax.tanh"], True),
    (["relax.dequantize", "relax.sigmoid", "relax.quantize"], True),
    (["relax.dequantize", "relax.erf"], True),
])
def test_worth_a_table(ops, worth):
    assert worth_a_table(ops) is worth


def _lowered(model):
    mod = import_model(model, "model.onnx")
    return tvm.transform.Sequential(lowering_passes("uint8"))(mod)


def _ops_in_main(mod) -> set[str]:
    names = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


def _lut_calls(mod) -> int:
    return sum(1 for gv, _ in mod.functions_items() if gv.name_hint.startswith(LUT_BLOCK))


@pytest.mark.parametrize("act, tables, gone", [
    ("gelu", 1, {"relax.erf", "relax.divide", "relax.add"}),  # the add of a quantized constant 1 too
    ("silu", 1, {"relax.sigmoid"}),
    ("tanh", 1, {"relax.tanh"}),
    ("silu_channel_scale", 1, {"relax.sigmoid"}),
    ("relu", 0, set()),
])
def test_chains_worth_a_table_become_one_lookup(act, tables, gone):
    mod = _lowered(qdq_models.qdq_activation_chain(act))
    assert _lut_calls(mod) == tables
    # the chain's ops now only run on the 256-entry constant (folded later), never on the activation
    main = mod["main"]
    for var, value in relax.analysis.get_var2val(main).items():
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in gone:
            assert [int(d) for d in value.ty.shape] == [256], f"{value.op.name} still runs on {value.ty.shape}"
    if act == "silu_channel_scale":  # the per-channel Mul is not a scalar operand: it stays outside the table
        assert "relax.multiply" in _ops_in_main(mod)


def _compile(model, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / name, CompileConfig(target="host", use_tuning=False))
    return path, load(tmp_path / name)


@pytest.fixture
def without_tables(monkeypatch):
    """Compile with LutElementwise replaced by a no-op pass (the chain computed per element)."""
    identity = tvm.transform.module_pass(lambda mod, _ctx: mod, opt_level=0, name="NoLut")
    monkeypatch.setattr(int8_passes, "LutElementwise", lambda: identity)


@pytest.mark.parametrize("act", ["gelu", "silu", "tanh"])
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_table_lookup_is_bit_identical_to_the_chain_and_to_onnxruntime(act, act_dtype, tmp_path, request):
    model = qdq_models.qdq_activation_chain(act, act_dtype=act_dtype)
    path, with_table = _compile(model, tmp_path, "lut")
    request.getfixturevalue("without_tables")
    _, per_element = _compile(model, tmp_path, "chain")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for t in (1, 7, 64):
        # inputs spanning the quantizer's whole range, so all 256 table entries are read
        x = rng.uniform(-8, 8, (1, t, 32)).astype(np.float32)
        a, b = with_table.run({"x": x})["y"], per_element.run({"x": x})["y"]
        ref = session.run(None, {"x": x})[0]
        assert np.array_equal(a, b), f"{act} {act_dtype} T={t}: table differs from the per-element chain"
        assert np.array_equal(a, ref), f"{act} {act_dtype} T={t}: max |diff| vs ORT {np.abs(a - ref).max()}"


@pytest.mark.parametrize("x, scale, zero_point, dtype, expected", [
    (0.5, 1.0, 0, "int8", 0),        # ties round to even
    (1.5, 1.0, 0, "int8", 2),
    (-2.5, 1.0, 0, "int8", -2),
    (1.0, 1 / 255, 0, "uint8", 255),
    (300.0, 1.0, 0, "uint8", 255),   # saturates
    (-300.0, 1.0, 0, "int8", -128),
    (0.3, 0.1, 10, "int8", 13),
])
def test_static_value_quantizes_constants_like_onnxruntime(x, scale, zero_point, dtype, expected):
    from nativeq.compile.passes.qdq_sites import static_value

    np_dtype = np.dtype(dtype)
    call = relax.op.quantize(relax.const(np.float32(x)), relax.const(np.float32(scale)),
                             relax.const(np.array(zero_point, np_dtype)), axis=-1, out_dtype=dtype)
    call = relax.BlockBuilder().normalize(call)
    value = static_value(call, {})
    node = onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = onnx.helper.make_graph([node], "q", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.helper.np_dtype_to_tensor_dtype(np_dtype), [])],
                                   [onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
                                    onnx.numpy_helper.from_array(np.array(zero_point, np_dtype), "z")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.array(x, np.float32)})[0]
    assert value.dtype == np_dtype and int(value) == int(ref) == expected


def _tanh_output_model(act_dtype: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> Mul(rank-3 constant) -> Tanh -> y: the table's exit is the graph output itself,
    and its scalar operand has the activation's rank (so the table is built as [1, 1, 256])."""
    from onnx import TensorProto, helper, numpy_helper

    npdt = np.uint8 if act_dtype == "uint8" else np.int8
    zp = 128 if act_dtype == "uint8" else 0
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(zp, npdt), "z"),
             numpy_helper.from_array(np.full((1, 1, 1), 0.7, np.float32), "k")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Mul", ["xd", "k"], ["xm"]),
             helper.make_node("Tanh", ["xm"], ["y"])]
    graph = helper.make_graph(nodes, "tanh_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_table_as_the_graph_output_with_a_rank_3_constant(act_dtype, tmp_path):
    model = _tanh_output_model(act_dtype)
    assert _lut_calls(_lowered(model)) == 1
    path, compiled = _compile(model, tmp_path, "tanh")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-8, 8, (1, 50, 24)).astype(np.float32)
    out, ref = compiled.run({"x": x})["y"], session.run(None, {"x": x})[0]
    # the float tanh of TVM and of ORT may differ in the last bits; the table holds TVM's own values
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("second_matmul", [False, True], ids=["float table", "8-bit table"])
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_lookups_after_an_avx512_matmul_are_gathers(act_dtype, second_matmul, tmp_path, request):
    """On AVX-512 a 16-lane table lookup in a matmul's epilogue is one gather (passes/gather_table_lookups.py), not
    16 extract / load / insert triples: `vgatherdps` from a float table (the graph returns the activation),
    `vpgatherdd` reading 4 bytes per entry from an 8-bit one (the activation feeds another matmul). Same results as
    the per-element chain (and, for the float table, the exactness test above)."""
    import re
    import subprocess

    model = qdq_models.qdq_activation_chain("gelu", act_dtype=act_dtype, second_matmul=second_matmul)
    path = tmp_path / "gelu.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="x86-avx512-vnni", use_tuning=False, debug=True))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "art" / "model.so")],
                          capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bvpgatherdd\b" if second_matmul else r"\bvgatherdps\b", text) and "vpextrd" not in text
    if get_target("host").int8 != "avx512-vnni":
        return
    _, with_gathers = _compile(model, tmp_path, "lut")
    request.getfixturevalue("without_tables")
    _, per_element = _compile(model, tmp_path, "chain")
    rng = np.random.default_rng(4)
    for t in (1, 7, 64):
        x = rng.uniform(-8, 8, (1, t, 32)).astype(np.float32)  # the quantizer's whole range: every entry read
        np.testing.assert_array_equal(with_gathers.run({"x": x})["y"], per_element.run({"x": x})["y"])
