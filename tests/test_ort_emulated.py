"""ONNX Runtime's aarch64 build under qemu-aarch64 (the peer of the ARM artifacts): Debian's arm64
python3 with the aarch64 onnxruntime/numpy wheels, set up by `nativeq setup-arm`.

Its int8 QDQ outputs must equal x86 ORT's exactly: measured bit-identical on the uint8
`quantize_static` encoder at every optimization level on both emulated cores (MLAS requantizes
with the same float scale and round-half-to-even on aarch64 as on x86, and its NEON/sdot integer
kernels sum int32 exactly), so any difference here is a setup fault, not rounding.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qdq_models
from nativeq.errors import NativeqError
from nativeq.runtime import ort_emulated, setup_arm

pytestmark = pytest.mark.arm

needs_arm_python = pytest.mark.skipif(
    ort_emulated.installed() is None or shutil.which("qemu-aarch64") is None,
    reason="the aarch64 python with onnxruntime is not set up (run `nativeq setup-arm`, part of `make setup`)",
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ort-emulated") / "encoder.onnx"
    onnx.save(qdq_models.ort_quantized_encoder("uint8"), path)
    return path


def _x86_ort(path, feeds, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@needs_arm_python
@pytest.mark.parametrize("cpu, level", [("cortex-a76", "all"), ("cortex-a72", "disabled")])
def test_ort_aarch64_under_qemu_equals_x86_ort(encoder, cpu, level):
    feeds = {"feats": np.random.default_rng(3).normal(0, 1, (1, 48, 80)).astype(np.float32)}
    enum = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    expected = _x86_ort(encoder, feeds, enum[level])
    run = ort_emulated.run_ort_emulated(encoder, feeds, cpu=cpu, levels=(level,))
    assert run.level == level
    assert len(run.outputs) == len(expected)
    for got, want in zip(run.outputs, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@needs_arm_python
def test_ort_emulated_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(NativeqError, match=r"onnxruntime .* under qemu-aarch64 -cpu cortex-a72 failed: ONNX Runtime cannot load"):
        ort_emulated.run_ort_emulated(broken, {"x": np.zeros(1, np.float32)}, cpu="cortex-a72")


@needs_arm_python
@pytest.mark.slow
def test_bench_emulate_puts_ort_aarch64_next_to_the_artifact(nativeq_cli, encoder, tmp_path):
    """`nativeq bench --emulate` counts ORT (QDQ all / none, float) under the target's CPU; the counts are steady."""
    float_path = tmp_path / "float.onnx"
    onnx.save(qdq_models.float_encoder(), float_path)
    proc = nativeq_cli("bench", encoder, "--target", "rpi5", "--emulate", "--float-onnx", float_path,
                       "--dim", "T=48", "--repeat", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["target"], r["int8"]) for r in report["rows"]] == [("rpi5", True), ("rpi5", False)]
    engines = {o["engine"]: o for o in report["ort_rows"]}
    assert set(engines) == {"ort qdq (opt all)", "ort qdq (opt disabled)", "ort fp32 (opt all)"}
    assert all(o["cpu"] == "cortex-a76" and o["insns_per_inference"] > 100_000 for o in engines.values())
    (ratio,) = report["ratios"]
    best = min(engines.values(), key=lambda o: o["insns_per_inference"])
    assert ratio["ort_best"] == best["engine"]
    assert ratio["ratio"] == pytest.approx(report["rows"][0]["insns_per_inference"] / best["insns_per_inference"])
    # python startup and session creation (~1e9 instructions) cancel out: two counts agree within 2%
    feeds = {"feats": np.random.default_rng(0).normal(0, 1, (1, 48, 80)).astype(np.float32)}
    again = ort_emulated.count_ort_instructions(encoder, feeds, cpu="cortex-a76", levels=("all",), repeat=2)
    assert again.startup > 100 * again.per_inference
    assert again.per_inference == pytest.approx(engines["ort qdq (opt all)"]["insns_per_inference"], rel=0.02)


# ----------------------------------------------------------------------------- setup (no network)
class _FakeApt:
    """`apt-cache depends` output of a tiny archive: an alternative, a virtual package, a skipped tool."""

    DEPENDS = {
        "python3.11-minimal": "  PreDepends: libc6\n  Depends: libpython3.11-minimal\n  Depends: dpkg\n",
        "libpython3.11-minimal": " |Depends: media-types\n  Depends: mime-support\n  Depends: <libssl>\n    libssl3\n",
        "libc6": "  Depends: libgcc-s1\n",
        "libgcc-s1": "  Depends: libc6\n",
        "media-types": "",
        "libssl3": "  Depends: libc6\n",
    }

    def run(self, tool, *args, cwd=None):
        names = [a for a in args if not a.startswith("--")][1:]
        return "".join(f"{n}\n{self.DEPENDS[n]}" for n in names)


def test_dependency_walk_takes_first_alternatives_and_skips_tools():
    closure = setup_arm._dependency_closure(_FakeApt(), ["python3.11-minimal"])
    assert closure == ["libc6", "libgcc-s1", "libpython3.11-minimal", "libssl3", "media-types", "python3.11-minimal"]


def test_apt_failure_is_one_line(tmp_path):
    apt = setup_arm._Apt(tmp_path)
    with pytest.raises(NativeqError, match=r"^false update of the arm64 python packages failed \(offline\?\)"):
        apt.run("false", "update")


def test_cpuinfo_names_the_emulated_core():
    a72, a76 = ort_emulated.cpuinfo_text("cortex-a72"), ort_emulated.cpuinfo_text("cortex-a76")
    assert "CPU part\t: 0xd08" in a72 and "asimddp" not in a72
    assert "CPU part\t: 0xd0b" in a76 and "asimddp" in a76
    assert a72.count("processor\t:") == ort_emulated._present_cpus()


def test_missing_setup_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NATIVEQ_ARM_PYTHON", str(tmp_path / "none"))
    with pytest.raises(NativeqError, match=r"aarch64 python with onnxruntime is not set up in .*: run `nativeq setup-arm`"):
        ort_emulated.run_ort_emulated(tmp_path / "m.onnx", {}, cpu="cortex-a76")


def test_ort_runner_script_is_plain_python():
    """The runner runs on the aarch64 python: stdlib, numpy and onnxruntime only (no nativeq)."""
    source = ort_emulated.RUNNER_SCRIPT.read_text()
    assert "nativeq" not in source.split('"""')[2]
    proc = subprocess.run(["python3", "-c", f"import ast; ast.parse(open({str(ort_emulated.RUNNER_SCRIPT)!r}).read())"])
    assert proc.returncode == 0
