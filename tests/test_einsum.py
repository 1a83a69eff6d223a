"""Two-operand ONNX Einsum imported as a batched matmul (compile/einsum.py), compared with ONNX Runtime."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import relax, tvm
from nativeq.compile.einsum import parse_equation
from nativeq.compile.onnx_import import import_onnx
from nativeq.runtime import load
from nativeq.verify import VerifyConfig, verify_artifact

# equation, operand ranks -> letters of A, B, output (None: left to TVM's converter)
PARSE_TABLE = [
    ("bhid,bhjd->bhij", (4, 4), ("bhid", "bhjd", "bhij")),
    ("ij,jk", (2, 2), ("ij", "jk", "ik")),  # implicit: letters used once, alphabetical
    ("ba,ac", (2, 2), ("ba", "ac", "bc")),
    ("...id,...jd->...ij", (4, 3), ("ABid", "Bjd", "ABij")),  # ellipsis right-aligned across operands
    ("...d,d", (3, 1), ("ABd", "d", "AB")),
    ("b i d , b j d -> b i j", (3, 3), ("bid", "bjd", "bij")),
    ("Aid,Ajd->Aij", (3, 3), ("Aid", "Ajd", "Aij")),
    ("ii,ij->j", (2, 2), None),  # a diagonal
    ("bij,bjk->bik", (2, 3), None),  # rank mismatch
    ("ij,jk->ikk", (2, 2), None),  # repeated output letter
    ("ij,jk->iz", (2, 2), None),  # output letter in no operand
]


@pytest.mark.parametrize("equation, ranks, expected", PARSE_TABLE, ids=[c[0] for c in PARSE_TABLE])
def test_parse_equation(equation, ranks, expected):
    parsed = parse_equation(equation, ranks)
    assert parsed == (None if expected is None else tuple(list(term) for term in expected))


# equation, shape of A, shape of B ("T" symbolic)
CASES = [
    ("bhid,bhjd->bhij", (1, 4, "T", 16), (1, 4, "T", 16)),  # attention scores
    ("bhij,bhjd->bihd", (1, 4, "T", "T"), (1, 4, "T", 16)),  # attention output, heads back into place
    ("bthd,bshd->bhts", (1, "T", 3, 8), (1, "T", 3, 8)),  # time-major heads
    ("btd,dk->btk", (1, "T", 12), (12, 20)),  # a projection
    ("bhtd,lhd->bhtl", (1, 2, "T", 8), (5, 2, 8)),  # relative positions: a free letter in the batch place
    ("btcd,cde->bte", (1, "T", 3, 4), (3, 4, 6)),  # two contracted letters merged
    ("bti,bj->btij", (2, "T", 3), (2, 5)),  # an outer product (no contracted letter)
    ("btd,btd->bt", (1, "T", 9), (1, "T", 9)),  # row dot products (M = N = 1)
    ("bti,bsj->bij", (1, "T", 3), (1, 7, 4)),  # letters summed before the product
    ("...id,...jd->...ij", (2, 3, "T", 5), (2, 3, 6, 5)),  # ellipsis
    ("...id,...jd->...ij", (2, 3, "T", 5), (1, 3, 6, 5)),  # a batch axis of size 1 broadcast
    ("bhid,bhjd->bhij", (2, 1, "T", 4), (2, 3, 7, 4)),  # the other way round, a reshape-free broadcast
    ("ij,jk", (4, "T"), ("T", 6)),  # implicit output
]


def _einsum_model(cases):
    """One graph holding every case: Einsum node i reads a<i>, b<i> and writes y<i>."""
    nodes, inputs, outputs = [], [], []
    for i, (equation, shape_a, shape_b) in enumerate(cases):
        inputs += [helper.make_tensor_value_info(f"a{i}", TensorProto.FLOAT, list(shape_a)),
                   helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, list(shape_b))]
        nodes.append(helper.make_node("Einsum", [f"a{i}", f"b{i}"], [f"y{i}"], equation=equation))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "einsums", inputs, outputs)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                             strict_mode=True)


def _call_tir_names(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        mod["main"].body, lambda e: names.append(e.args[0].name_hint)
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return names


def _ops(mod) -> list[str]:
    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(e.op.name)
                                    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return found


def test_contractions_import_as_matmuls_and_others_keep_tvms_kernel():
    mod = import_onnx(_einsum_model(CASES + [("bii,bi->bi", (2, 3, 3), (2, 3))]))
    ops = _ops(mod)
    assert ops.count("relax.matmul") == len(CASES), ops
    # only the diagonal (a letter repeated within a term) keeps TVM's opaque einsum kernel
    assert [n for n in _call_tir_names(mod) if "einsum" in n] == ["einsum"]


def test_einsums_match_onnxruntime(tmp_path):
    model = _einsum_model(CASES)
    path = tmp_path / "einsums.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    generic = [k["name"] for k in result.kernels if k["kind"] == "contraction" and k["schedule"] == "generic"]
    assert not generic, generic
    compiled = load(tmp_path / "art")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for t in (1, 7, 33):
        feeds = {}
        for i, (_, shape_a, shape_b) in enumerate(CASES):
            for name, shape in ((f"a{i}", shape_a), (f"b{i}", shape_b)):
                feeds[name] = rng.standard_normal([t if d == "T" else d for d in shape]).astype(np.float32)
        got, expected = compiled.run(feeds), session.run(None, feeds)
        for i, want in enumerate(expected):
            assert got[f"y{i}"].shape == want.shape, (CASES[i][0], t)
            np.testing.assert_allclose(got[f"y{i}"], want, rtol=2e-5, atol=2e-5, err_msg=f"{CASES[i][0]} T={t}")


def _qdq_einsum_attention(tmp_path):
    """A float attention block written with torch.einsum, exported (TorchScript: Einsum nodes) and quantized
    by ONNX Runtime's quantize_static (which leaves Einsum in float, between QDQ pairs)."""
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Attention(torch.nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
            scores = torch.einsum("bthd,bshd->bhts", q, k) * (d // self.heads) ** -0.5
            return x + self.out(torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, d))

    torch.manual_seed(0)
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
        torch.onnx.export(Attention().eval(), (torch.randn(1, 20, 32),), str(float_path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "T"}}, opset_version=17)
    assert sum(n.op_type == "Einsum" for n in onnx.load(float_path).graph.node) == 2

    class Feeds(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.feeds = iter([{"x": rng.standard_normal((1, 20, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(float_path), str(qdq_path), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq_path


@pytest.mark.parametrize("target", ["host", pytest.param("rpi5", marks=pytest.mark.arm)])
def test_quantized_einsum_attention_verifies_with_no_generic_contraction(target, tmp_path):
    path = _qdq_einsum_attention(tmp_path)
    result = compile_model(path, tmp_path / target, CompileConfig(target=target, use_tuning=False))
    contractions = [k for k in result.kernels if k["kind"] == "contraction"]
    assert len(contractions) >= 4 and not [k["name"] for k in contractions if k["schedule"] == "generic"]
    report = verify_artifact(tmp_path / target, path, VerifyConfig(runs=1, dims={"T": 45}))
    assert report.passed, report
