"""int8 convs as im2col + the packed int8 matmul (compile/schedules/conv_as_matmul.py).

Numbers: every case compiled for `host` and checked against ONNX Runtime (0 steps). Structure:
after the pipeline's kernel passes, a rewritten conv is an `im2col` + `int8_matmul_packed` pair
and no conv is left; a depthwise conv stays a conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import qdq_models
from onnx import helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.api import import_model
from nativeq.compile.passes.int8 import int8_passes
from nativeq.compile.schedules import kernel_relax_passes
from nativeq.compile._tvm import TVMTarget, relax, tvm
from nativeq.targets import get_target
from nativeq.verify import VerifyConfig, verify_artifact


def _dilated_conv1d() -> onnx.ModelProto:
    model = qdq_models.qdq_conv1d(c_in=16, c_out=32, kernel=3, act_dtype="uint8")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [3]), helper.make_attribute("pads", [2, 2]),
                           helper.make_attribute("dilations", [2])])
    return model


CASES = {
    "conv1d-u8": (lambda: qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=3, act_dtype="uint8"), {"T": 57}),
    "conv1d-s8-stride2-k15": (lambda: qdq_models.qdq_conv1d(c_in=5, c_out=16, kernel=3, stride=2, act_dtype="int8"),
                              {"T": 41}),  # reduction 5*3 = 15: padded to the k-step
    "conv1d-subsampling": (lambda: qdq_models.qdq_conv1d(c_in=80, c_out=144, kernel=3, stride=2, act_dtype="uint8"),
                           {"T": 200}),
    "conv1d-dilated": (_dilated_conv1d, {"T": 33}),
    "conv2d-stride2": (lambda: qdq_models.qdq_conv2d(c_in=8, c_out=16, kernel=3, stride=2, act_dtype="uint8"), {}),
    "conv2d-k27": (lambda: qdq_models.qdq_conv2d(c_in=3, c_out=32, kernel=3, stride=1, h=13, w=9,
                                                 act_dtype="int8"), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_as_matmul_matches_onnxruntime(name, tmp_path):
    builder, dims = CASES[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(builder(), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps == 0 and out.exact_pct == 100.0, report.table()


def _kernel_level(model: onnx.ModelProto, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    target = get_target("host")
    mod = import_model(model, path)
    with TVMTarget(target.tvm_dict()):
        passes = [*int8_passes(target), *kernel_relax_passes(target), relax.transform.LegalizeOps()]
        return tvm.transform.Sequential(passes)(mod)


def _primfunc_names(mod) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if not isinstance(f, relax.Function)]


def test_int8_conv_becomes_im2col_and_packed_matmul(tmp_path):
    names = _primfunc_names(_kernel_level(qdq_models.qdq_conv1d(c_in=32, c_out=48, act_dtype="uint8"), tmp_path))
    assert any(n.startswith("im2col") for n in names), names
    assert any(n.startswith("int8_matmul_packed") for n in names), names
    assert not any("conv1d" in n for n in names), names


def test_depthwise_conv_stays_a_conv(tmp_path):
    model = qdq_models.qdq_conv1d(c_in=32, c_out=32, groups=32, kernel=15, act_dtype="uint8")
    names = _primfunc_names(_kernel_level(model, tmp_path))
    assert any("conv1d" in n for n in names), names
    assert not any(n.startswith("im2col") for n in names), names
