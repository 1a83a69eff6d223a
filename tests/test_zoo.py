"""The public-architecture zoo (`benchmarks/zoo`) through the user path: compile for x86 and for the
Raspberry Pi 5, verify each against ONNX Runtime (the rpi5 build under qemu), no contraction kernel
(matmul, conv, depthwise) left on the generic schedule, and every contraction kernel named by the ONNX
contraction nodes it computes (and every such node by a kernel), and on x86 no dot-product kernel whose
register tile stays in memory.

Default suite: every architecture as ORT's `quantize_static` makes it (QDQ, per-channel, u8
activations), verified at 64 frames (on the Pi 5 all but `RPI5_SLOW`), and the Conformer as `quantize_dynamic` makes
it. The other quantizers (per-tensor, s8 activations, dynamic,
QOperator, nativeq's QAT export, and the `quantize_static` options: int4 weights, 16-bit activations, float
weights behind Q/DQ pairs) are marked slow. Speed lives in `python -m benchmarks.zoo`, not here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import zoo  # noqa: E402
from nativeq.compile import CompileConfig, compile_model  # noqa: E402
from nativeq.compile.kernels import GENERIC_PATH  # noqa: E402
from nativeq.verify import VerifyConfig, verify_artifact  # noqa: E402

FRAMES = 64
DEFAULT_QUANTIZER = "qdq_u8_pc"
# Also in the default suite: `quantize_dynamic` leaves the Conformer's convs (1x1, depthwise) and attention in
# float, which must run the float kernels, not the generic schedule.
DEFAULT_ALSO = {("conformer", "dynamic")}
# ORT's dynamic LSTM quantization emits a com.microsoft contrib op (DynamicQuantizeLSTM) that TVM cannot import:
# compile refuses it in one line, tested below.
REFUSED = {("lstm_am", "dynamic"): "com.microsoft.DynamicQuantizeLSTM"}
# Slow on the Pi 5 only (60-80 s each under qemu): the shipped model (its QAT export runs on rpi5 in the demo test)
# and the relative-position Conformer (the Conformer's kernels plus a position table, compiled for x86 by default).
RPI5_SLOW = {"shipped_conformer", "relpos_conformer"}


def _params(target: str = "host"):
    params = []
    for name, quantizer in zoo.entries() + zoo.entries(quantizers=zoo.OPTION_QUANTIZERS):
        if (name, quantizer) in REFUSED:
            continue
        default = quantizer == DEFAULT_QUANTIZER or (name, quantizer) in DEFAULT_ALSO
        marks = [] if default and not (target == "rpi5" and name in RPI5_SLOW) else [pytest.mark.slow]
        params.append(pytest.param(name, quantizer, id=f"{name}-{quantizer}", marks=marks))
    return params


def _check_verify(report) -> None:
    """Pass, where an output beyond tolerance must come from rounding ties only (`verify --accept-ties`): e.g.
    wav2vec2's first conv has a value within float32 error of k + 0.5 that the engines round apart, and the
    GroupNorm after it spreads that step over its channel (2 steps at the output, 92% exact at 64 frames)."""
    assert report.passed, report.table()


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-models")


def _generic_contractions(manifest: dict) -> list[str]:
    return [k["name"] for k in manifest["kernels"] if k["kind"] == "contraction" and k["schedule"] in GENERIC_PATH]


# ONNX ops that multiply-accumulate: each is computed by a contraction kernel that names it
_CONTRACTION_OPS = {"MatMul", "Gemm", "QGemm", "Conv", "ConvTranspose", "QLinearMatMul", "QLinearConv", "MatMulInteger",
                    "ConvInteger", "LSTM", "GRU", "RNN", "Einsum"}


def _unnamed_contractions(manifest: dict, model_path) -> list[str]:
    """Contraction kernels that name no contraction ONNX node, and contraction nodes of the graph no kernel names."""
    import onnx

    kernels = [k for k in manifest["kernels"] if k["kind"] == "contraction"]
    problems = [f"kernel {k['name']} names {[n['name'] for n in k['onnx_nodes']][:4]}" for k in kernels
                if not any(n["op"] in _CONTRACTION_OPS for n in k["onnx_nodes"])]
    named = {n["name"] for k in manifest["kernels"] for n in k["onnx_nodes"]}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    problems += [f"node {node.name} ({node.op_type}) in no kernel" for node in graph.node
                 if node.op_type in _CONTRACTION_OPS and node.name not in named]
    return problems


_X86_DOT = re.compile(r"\t(vpdpbusd|vpdpwssd|vfmadd\w*ps) ")
# a vector store to a stack slot at a run-time index: `vmovups %zmm1,0xf0(%rsp,%rax,4)` (a register tile's row is
# a whole ymm / zmm vector; scalar `vmovss %xmm2` stores are a guarded tail's element copies, not a tile)
_X86_STACK_INDEXED_STORE = re.compile(r"\tvmov\w+ +%[yz]mm\d+,(-?0x[0-9a-f]+)?\(%rsp,%r\w+")


def _tiles_in_memory(library: Path) -> list[str]:
    """x86 kernels whose dot products keep their accumulators in memory: about one stack store at a run-time index
    per dot instruction, where LLVM could not promote the register tile (an index it cannot prove constant)."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for function in re.split(r"\n(?=[0-9a-f]+ <)", asm):
        dots = len(_X86_DOT.findall(function))
        if dots >= 4 and len(_X86_STACK_INDEXED_STORE.findall(function)) >= dots // 2:
            found.append(function.split("<", 1)[1].split(">", 1)[0])
    return found


@pytest.mark.parametrize("name, quantizer", _params())
def test_zoo_model_compiles_verifies_and_has_no_contraction_on_the_generic_path(name, quantizer, zoo_cache, tmp_path):
    model = zoo.build(name, quantizer, zoo_cache)
    dims = zoo.get_model(name).dims(FRAMES)
    result = compile_model(model, tmp_path / "host", CompileConfig(target="host", use_tuning=False))
    assert _generic_contractions(result.manifest) == [], result.explain_table()
    assert _unnamed_contractions(result.manifest, model) == []
    if shutil.which("objdump"):
        assert _tiles_in_memory(tmp_path / "host" / "model.so") == []
    _check_verify(verify_artifact(tmp_path / "host", model, VerifyConfig(runs=1, dims=dims, accept_ties=True)))


@pytest.mark.arm
@pytest.mark.parametrize("name, quantizer", _params("rpi5"))
def test_zoo_model_verifies_on_rpi5_under_qemu(name, quantizer, zoo_cache, tmp_path):
    model = zoo.build(name, quantizer, zoo_cache)
    dims = zoo.get_model(name).dims(FRAMES)
    result = compile_model(model, tmp_path / "rpi5", CompileConfig(target="rpi5", use_tuning=False))
    assert _generic_contractions(result.manifest) == []
    assert _unnamed_contractions(result.manifest, model) == []
    _check_verify(verify_artifact(tmp_path / "rpi5", model, VerifyConfig(runs=1, dims=dims, accept_ties=True)))


@pytest.mark.slow
@pytest.mark.parametrize("name, quantizer", list(REFUSED))
def test_zoo_entries_the_importer_cannot_take_are_refused_in_one_line(name, quantizer, zoo_cache, tmp_path):
    from nativeq.errors import NativeqError

    model = zoo.build(name, quantizer, zoo_cache)
    with pytest.raises(NativeqError, match=REFUSED[(name, quantizer)]) as error:
        compile_model(model, tmp_path / "out", CompileConfig(target="host"))
    assert "\n" not in str(error.value)


# Exported with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, torch's default): other shape
# arithmetic (Shape -> Squeeze -> Add -> Div -> Reshape), other op spellings. The Whisper-style encoder (which
# did not import) in the default suite, the rest slow.
DYNAMO_DEFAULT = {"whisper_encoder"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DYNAMO_DEFAULT else [pytest.mark.slow])
                                  for n, spec in zoo.ZOO.items() if spec.builder is not None])
def test_zoo_model_exported_by_dynamo_compiles_and_verifies(name, tmp_path):
    import numpy as np
    import onnx
    import torch

    from benchmarks.zoo import models
    from benchmarks.zoo.quantize import quantize_model
    from benchmarks.zoo.registry import SEED

    spec = zoo.get_model(name)
    module = models.seeded(models.BUILDERS[spec.builder], SEED)
    example = torch.from_numpy(spec.random_input(100, np.random.default_rng(SEED)))
    symbolic = {axis: dim for axis, dim in enumerate(spec.input_shape) if isinstance(dim, str)}
    float_path = tmp_path / "float.onnx"
    float_path.write_bytes(models.export_dynamo_onnx(module, example, spec.input_name, symbolic))
    model = tmp_path / "qdq.onnx"
    onnx.save(quantize_model(DEFAULT_QUANTIZER, float_path, zoo.calibration_feeds(name)), model)
    result = compile_model(model, tmp_path / "host", CompileConfig(target="host", use_tuning=False))
    assert _generic_contractions(result.manifest) == [], result.explain_table()
    exported = {d.dim_param for d in onnx.load(model).graph.input[0].type.tensor_type.shape.dim if d.dim_param}
    dims = {new: size for (old, size), new in zip(spec.dims(FRAMES).items(), sorted(exported))}
    _check_verify(verify_artifact(tmp_path / "host", model, VerifyConfig(runs=1, dims=dims, accept_ties=True)))


def test_quantizer_options_are_entries_only_when_asked_for():
    """`python -m benchmarks.zoo` without --quantizers runs the matrix users quantize to by default; the
    `quantize_static` options (int4, A16W8, weight Q/DQ pairs) are there for every model with static entries when
    named, and refused by name for a model without them."""
    default = zoo.entries()
    assert not {q for _, q in default} & set(zoo.OPTION_QUANTIZERS)
    asked = zoo.entries(quantizers=("qdq_int4",))
    assert {name for name, _ in asked} == {name for name, q in default if q in zoo.ORT_STATIC}
    zoo.check_entry("conformer", "qdq_a16w8")
