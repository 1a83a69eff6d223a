"""nativeq.load: dynamic shapes vs ONNX Runtime, input checks, artifact integrity, CPU checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import nativeq
from nativeq.errors import NativeqError
from nativeq.runtime import cpu


def _ort(onnx_path, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def artifact_copy(matmul_artifact, tmp_path):
    onnx_path, artifact = matmul_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    return onnx_path, copy


def _edit_manifest(artifact, **changes):
    """Change manifest fields and re-seal the manifest, as a compiler that wrote these values would."""
    from nativeq.runtime.manifest import seal_manifest

    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            manifest[section][field] = value
        else:
            manifest[section] = value
    path.write_text(json.dumps(seal_manifest(manifest)))


@pytest.mark.parametrize("length", [1, 7, 250])
def test_symbolic_time_axis_runs_at_any_length(matmul_artifact, length):
    onnx_path, artifact = matmul_artifact
    model = nativeq.load(artifact)
    x = np.random.default_rng(length).uniform(-7, 7, (1, length, 64)).astype(np.float32)
    y = model(x=x)["y"]
    ref = _ort(onnx_path, x)
    assert y.shape == ref.shape == (1, length, 48)
    assert np.abs(y - ref).max() <= 0.1 + 1e-6  # at most one step of the output scale (0.1)
    assert np.mean(np.abs(y - ref) < 0.05) >= 0.99


def test_specs_and_run_dict(matmul_artifact):
    _, artifact = matmul_artifact
    model = nativeq.load(artifact)
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [("x", "float32", (1, "T", 64))]
    assert [(s.name, s.shape) for s in model.outputs] == [("y", (1, "T", 48))]
    assert model.outputs[0].quant["dtype"] == "int8"
    out = model.run({"x": np.zeros((1, 3, 64), np.float32)})
    assert list(out) == ["y"] and out["y"].dtype == np.float32
    assert "x: float32[1, T, 64]" in repr(model)


def test_zero_copy_calls_keep_inputs_and_earlier_outputs(matmul_artifact):
    """Inputs are read in place (a misaligned or strided array is copied first) and never written; each
    call's outputs own their memory: a later call with other inputs leaves an earlier result unchanged."""
    onnx_path, artifact = matmul_artifact
    model = nativeq.load(artifact)
    rng = np.random.default_rng(0)
    first_x = rng.uniform(-7, 7, (1, 40, 64)).astype(np.float32)
    kept_x = first_x.copy()
    first = model(x=first_x)["y"]
    kept = first.copy()
    buffer = np.zeros(40 * 64 + 1, np.float32)
    misaligned = buffer[1:].reshape(1, 40, 64)  # 4 bytes past an aligned address
    misaligned[...] = rng.uniform(-7, 7, (1, 40, 64))
    second = model(x=misaligned)["y"]
    strided = np.asfortranarray(rng.uniform(-7, 7, (1, 40, 64)).astype(np.float32))
    third = model(x=strided)["y"]
    assert np.array_equal(first_x, kept_x) and np.array_equal(first, kept)
    for x, y in ((first_x, first), (misaligned, second), (strided, third)):
        assert np.abs(y - _ort(onnx_path, np.ascontiguousarray(x))).max() <= 0.1 + 1e-6  # one output step
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"feats": np.zeros((1, 5, 64), np.float32)}, r"unknown input 'feats'; the model's inputs are: x: float32\[1, T, 64\]"),
        ({}, r"missing input 'x' \(x: float32\[1, T, 64\]\)"),
        ({"x": np.zeros((1, 5, 64), np.float64)}, r"input 'x': expected dtype float32, got float64"),
        ({"x": np.zeros((5, 64), np.float32)}, r"input 'x': expected shape \[1, T, 64\] \(rank 3\), got \(5, 64\) \(rank 2\)"),
        ({"x": np.zeros((1, 5, 32), np.float32)}, r"input 'x': dim 2 must be 64, got 32"),
    ],
)
def test_wrong_inputs_name_the_input_expected_and_got(matmul_artifact, inputs, message):
    model = nativeq.load(matmul_artifact[1])
    with pytest.raises(NativeqError, match=f"^{message}"):
        model.run(inputs)


def test_symbolic_dim_must_agree_across_inputs():
    from nativeq.runtime import check_inputs
    from nativeq.runtime.manifest import TensorSpec

    specs = (TensorSpec("a", "float32", (1, "T")), TensorSpec("b", "int64", ("T",)))
    check_inputs(specs, {"a": np.zeros((1, 4), np.float32), "b": np.zeros(4, np.int64)})
    with pytest.raises(NativeqError, match=r"input 'b': dim 0 \(T\) is 5 but T=4 from input 'a'"):
        check_inputs(specs, {"a": np.zeros((1, 4), np.float32), "b": np.zeros(5, np.int64)})


def test_tampered_library_is_refused(artifact_copy):
    _, artifact = artifact_copy
    library = artifact / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(NativeqError, match=r"artifact file .*model.so was modified \(sha256 mismatch\)"):
        nativeq.load(artifact)


def test_missing_file_and_not_an_artifact(artifact_copy, tmp_path):
    _, artifact = artifact_copy
    (artifact / "model.so").unlink()
    with pytest.raises(NativeqError, match=r"artifact file .*model.so is missing"):
        nativeq.load(artifact)
    with pytest.raises(NativeqError, match=r"is not a nativeq artifact \(no manifest.json\)"):
        nativeq.load(tmp_path)
    with pytest.raises(NativeqError, match=r"artifact .*nowhere does not exist"):
        nativeq.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"nativeq_version": "0.9.0"}, r"was built by nativeq 0.9.0; this is nativeq 0.1.\d+: recompile it"),
        ({"tvm_version": "0.26.0"}, r"was built with TVM 0.26.0; this machine has TVM 0.27"),
        ({"tvm_ffi_version": "0.1.15"}, r"was built with tvm-ffi 0.1.15; this machine has tvm-ffi 0.1.14"),
        ({"schema": 7}, r"manifest schema 7 is not supported"),
    ],
)
def test_other_versions_are_refused(artifact_copy, changes, message):
    _edit_manifest(artifact_copy[1], **changes)
    with pytest.raises(NativeqError, match=message):
        nativeq.load(artifact_copy[1])


def test_artifact_for_another_arch_points_to_verify(artifact_copy):
    other = "aarch64" if cpu.machine_arch() == "x86_64" else "x86_64"
    _edit_manifest(artifact_copy[1], target__arch=other)
    with pytest.raises(NativeqError, match=rf"is for {other} .* use `nativeq verify .* --onnx MODEL.onnx`"):
        nativeq.load(artifact_copy[1])


def test_missing_cpu_feature_is_named(artifact_copy):
    _edit_manifest(artifact_copy[1], target__cpu_features=["asimddp", "no_such_feature"])
    with pytest.raises(NativeqError, match=r"^this CPU lacks dotprod \(asimddp\), no_such_feature, which artifact"):
        nativeq.load(artifact_copy[1])


def test_aarch64_hwcap_bits_decode_to_cpuinfo_names():
    assert cpu._decode_hwcaps(1 << 1, 0) == {"asimd"}
    assert cpu._decode_hwcaps((1 << 0) | (1 << 1) | (1 << 20), 1 << 13) == {"fp", "asimd", "asimddp", "i8mm"}
    assert cpu.describe_features(["asimddp", "avx512_vnni"]) == "dotprod (asimddp), avx512_vnni"


def test_cpu_features_of_this_machine():
    features = cpu.cpu_features()
    if cpu.machine_arch() == "x86_64":
        assert "sse2" in features
        assert cpu.missing_cpu_features(["sse2", "not_a_flag"]) == ["not_a_flag"]
    else:
        assert "asimd" in features


def test_runtime_only_tvm_loads_without_compiler_or_torch(matmul_artifact):
    """With TVM_USE_RUNTIME_LIB=1 nativeq.load needs only libtvm_runtime: no compiler, and no torch
    (made unimportable here, as on a device; tvm-ffi imports torch opportunistically when present)."""
    _, artifact = matmul_artifact
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np, nativeq, tvm.base\n"
        f"m = nativeq.load({str(artifact)!r})\n"
        "y = m(x=np.ones((1, 9, 64), np.float32))['y']\n"
        "print(y.shape, sorted(tvm.base._LOADED_LIBS), 'tvm.relax' in sys.modules)\n"
    )
    env = {"TVM_USE_RUNTIME_LIB": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 9, 48) ['tvm_runtime'] False"


def test_runtime_package_imports_no_torch_and_no_compiler():
    import ast
    from pathlib import Path

    import nativeq.runtime

    for path in Path(nativeq.runtime.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("torch", "tvm.relax", "tvm.s_tir", "nativeq.compile")), (path, name)


def test_recompiled_artifact_at_the_same_path_runs_its_new_code(tmp_path):
    """dlopen caches libraries by path: a model recompiled into the same directory (`--force`) and loaded
    again in the same process must run the new library, not the one loaded first."""
    import onnx
    import qdq_models

    from nativeq.compile import CompileConfig, compile_model

    x = np.random.default_rng(3).uniform(-7, 7, (1, 20, 64)).astype(np.float32)
    results = []
    for seed in (0, 1):
        onnx_path = tmp_path / f"m{seed}.onnx"
        onnx.save(qdq_models.qdq_matmul(seed=seed), onnx_path)
        compile_model(onnx_path, tmp_path / "artifact", CompileConfig(target="host", use_tuning=False), force=True)
        y = nativeq.load(tmp_path / "artifact")(x=x)["y"]
        assert np.abs(y - _ort(onnx_path, x)).max() <= 0.1 + 1e-6
        results.append(y)
    assert not np.array_equal(results[0], results[1])


@pytest.mark.parametrize("library", ["../model.so", "/tmp/evil.so", "sub/model.so", ""])
def test_library_must_be_a_file_inside_the_artifact(artifact_copy, library):
    _, artifact = artifact_copy
    _edit_manifest(artifact, library=library)
    with pytest.raises(NativeqError, match="manifest field 'library' must name a file inside the artifact"):
        nativeq.load(artifact)


def test_library_without_a_recorded_hash_is_refused(artifact_copy):
    _, artifact = artifact_copy
    _edit_manifest(artifact, files={})
    with pytest.raises(NativeqError, match="records no sha256 for the library model.so"):
        nativeq.load(artifact)
