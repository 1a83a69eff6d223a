"""A normalization over the whole tensor (GroupNorm with one group, as torch exports it: Reshape, InstanceNormalization,
Reshape) on a symbolic length: its reductions get a schedule that computes each once, its symbolic reshapes are views,
and the result equals ONNX Runtime's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qdq_models
from kernel_rules import schedule_rules

import nativeq
from nativeq.compile import CompileConfig, compile_model


def test_whole_tensor_mean_is_not_recomputed_per_element(tmp_path):
    """The mean and variance reduce [1, 1, C x T] to one value that the normalization broadcasts: dlight's norm
    rule took the broadcast axis for its rows and reduced the whole tensor again for every element (a speech
    separation model: 440 ms per call at C x T = 25,000); the generic rule reduces once."""
    rules = schedule_rules(qdq_models.group_norm_one_group(), tmp_path)
    reductions = {name: rule for name, rule in rules.items() if "mean" in name or "variance" in name}
    assert reductions and set(reductions.values()) == {"generic"}, rules


def test_whole_tensor_sums_accumulate_one_vector_of_partial_sums(tmp_path):
    """Each whole-tensor sum over the symbolic C x T runs as 16 partial sums in a vector (`rfactor`, the last
    vector's guard split off), not one scalar chain of dependent adds (4.9 -> about 1 ms for the separator's 8
    variances at C x T = 256,000)."""
    from nativeq.compile._tvm import TVMTarget, tvm
    from nativeq.compile.api import import_model
    from nativeq.compile.pipeline import compile_passes
    from nativeq.targets import get_target

    model = qdq_models.group_norm_one_group()
    path = tmp_path / "gn.onnx"
    onnx.save(model, path)
    target = get_target("host")
    passes = compile_passes(target)
    stop = [p.info.name for p in passes].index("nativeq.DefaultCpuSchedule")
    with TVMTarget(target.tvm_dict()), tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes[: stop + 1])(import_model(model, path))
    sums = {gv.name_hint: f.script() for gv, f in mod.functions_items()
            if "variance" in gv.name_hint or "mean" in gv.name_hint}
    assert sums, [gv.name_hint for gv, _ in mod.functions_items()]
    for name, text in sums.items():
        assert "_rf" in text and "T.vectorized" in text, (name, text)


def test_group_norm_with_one_group_reshapes_as_views_and_matches_onnxruntime(tmp_path):
    """Its reshapes to [1, 1, C x T] and back are views (no copy kernel, which indexed by divisions by the symbolic
    T), and the output matches ORT's within float32 rounding at two lengths."""
    model = qdq_models.group_norm_one_group(c=16)
    path = tmp_path / "gn.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    kernels = json.loads((tmp_path / "art" / "manifest.json").read_text())["kernels"]
    names = [k["name"] for k in (kernels if isinstance(kernels, list) else kernels.values())]
    assert not any(n.startswith("reshape") for n in names), names
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    loaded = nativeq.load(tmp_path / "art")
    for t in (5, 301):
        x = np.random.default_rng(t).normal(0.5, 2.0, (1, 16, t)).astype(np.float32)
        np.testing.assert_allclose(loaded.run({"x": x})["y"], session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.arm
def test_whole_tensor_sums_add_in_the_same_order_on_the_pi(tmp_path):
    """16 partial sums on every target: the Pi 5 build (4-lane NEON) computes bit for bit what the x86 build does,
    so a normalization followed by a quantize rounds alike on both (with 4 partial sums on NEON and 16 on AVX-512,
    a Conv-TasNet-style separator differed by 4 output steps)."""
    from nativeq.runtime.emulate import run_emulated

    model = qdq_models.group_norm_one_group(c=16)
    path = tmp_path / "gn.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(3).normal(0.5, 2.0, (1, 16, 997)).astype(np.float32)
    outputs = {}
    for target in ("host", "rpi5"):
        compile_model(path, tmp_path / target, CompileConfig(target=target, use_tuning=False))
    outputs["host"] = nativeq.load(tmp_path / "host").run({"x": x})["y"]
    (outputs["rpi5"],) = run_emulated(tmp_path / "rpi5", {"x": x})
    np.testing.assert_array_equal(outputs["rpi5"], outputs["host"])


def test_a_rounded_product_over_a_run_time_length_is_vectorized(tmp_path):
    """InstanceNormalization's scale times the normalized [1, 1, C x T] (a product ORT rounds before the add after
    it) is one FMA with +0 per vector, not a fenced scalar multiply per element (x86 disassembly; on the Pi the
    separator's 8 such kernels went from 16 instructions per element to vector code: 199 -> 146 M per inference)."""
    import re
    import shutil
    import subprocess

    if not shutil.which("objdump"):
        pytest.skip("objdump not installed")
    path = tmp_path / "gn.onnx"
    onnx.save(qdq_models.group_norm_one_group(), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False, debug=True))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "art" / "model.so")],
                          capture_output=True, text=True, check=True).stdout
    bodies = dict(re.findall(r"<__tvm_ffi_(fused_multiply_add\d*)>:\n(.*?)\n\n", text, re.S))
    assert bodies, re.findall(r"<(__tvm_ffi_\w+)>", text)
    for name, body in bodies.items():
        assert re.search(r"\bvfmadd\w*ps\b", body) and not re.search(r"\bvmulss\b", body), (name, body[:3000])


def test_group_norm_between_int8_convs_keeps_the_channels_last_layout(tmp_path):
    """GroupNorm with one group between two QDQ convs: its statistics are over the whole tensor and the ops between
    its reshapes are elementwise, so the flattened channels-last tensor goes through it (no transpose to channels
    first before it and back after it: a Conv-TasNet-style separator on the Pi 4, 200.1 -> 192.5 M instructions),
    and the result is ONNX Runtime's within the verify tolerance."""
    from nativeq.verify import VerifyConfig, verify_artifact

    model = qdq_models.group_norm_one_group(c=16, quantized=True)
    rules = schedule_rules(model, tmp_path)
    assert sum("transpose" in name for name in rules) == 2, rules  # the input's and the output's
    path = tmp_path / "gn_q.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    for t in (29, 400):
        report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": t}, runs=2))
        assert report.passed, report.table()
