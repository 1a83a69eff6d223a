"""Raspberry Pi targets, proven without a Pi: artifacts cross-compiled for rpi4/rpi5 run under
qemu-aarch64 (emulating the device's CPU model) through the aarch64 C++ runner and must match
ONNX Runtime on this x86 host within one quantization step.

Needs the cross toolchain, qemu-user and `nativeq setup-arm` (all part of `make setup`).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq_models
from disassembly import aarch64_disassembly
from nativeq.compile import CompileConfig, compile_model
from nativeq.errors import NativeqError
from nativeq.runtime import emulate
from nativeq.runtime.emulate import run_emulated
from nativeq.runtime.manifest import seal_manifest
from nativeq.verify import VerifyConfig, verify_artifact
from nativeq.verify.api import ort_session

pytestmark = pytest.mark.arm

MODELS = {
    "matmul": (qdq_models.qdq_matmul, lambda t: (1, t, 64)),
    "conv1d": (qdq_models.qdq_conv1d, lambda t: (1, 32, t)),
    # Static shapes let LLVM vectorize the int8 dot products: with +dotprod (rpi5) it emits sdot.
    "matmul_static": (lambda: qdq_models.qdq_matmul(t=32), lambda t: (1, 32, 64)),
}
OUT_SCALE = 0.1  # the output QuantizeLinear scale of both builders


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{(model, target): (artifact dir, onnx path)} compiled once for the module."""
    root = tmp_path_factory.mktemp("arm")
    out = {}
    for name, (builder, _) in MODELS.items():
        onnx_path = root / f"{name}.onnx"
        onnx.save(builder(), onnx_path)
        for target in ("rpi4", "rpi5"):
            artifact = root / f"{name}_{target}"
            compile_model(onnx_path, artifact, CompileConfig(target=target))
            out[name, target] = (artifact, onnx_path)
    return out


def _ort(onnx_path, inputs):
    return ort_session(onnx_path, "disable").run(None, inputs)


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
@pytest.mark.parametrize("model", list(MODELS))
def test_emulated_artifact_matches_onnxruntime(built, model, target):
    artifact, onnx_path = built[model, target]
    shape = MODELS[model][1](37)
    x = np.random.default_rng(1).normal(0, 1.5, shape).astype(np.float32)
    (got,) = run_emulated(artifact, {"x": x})
    (ref,) = _ort(onnx_path, {"x": x})
    assert got.shape == ref.shape and got.dtype == np.float32
    steps = np.abs(got - ref) / OUT_SCALE
    assert steps.max() <= 1.0 + 1e-4, f"max {steps.max():.3f} steps"
    assert (steps < 1e-3).mean() >= 0.99
    assert np.abs(ref).max() > 10 * OUT_SCALE  # the comparison is not between two all-zero tensors


@pytest.mark.parametrize("t", [1, 200])
def test_symbolic_time_axis_under_emulation(built, t):
    artifact, onnx_path = built["conv1d", "rpi4"]
    x = np.random.default_rng(t).normal(0, 1.5, (1, 32, t)).astype(np.float32)
    (got,) = run_emulated(artifact, {"x": x})
    (ref,) = _ort(onnx_path, {"x": x})
    assert got.shape == (1, 48, t)
    assert np.abs(got - ref).max() <= OUT_SCALE * (1 + 1e-4)


def test_verify_runs_rpi5_artifact_emulated(built):
    artifact, onnx_path = built["matmul", "rpi5"]
    report = verify_artifact(artifact, onnx_path, VerifyConfig(runs=2, dims={"T": 50}))
    assert report.execution.startswith("emulated") and "cortex-a76" in report.execution
    assert report.passed, report.table()
    (out,) = report.outputs
    assert out.max_steps is not None and out.max_steps <= 1.0


def test_verify_cli_on_rpi4_artifact(built, nativeq_cli):
    artifact, onnx_path = built["conv1d", "rpi4"]
    proc = nativeq_cli("verify", artifact, "--onnx", onnx_path, "--dim", "T=64")
    assert proc.returncode == 0, proc.stderr
    assert "emulated, qemu -cpu cortex-a72" in proc.stdout and "PASS" in proc.stdout


def _count(objdump_text: str, mnemonics: tuple[str, ...]) -> int:
    count = 0
    for line in objdump_text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2].strip().split(" ")[0] in mnemonics:
            count += 1
    return count


def test_rpi4_libraries_never_contain_sdot(built):
    """`sdot` is an illegal instruction on the Pi 4's Cortex-A72; the rpi5 count is reported, not asserted."""
    for model in MODELS:
        rpi4 = aarch64_disassembly(built[model, "rpi4"][0])
        rpi5 = aarch64_disassembly(built[model, "rpi5"][0])
        assert _count(rpi4, ("fmla", "fmul", "fadd", "ldr", "str", "ret")) > 0  # the parser sees instructions
        assert _count(rpi4, ("sdot", "udot", "usdot")) == 0
        widening = ("smull", "smull2", "smlal", "smlal2", "sadalp", "saddlp")
        print(f"{model}: rpi4 NEON widening int8 ops {_count(rpi4, widening)}, rpi5 sdot {_count(rpi5, ('sdot',))}")


def test_rpi5_artifact_on_cortex_a72_is_refused_not_sigill(built):
    artifact, _ = built["matmul_static", "rpi5"]
    x = np.zeros((1, 32, 64), np.float32)
    with pytest.raises(NativeqError, match=r"cortex-a72: this CPU lacks dotprod \(asimddp\)"):
        run_emulated(artifact, {"x": x}, cpu="cortex-a72")
    (y,) = run_emulated(artifact, {"x": x}, cpu="max")  # a CPU with dotprod runs it
    assert y.shape == (1, 32, 48)


def test_without_the_feature_check_sdot_code_dies_with_sigill(built, tmp_path):
    """What the runner's HWCAP check prevents: rpi5 code with `sdot` on a cortex-a72 is an illegal instruction."""
    artifact, _ = built["matmul_static", "rpi5"]
    if _count(aarch64_disassembly(artifact), ("sdot",)) == 0:
        pytest.skip("the rpi5 library has no sdot yet (no ARM int8 dot-product kernels in the pipeline)")
    unchecked = tmp_path / "unchecked"
    shutil.copytree(artifact, unchecked)
    manifest = json.loads((unchecked / "manifest.json").read_text())
    manifest["target"]["cpu_features"] = ["asimd"]  # lie: claim the code needs no dotprod
    (unchecked / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(NativeqError, match="died with SIGILL"):
        run_emulated(unchecked, {"x": np.ones((1, 32, 64), np.float32)}, cpu="cortex-a72")


def _two_output_uint8_model() -> onnx.ModelProto:
    """uint8 input -> DQ -> MatMul(DQ(W)) -> Q (uint8 output `yq`) and -> Relu -> Q/DQ (float output `r`)."""
    rng = np.random.default_rng(3)
    wq = rng.integers(-127, 128, (16, 8), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"), numpy_helper.from_array(np.array(120, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("QuantizeLinear", ["mm", "ys", "yz"], ["yq"]),
        helper.make_node("Relu", ["mm"], ["relu"]),
        helper.make_node("QuantizeLinear", ["relu", "ys", "yz"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "ys", "yz"], ["r"]),
    ]
    graph = helper.make_graph(
        nodes, "two_outputs", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, "T", 16])],
        [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, "T", 8]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, "T", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_tuple_outputs_and_integer_dtypes_round_trip(tmp_path):
    """Integer .npy inputs/outputs and a tuple result go through the runner intact (generic aarch64 target)."""
    onnx_path = tmp_path / "two.onnx"
    onnx.save(_two_output_uint8_model(), onnx_path)
    artifact = tmp_path / "two_aarch64"
    compile_model(onnx_path, artifact, CompileConfig(target="aarch64"))
    xq = np.random.default_rng(4).integers(0, 256, (1, 9, 16), dtype=np.uint8)
    got = run_emulated(artifact, {"xq": xq})
    ref = _ort(onnx_path, {"xq": xq})
    assert [g.dtype for g in got] == [np.uint8, np.float32]
    assert [g.shape for g in got] == [(1, 9, 8), (1, 9, 8)]
    assert np.abs(got[0].astype(np.int32) - ref[0].astype(np.int32)).max() <= 1
    assert np.abs(got[1] - ref[1]).max() <= 0.05 * (1 + 1e-4)
    assert len(np.unique(ref[0])) > 10


def test_missing_qemu_names_the_apt_package(built, monkeypatch):
    which = shutil.which
    monkeypatch.setattr(emulate.shutil, "which", lambda tool: None if tool == "qemu-aarch64" else which(tool))
    with pytest.raises(NativeqError, match=r"qemu-aarch64 not found: install it with `sudo apt-get install qemu-user`"):
        run_emulated(built["matmul", "rpi4"][0], {"x": np.zeros((1, 2, 64), np.float32)})


def test_missing_aarch64_runtime_says_setup_arm(built, monkeypatch, tmp_path):
    monkeypatch.setenv("NATIVEQ_ARM_RUNTIME", str(tmp_path / "nothing"))
    with pytest.raises(NativeqError, match=r"aarch64 TVM runtime is not installed .* run `nativeq setup-arm`"):
        run_emulated(built["matmul", "rpi4"][0], {"x": np.zeros((1, 2, 64), np.float32)})


def test_host_artifact_is_not_emulated(tmp_path):
    onnx_path = tmp_path / "mm.onnx"
    onnx.save(qdq_models.qdq_matmul(k=8, n=4), onnx_path)
    compile_model(onnx_path, tmp_path / "host", CompileConfig(target="x86-avx2"))
    with pytest.raises(NativeqError, match="is for x86_64 .* emulation runs aarch64 only"):
        run_emulated(tmp_path / "host", {"x": np.zeros((1, 2, 8), np.float32)})


def test_runner_is_rebuilt_when_its_source_changes(monkeypatch, tmp_path):
    cache = emulate.arm_runtime_dir()
    current = emulate.build_runner()  # the shared cache holds the runner of the current source
    private = tmp_path / "aarch64"
    (private / "bin").mkdir(parents=True)
    for name in ("lib", "include", "versions.json"):
        (private / name).symlink_to(cache / name)
    for path in (current, current.with_suffix(".sha256")):
        shutil.copy2(path, private / "bin" / path.name)
    source = tmp_path / "nativeq_runner.cc"
    source.write_text(emulate.RUNNER_SOURCE.read_text())
    monkeypatch.setenv("NATIVEQ_ARM_RUNTIME", str(private))
    monkeypatch.setattr(emulate, "RUNNER_SOURCE", source)

    seeded = (private / "bin" / current.name).stat().st_mtime_ns
    binary = emulate.build_runner()
    stamp = binary.with_suffix(".sha256").read_text()
    assert binary.stat().st_mtime_ns == seeded  # same source, same runtime: cached, not rebuilt
    source.write_text(source.read_text() + "\n// changed\n")
    emulate.build_runner()
    assert binary.with_suffix(".sha256").read_text() != stamp
    assert binary.read_bytes()[:4] == b"\x7fELF" and binary.read_bytes()[18] == 183  # e_machine EM_AARCH64


def test_instruction_count_per_inference_scales_with_the_work(built):
    """The qemu plugin's per-inference count is deterministic and grows with the sequence length."""
    artifact, _ = built["matmul", "rpi4"]
    rng = np.random.default_rng(7)
    short = emulate.count_instructions(artifact, {"x": rng.normal(0, 1, (1, 32, 64)).astype(np.float32)}, repeat=2)
    long = emulate.count_instructions(artifact, {"x": rng.normal(0, 1, (1, 128, 64)).astype(np.float32)}, repeat=2)
    again = emulate.count_instructions(artifact, {"x": rng.normal(0, 1, (1, 32, 64)).astype(np.float32)}, repeat=2)
    print(short.summary(), long.summary(), sep="\n")
    assert short.cpu == "cortex-a72" and short.per_inference > 10_000
    assert abs(again.per_inference - short.per_inference) <= 0.01 * short.per_inference
    assert 2.5 <= long.per_inference / short.per_inference <= 4.5  # 4x the rows of a matmul, plus fixed VM overhead
    assert short.startup > short.per_inference  # loading the library and the VM dominate one short run


def test_bench_emulated_cli_compares_int8_and_float_builds(built, nativeq_cli, tmp_path):
    _, onnx_path = built["matmul", "rpi4"]
    float_build = tmp_path / "matmul_rpi4_float"
    compile_model(onnx_path, float_build, CompileConfig(target="rpi4", int8=False))
    proc = nativeq_cli("bench-emulated", built["matmul", "rpi4"][0], built["matmul", "rpi5"][0], float_build,
                       "--dim", "T=64", "--repeat", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["artifact"]: r for r in json.loads(proc.stdout)["rows"]}
    int8_rpi4 = rows[str(built["matmul", "rpi4"][0])]
    assert int8_rpi4["int8"] and not rows[str(float_build)]["int8"]
    assert [r["cpu"] for r in rows.values()] == ["cortex-a72", "cortex-a76", "cortex-a72"]
    assert all(r["insns_per_inference"] > 10_000 for r in rows.values())
    print({name: r["insns_per_inference"] for name, r in rows.items()})

    bad = nativeq_cli("bench-emulated", built["matmul", "rpi4"][0], "--dim", "S=3")
    assert bad.returncode == 2 and "error: --dim S: the model has no symbolic dim 'S'" in bad.stderr


def test_runner_signal_becomes_one_line_error(tmp_path):
    """Should an instruction still fault (a hand-edited manifest without the feature), the user sees the signal."""
    proc = subprocess.CompletedProcess(args=[], returncode=-4, stdout="", stderr="qemu: uncaught target signal 4 (Illegal instruction) - core dumped\n")
    error = emulate._runner_failure(tmp_path, {"name": "rpi5"}, "cortex-a72", proc)
    assert str(error) == (f"artifact {tmp_path} (target rpi5) under qemu-aarch64 -cpu cortex-a72 died with SIGILL: "
                          "qemu: uncaught target signal 4 (Illegal instruction) - core dumped")


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_ort_quantized_encoder_verifies_under_qemu(tmp_path, target):
    """The issue's ARM proof, in the default suite: ~30 s per target (compile + qemu)."""
    onnx_path = tmp_path / "encoder.onnx"
    onnx.save(qdq_models.ort_quantized_encoder("uint8"), onnx_path)
    artifact = tmp_path / target
    compile_model(onnx_path, artifact, CompileConfig(target=target))
    report = verify_artifact(artifact, onnx_path, VerifyConfig(runs=2, dims={"T": 48}))
    print(report.table())
    assert report.execution.startswith("emulated")
    assert report.passed, report.table()


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_dynamically_quantized_matmul_runs_the_int8_kernel_and_matches_onnxruntime(tmp_path, target):
    """`quantize_dynamic`'s DynamicQuantizeLinear -> MatMulInteger: the run-time zero point's correction (scalar blocks
    of the kernel) once made TVM's rfactor fail on the Pi 4's k-along-the-lanes kernel, so the matmul ran on the
    generic path (a dynamic Conformer: 662 M instructions per inference for 78 M)."""
    onnx_path = tmp_path / "dynamic.onnx"
    onnx.save(qdq_models.dynamic_quantize_matmul(k=144, n=64), onnx_path)
    result = compile_model(onnx_path, tmp_path / target, CompileConfig(target=target, use_tuning=False))
    [matmul] = [k for k in result.manifest["kernels"] if k["kind"] == "contraction"]
    assert matmul["schedule"] == "int8 tensorized", matmul
    report = verify_artifact(tmp_path / target, onnx_path, VerifyConfig(runs=1, dims={"T": 37}))
    assert report.passed, report.table()


def test_runtime_of_another_tvm_release_is_refused(built, tmp_path):
    artifact, _ = built["matmul", "rpi4"]
    older = tmp_path / "older"
    shutil.copytree(artifact, older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["tvm_version"] = "0.26.0"
    (older / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(NativeqError, match=r"built with apache-tvm 0\.26\.0 but the aarch64 runtime .* run `nativeq setup-arm`"):
        run_emulated(older, {"x": np.zeros((1, 2, 64), np.float32)})


def _matmul_integer_model(w: np.ndarray) -> onnx.ModelProto:
    """int8 a [1, T, K] x constant int8 w [K, N] -> int32 (MatMulInteger, no zero points): the raw dot products."""
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "mmi",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [1, "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, "T", n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_rpi4_pair_sum_kernel_is_exact_at_the_int16_bound_and_skipped_for_weight_minus_128(tmp_path):
    """The Pi 4 kernel sums two int8 products in int16 when no weight is -128 (K = 62 padded to 64, k along the
    lanes: the products at k and k + 8 in one int16 lane, `smlal2 .8h`): exact even where both products are at
    their extreme (a = -128, w = +-127: 2 x 16256 = 32512); a weight of -128 (whose pairs could reach 32768) keeps
    the widening kernel. K = 62 and N = 21 are ragged (not whole 4 x 16 tiles)."""
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, (62, 21), dtype=np.int8)
    w[:, 0], w[:, 1] = -127, 127
    with_min = w.copy()
    with_min[rng.random(w.shape) < 0.05] = -128
    with_min[:, 2] = -128
    a = rng.integers(-128, 128, (1, 11, 62), dtype=np.int8)
    a[0, :3], a[0, 3] = -128, 127
    # the products at their extreme reach the output: every pair in columns 0 and 1 of rows 0-2 is +-32512
    assert (a[0, :3].astype(np.int64) @ w[:, :2].astype(np.int64) == [62 * 128 * 127, -62 * 128 * 127]).all()
    pair_sums = {}
    for name, weights in (("narrow", w), ("with_min", with_min)):
        onnx_path = tmp_path / f"{name}.onnx"
        onnx.save(_matmul_integer_model(weights), onnx_path)
        artifact = tmp_path / f"{name}_rpi4"
        compile_model(onnx_path, artifact, CompileConfig(target="rpi4"))
        got = run_emulated(artifact, {"a": a}, cpu="cortex-a72")[0]
        expected = a.astype(np.int64) @ weights.astype(np.int64)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        pair_sums[name] = sum(1 for line in aarch64_disassembly(artifact).splitlines()
                              if ("\taddp\t" in line or "\tsmlal\t" in line or "\tsmlal2\t" in line)
                              and ".8h," in line)
    assert pair_sums["narrow"] > 0 and pair_sums["with_min"] == 0, pair_sums


def _depthwise_integer_model(w: np.ndarray, spatial: list, **attrs) -> onnx.ModelProto:
    """int8 x [1, C, *spatial] depthwise ConvInteger with constant int8 w [C, 1, *K] -> int32 (exact sums)."""
    channels = w.shape[0]
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], group=channels, **attrs)], "depthwise",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, channels, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, channels, *(f"o{i}" for i in range(len(spatial)))])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("kernel, spatial, shape, attrs, minus_128", [
    ((5,), ["T"], (37,), dict(pads=[4, 4], dilations=[2]), False),  # odd taps (a zero tap added), block crop
    ((4,), ["T"], (41,), dict(strides=[2]), False),                  # no padding: the pairing pads the copy
    ((3, 3), [9, 11], (9, 11), dict(pads=[1, 1, 1, 1], strides=[2, 2]), False),  # 2-D, pairs along the width
    ((3, 3), [25, 5], (25, 5), dict(pads=[1, 1, 1, 1]), False),  # DS-CNN's 5 columns: a block of 5 positions
    ((3, 3), [8, 7], (8, 7), dict(pads=[1, 1, 1, 1]), False),    # 7 columns: blocks of 4, cropped
    ((5,), ["T"], (37,), dict(pads=[2, 2]), True),                   # a weight of -128: products widened one by one
])
def test_rpi4_depthwise_sums_tap_pairs_in_int16_exactly(kernel, spatial, shape, attrs, minus_128, tmp_path):
    """int8 depthwise convs on ARM sum the products of two neighbouring taps in int16 (`smull` + `smlal`, then
    widened into int32) when no weight is -128: every output equals ONNX Runtime's int32 ConvInteger, also with
    the extreme operands (x = -128 against w = +-127), ragged channel counts and tap counts."""
    rng = np.random.default_rng(11)
    channels = 24 if len(kernel) == 2 else 32
    w = rng.integers(-127, 128, (channels, 1, *kernel), dtype=np.int8)
    w[0], w[1] = -127, 127
    if minus_128:
        w[2, 0, 0] = -128
    onnx_path = tmp_path / "depthwise.onnx"
    onnx.save(_depthwise_integer_model(w, spatial, **attrs), onnx_path)
    artifact = tmp_path / "rpi4"
    compile_model(onnx_path, artifact, CompileConfig(target="rpi4"))
    x = rng.integers(-128, 128, (1, channels, *shape), dtype=np.int8)
    x[0, :2] = -128
    got = run_emulated(artifact, {"x": x}, cpu="cortex-a72")[0]
    expected = _ort(onnx_path, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
    assert abs(int(expected[0, :2].min())) >= 2 * 128 * 127  # the extreme pairs reach the output
    # a second product accumulated in int16 (`smlal` into .8h lanes) is the pair sum's signature
    pair_sums = sum(1 for line in aarch64_disassembly(artifact).splitlines()
                    if ("\tsmlal\t" in line or "\tsmlal2\t" in line) and ".8h" in line.split("\t")[-1].split(",")[0])
    assert (pair_sums == 0) if minus_128 else (pair_sums > 0)


@pytest.mark.parametrize("k", [128, 94, 36, 64])
def test_rpi5_kernel_reads_four_k_steps_per_activation_load_and_is_exact(k, tmp_path):
    """A dense int8 matmul on the Pi 5 whose (padded) K is a multiple of 16 and at least 80 loads 16 activations of a
    row at once, the indexed lanes of four `sdot`s (`sdot v.4s, v.16b, v.4b[i]`); K = 36 (9 k-steps) and K = 64 (a
    k loop LLVM unrolls fully) keep the one-k-step kernel (a broadcast load, `ld1r`, per row and k-step). Exact at
    the bound: row 0 x column 0 is -128 x 127 at every k. K = 94 is padded to 96; N = 21 and 11 rows are ragged."""
    grouped = k not in (36, 64)
    rng = np.random.default_rng(k)
    w = rng.integers(-127, 128, (k, 21), dtype=np.int8)
    w[:, 0] = 127
    artifact = _exact_matmul(w, 11, rng, tmp_path, "rpi5")
    lines = aarch64_disassembly(artifact).splitlines()
    broadcasts = [line for line in lines if "\tld1r\t" in line]
    sdots = [line for line in lines if "\tsdot\t" in line]
    indexed = [line for line in sdots if ".4b[" in line]
    assert sdots and (len(indexed) == len(sdots) if grouped else not indexed), sdots[:8]
    assert bool(broadcasts) != grouped, broadcasts[:8]


def _operand(line: str, index: int) -> str:
    return line.split("\t")[-1].split(",")[index].strip()


def _activation_broadcasts(lines: list[str]) -> list[str]:
    """Disassembly lines broadcasting activations: `ld1r`, or a `dup` of one 32-bit lane."""
    return [line for line in lines if "\tld1r\t" in line or ("\tdup\t" in line and ".s[" in line)]


def _exact_matmul(w: np.ndarray, rows: int, rng, tmp_path, target: str = "rpi4"):
    """MatMulInteger a [1, rows, K] x `w` compiled for `target`; under qemu every output equals the int64 product
    (row 0 of `a` is -128, the extreme activation). Returns the artifact."""
    a = rng.integers(-128, 128, (1, rows, w.shape[0]), dtype=np.int8)
    a[0, 0] = -128
    onnx_path = tmp_path / "mmi.onnx"
    onnx.save(_matmul_integer_model(w), onnx_path)
    artifact = tmp_path / target
    compile_model(onnx_path, artifact, CompileConfig(target=target))
    cpu = {"rpi5": "cortex-a76", "rpi4": "cortex-a72"}[target]
    np.testing.assert_array_equal(run_emulated(artifact, {"a": a}, cpu=cpu)[0], a.astype(np.int64) @ w.astype(np.int64))
    return artifact


@pytest.mark.parametrize("k, n, rows, bits", [
    (128, 64, 50, 8),
    (94, 21, 11, 8),   # K padded to 96, N to 24, rows to 12
    (36, 12, 7, 8),    # K padded to 48 (3 k-steps of 16)
    (130, 99, 13, 4),  # 4-bit weights (every value in [-8, 7]), unpacked in the kernel
    (128, 64, 50, "full"),  # weights holding -128: no int16 pair sums
])
def test_rpi4_kernel_multiplies_with_k_along_the_lanes_exactly(k, n, rows, bits, tmp_path):
    """A dense int8 matmul on the Pi 4 accumulates with k along the vector lanes: each output keeps four int32
    partial sums, `smull` + `smlal2` multiply 16 activations of a row by 16 weights of a column (two products per
    int16 lane, when no weight is -128: exact at the bound, row 0 x column 0 is -128 x 127 at every k) and `sadalp`
    widens them into the partial sums, which `addp` adds once per register tile. With a weight of -128 the two
    halves' products (`smull`, `smull2`) are widened separately (-128 x -128 at every k of row 0 x column 0). No
    broadcast of activations (`ld1r`, `dup`). Ragged K, N and rows are padded; a 4-bit weight is unpacked per
    k-step inside the kernel."""
    low, high = {4: (-8, 8), 8: (-127, 128), "full": (-128, 128)}[bits]
    rng = np.random.default_rng(k * n)
    w = rng.integers(low, high, (k, n), dtype=np.int8)
    w[:, 0] = -128 if bits == "full" else high - 1
    artifact = _exact_matmul(w, rows, rng, tmp_path)
    lines = aarch64_disassembly(artifact).splitlines()
    pair_sums = [line for line in lines if ("\tsmlal2\t" in line or "\tsmlal\t" in line)
                 and _operand(line, 0).endswith(".8h")]
    high_halves = [line for line in lines if "\tsmull2\t" in line and _operand(line, 0).endswith(".8h")]
    widened = [line for line in lines if "\tsadalp\t" in line and _operand(line, 0).endswith(".4s")]
    tile_sums = [line for line in lines if "\taddp\t" in line and _operand(line, 0).endswith(".4s")]
    broadcasts = _activation_broadcasts(lines)
    products = high_halves if bits == "full" else pair_sums
    assert products and widened and tile_sums, (products[:4], widened[:4], tile_sums[:4])
    assert not (pair_sums if bits == "full" else []), pair_sums[:4]
    assert not broadcasts, broadcasts[:8]


@pytest.mark.parametrize("k, n, rows, sparsity, bits", [
    (576, 144, 75, 0.5, 8),
    (130, 40, 11, 0.75, 4),  # ragged K, lists shared by 8 columns (N / 4 = 10 blocks), 4-bit values, 11 rows
])
def test_rpi4_block_sparse_kernel_gathers_the_listed_activations_exactly(k, n, rows, sparsity, bits, tmp_path):
    """A weight pruned in 16 x 4 blocks on the Pi 4: per row tile and list, the activations at the listed blocks are
    gathered into contiguous rows, which the kernel with k along the lanes multiplies by the listed weights joined
    into 16-wide tiles (`smlal2 .8h`, no broadcast): every output equals the int64 product, the artifact stores the
    listed blocks only. Column 0 is +-max at every kept k against a = -128 (the int16 pair bound)."""
    from test_weight_formats import block_pruned

    rng = np.random.default_rng(k + n)
    high = 2 ** (bits - 1) - 1
    w = block_pruned(rng.integers(-high, high + 1, (k, n), dtype=np.int8), sparsity, rng)
    w[:, 0] = np.where(np.abs(w[:, :16].astype(int)).sum(axis=1) > 0, high, 0)
    artifact = _exact_matmul(w, rows, rng, tmp_path)
    dense_bytes = -(-k // 16) * 16 * -(-n // 4) * 4
    weight_bytes = json.loads((artifact / "manifest.json").read_text())["sizes"]["weight_bytes"]
    assert weight_bytes < dense_bytes * (1 - sparsity + 0.1) * bits / 8 + 64, (weight_bytes, dense_bytes)
    lines = aarch64_disassembly(artifact).splitlines()
    products = [line for line in lines if "\tsmlal2\t" in line and _operand(line, 0).endswith(".8h")]
    broadcasts = _activation_broadcasts(lines)
    assert products and not broadcasts, (products[:4], broadcasts[:8])
