"""`nativeq run` and `nativeq profile` (runtime/profile.py): outputs as `nativeq.load` and ORT give them,
the per-kernel times against the manifest's kernel table, and one `error:` line for every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import nativeq
from nativeq.errors import NativeqError
from nativeq.runtime.profile import (ProfileConfig, RunConfig, profile_artifact, random_inputs, run_artifact,
                                     write_npz)

OUT_SCALE = 0.1  # the output QuantizeLinear scale of qdq_models.qdq_matmul


def _ort(onnx_path, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def inputs_x():
    return np.random.default_rng(7).uniform(-7, 7, (1, 37, 64)).astype(np.float32)


# ----------------------------------------------------------------------------- run
def test_run_cli_writes_what_load_and_ort_give(matmul_artifact, inputs_x, nativeq_cli, tmp_path):
    onnx_path, artifact = matmul_artifact
    np.savez(tmp_path / "x.npz", x=inputs_x)
    proc = nativeq_cli("run", artifact, "--inputs", "x.npz", "-o", "out/y.npz", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["execution"] == "native" and report["out"] == "out/y.npz"

    with np.load(tmp_path / "out" / "y.npz", allow_pickle=False) as data:
        assert data.files == ["y"]
        y = data["y"]
    assert os.listdir(tmp_path / "out") == ["y.npz"]  # no temporary file left beside it
    expected = nativeq.load(artifact).run({"x": inputs_x})["y"]
    assert y.dtype == expected.dtype and np.array_equal(y, expected)
    ref = _ort(onnx_path, inputs_x)
    assert np.abs(y - ref).max() <= OUT_SCALE + 1e-6  # verify's tolerance for this model: one output step
    assert np.mean(np.abs(y - ref) < OUT_SCALE / 2) >= 0.99
    (out,) = report["outputs"]
    assert out == {"name": "y", "dtype": "float32", "shape": [1, 37, 48], "min": float(y.min()), "max": float(y.max())}


def test_run_npy_and_seeded_random_inputs(matmul_artifact, inputs_x, tmp_path):
    _, artifact = matmul_artifact
    np.save(tmp_path / "x.npy", inputs_x)
    model = nativeq.load(artifact)
    result = run_artifact(artifact, RunConfig(inputs=str(tmp_path / "x.npy")))
    assert np.array_equal(result.outputs["y"], model.run({"x": inputs_x})["y"])
    assert re.search(r"^y +float32 +\[1, 37, 48\] ", result.summary(), re.M), result.summary()

    result = run_artifact(artifact, RunConfig(dims={"T": 20}, seed=3))
    x = random_inputs(model.inputs, {"T": 20}, seed=3)["x"]
    assert x.shape == (1, 20, 64) and x.dtype == np.float32
    assert np.array_equal(result.outputs["y"], model.run({"x": x})["y"])
    assert result.inputs_from == "seeded random (seed 3, T=20)"


def test_write_npz_takes_any_output_name(tmp_path):
    arrays = {"file": np.arange(3, dtype=np.int8), "allow_pickle": np.ones((2, 2), np.float32)}
    write_npz(tmp_path / "o.npz", arrays)
    with np.load(tmp_path / "o.npz", allow_pickle=False) as data:
        assert {k: data[k].tolist() for k in data.files} == {k: v.tolist() for k, v in arrays.items()}


# ----------------------------------------------------------------------------- profile
def test_profile_lists_the_manifest_kernels(matmul_artifact):
    _, artifact = matmul_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    records = {k["name"]: k for k in manifest["kernels"]}
    profile = profile_artifact(artifact, ProfileConfig(dims={"T": 64}, runs=3, threads=1))

    assert {k.name for k in profile.kernels} == set(records)
    for k in profile.kernels:
        record = records[k.name]
        assert k.calls == record["calls"] == k.manifest_calls
        assert (k.kind, k.schedule, k.mac_share) == (record["kind"], record["schedule"], record["share"])
        assert k.onnx_nodes == tuple(n["name"] for n in record["onnx_nodes"])
        assert k.ms > 0
    (mm,) = [k for k in profile.kernels if k.kind == "contraction"]
    assert mm.onnx_nodes[:2] == ("fc_MatMul", "fc_Add")  # the ONNX nodes it computes, compute nodes first
    assert sum(k.share for k in profile.kernels) == pytest.approx(1.0)
    assert [k.ms for k in profile.kernels] == sorted((k.ms for k in profile.kernels), reverse=True)
    assert profile.vm_calls > 0 and profile.threads == 1 and profile.runs == 3
    assert profile.instrumented_ms > 0 and profile.plain_ms > 0
    table = profile.table()
    assert all(name in table for name in records) and "instrumented inference" in table
    (row,) = [ln for ln in table.splitlines() if ln.startswith(mm.name)]
    assert row.endswith(f"fc_MatMul +{len(mm.onnx_nodes) - 1}") and "ONNX nodes" in table
    # every kernel's time under the op of its first ONNX node: the matmul's, and the input's QuantizeLinear
    assert set(profile.by_op) == {"MatMul", "QuantizeLinear"} and mm.onnx_op == "MatMul"
    assert sum(profile.by_op.values()) == pytest.approx(profile.kernel_ms) and profile.by_op["MatMul"] == mm.ms
    assert "kernel time by ONNX op (each kernel under its first node's op): " in table


def test_profile_cli_json_and_top(matmul_artifact, nativeq_cli):
    _, artifact = matmul_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    proc = nativeq_cli("profile", artifact, "--dim", "T=50", "--runs", "2", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {k["name"]: k["calls"] for k in data["kernels"]} == {k["name"]: k["calls"] for k in manifest["kernels"]}
    assert {k["name"]: k["onnx_nodes"] for k in data["kernels"]} == \
        {k["name"]: [n["name"] for n in k["onnx_nodes"]] for k in manifest["kernels"]}
    assert sum(k["share"] for k in data["kernels"]) == pytest.approx(1.0)
    assert data["overhead_ms"] == pytest.approx(data["instrumented_ms"] - data["plain_ms"])
    assert sum(data["by_onnx_op_ms"].values()) == pytest.approx(data["kernel_ms"])

    proc = nativeq_cli("profile", artifact, "--dim", "T=50", "--runs", "2", "--top", "1")
    assert proc.returncode == 0, proc.stderr
    assert "... 1 more kernel:" in proc.stdout
    assert data["kernels"][0]["name"] in proc.stdout or data["kernels"][1]["name"] in proc.stdout


def test_profile_without_or_beyond_the_kernel_table(matmul_artifact, tmp_path):
    """A kernel the manifest lists but the VM never calls shows with 0 calls; without a kernel table the
    kernels are told from the VM's builtins and shape functions by name."""
    from nativeq.runtime.manifest import seal_manifest

    _, artifact = matmul_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    names = {k["name"] for k in manifest["kernels"]}
    manifest["kernels"].append({"name": "reshape9", "kind": "elementwise", "schedule": "unscheduled", "macs": 0,
                                "calls": 2, "share": 0.0})
    (copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    profile = profile_artifact(copy, ProfileConfig(dims={"T": 8}, runs=1, threads=1))
    (idle,) = [k for k in profile.kernels if k.calls == 0]
    assert (idle.name, idle.ms, idle.manifest_calls) == ("reshape9", 0.0, 2)
    assert "never called though the manifest counts 2 call sites: reshape9" in profile.table()

    del manifest["kernels"]
    (copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    profile = profile_artifact(copy, ProfileConfig(dims={"T": 8}, runs=1, threads=1))
    assert {k.name for k in profile.kernels} == names
    assert all(k.kind is None and k.manifest_calls is None and k.calls == 1 for k in profile.kernels)
    assert profile.vm_calls > 0


_NO_TORCH = """
import sys
from nativeq.runtime.profile import ProfileConfig, profile_artifact
profile = profile_artifact(sys.argv[1], ProfileConfig(dims={"T": 16}, runs=2, threads=1))
assert profile.kernels
print(sorted({"torch", "tvm", "onnx", "onnxruntime"} & set(sys.modules)))
"""


def test_profile_imports_no_torch(matmul_artifact):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(matmul_artifact[1])], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- errors
def _write_cases(tmp_path):
    np.savez(tmp_path / "unknown.npz", x=np.ones((1, 5, 64), np.float32), z=np.ones(3, np.float32))
    np.savez(tmp_path / "empty.npz")
    np.savez(tmp_path / "shape.npz", x=np.ones((1, 5, 63), np.float32))
    np.savez(tmp_path / "dtype.npz", x=np.ones((1, 5, 64), np.float64))
    np.save(tmp_path / "one.npz.npy", np.ones((1, 5, 64), np.float32))
    shutil.copy(tmp_path / "one.npz.npy", tmp_path / "one.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "shape.npz").read_bytes()[:80])
    (tmp_path / "notanartifact").mkdir()


@pytest.mark.parametrize("args, message", [
    (("run", "missing-dir", "--dim", "T=4"), "artifact missing-dir does not exist"),
    (("run", "notanartifact", "--dim", "T=4"), "notanartifact is not a nativeq artifact"),
    (("run", "ART", "--inputs", "unknown.npz"), "unknown input 'z'"),
    (("run", "ART", "--inputs", "empty.npz"), "missing input 'x'"),
    (("run", "ART", "--inputs", "shape.npz"), "input 'x': dim 2 must be 64, got 63"),
    (("run", "ART", "--inputs", "dtype.npz"), "input 'x': expected dtype float32, got float64"),
    (("run", "ART", "--inputs", "one.npz"), "holds one array, not arrays by input name"),
    (("run", "ART", "--inputs", "garbage.npz"), "is neither an .npz nor an .npy"),
    (("run", "ART", "--inputs", "truncated.npz"), "is not a readable .npz/.npy"),
    (("run", "ART", "--inputs", "nope.npz"), "inputs file nope.npz does not exist"),
    (("run", "ART"), "no inputs: give --inputs X.npz"),
    (("run", "ART", "--random"), "has the symbolic dim T: give its size"),
    (("run", "ART", "--dim", "Q=3"), "the model has no symbolic dim 'Q'"),
    (("run", "ART", "--dim", "T=4", "--inputs", "shape.npz"), "are exclusive"),
    (("run", "ART", "--dim", "T=4", "-o", "y.npy"), "written as an .npz"),
    (("profile", "ART", "--inputs", "shape.npz"), "input 'x': dim 2 must be 64, got 63"),
    (("profile", "ART", "--dim", "T=4", "--runs", "0"), "--runs must be at least 1"),
    (("profile", "missing-dir", "--dim", "T=4"), "artifact missing-dir does not exist"),
])
def test_errors_are_one_line(matmul_artifact, nativeq_cli, tmp_path, args, message):
    _write_cases(tmp_path)
    args = [str(matmul_artifact[1]) if a == "ART" else a for a in args]
    proc = nativeq_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "y.npy").exists()


def test_profile_refuses_another_arch(matmul_artifact, tmp_path):
    _, artifact = matmul_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    from nativeq.runtime.manifest import seal_manifest

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["arch"] = "riscv64"
    (copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(NativeqError, match=r"is for riscv64 .* profile it on the device"):
        profile_artifact(copy, ProfileConfig(dims={"T": 4}))
    with pytest.raises(NativeqError, match=r"is for riscv64 .* run it on a riscv64 machine"):
        run_artifact(copy, RunConfig(dims={"T": 4}))


# ----------------------------------------------------------------------------- aarch64 under qemu
@pytest.mark.arm
def test_run_aarch64_artifact_emulated(matmul_artifact, inputs_x, nativeq_cli, tmp_path):
    if not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-g++")):
        pytest.skip("needs qemu-user and the aarch64 cross toolchain (make setup)")
    from nativeq.compile import CompileConfig, compile_model

    onnx_path, host_artifact = matmul_artifact
    compile_model(onnx_path, tmp_path / "rpi5", CompileConfig(target="rpi5", use_tuning=False))
    np.savez(tmp_path / "x.npz", x=inputs_x)
    proc = nativeq_cli("run", "rpi5", "--inputs", "x.npz", "-o", "y.npz")
    assert proc.returncode == 0, proc.stderr
    assert "emulated, qemu-aarch64 -cpu cortex-a76" in proc.stdout
    with np.load(tmp_path / "y.npz") as data:
        y = data["y"]
    expected = nativeq.load(host_artifact).run({"x": inputs_x})["y"]
    assert np.abs(y - expected).max() <= OUT_SCALE + 1e-6
    proc = nativeq_cli("profile", "rpi5", "--inputs", "x.npz")
    assert proc.returncode == 2 and "profile it on the device" in proc.stderr
