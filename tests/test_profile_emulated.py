"""`nativeq profile --emulate`: an aarch64 artifact's instructions per inference, kernel by kernel, under qemu.

Needs the cross toolchain, qemu-user and `nativeq setup-arm` (all part of `make setup`), like
tests/test_arm.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qdq_models
from nativeq.cli import main
from nativeq.compile import CompileConfig, compile_model
from nativeq.errors import NativeqError
from nativeq.runtime import emulate
from nativeq.runtime.emulated_profile import elf_functions, kernel_of, profile_emulated
from nativeq.runtime.manifest import read_manifest
from nativeq.runtime.profile import ProfileConfig, prepare_inputs, profile_artifact

pytestmark = pytest.mark.arm

DIMS = {"T": 48}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small QDQ conv1d (an int8 contraction and its elementwise neighbours) compiled for rpi5."""
    root = tmp_path_factory.mktemp("profile_emulated")
    onnx_path = root / "conv1d.onnx"
    onnx.save(qdq_models.qdq_conv1d(), onnx_path)
    out = root / "conv1d_rpi5"
    compile_model(onnx_path, out, CompileConfig(target="rpi5"))
    return out


def _profile(artifact, runs=2):
    return profile_emulated(artifact, ProfileConfig(dims=DIMS, runs=runs, emulate=True))


def test_contraction_kernels_have_positive_counts_and_manifest_names(artifact):
    profile = _profile(artifact)
    manifest_kernels = {k["name"]: k for k in read_manifest(artifact)["kernels"]}
    kernel_rows = {r.name: r for r in profile.rows if r.where == "kernel"}
    assert set(kernel_rows) == set(manifest_kernels)  # every row of a kernel is a manifest kernel, and all are there
    contractions = [name for name, k in manifest_kernels.items() if k["kind"] == "contraction"]
    assert contractions
    for name in contractions:
        assert kernel_rows[name].instructions > 0, name
        assert kernel_rows[name].kind == "contraction"
    assert not [r for r in profile.rows if r.name == "[model.so, no symbol]" and r.instructions > 0]


def test_kernels_plus_runtime_add_up_to_the_whole_count(artifact):
    profile = _profile(artifact)
    assert profile.total == pytest.approx(profile.whole, rel=0.02)  # same runs, per block vs whole
    assert profile.lost_blocks == 0
    kernels = sum(r.instructions for r in profile.rows if r.where == "kernel")
    runtime = sum(r.instructions for r in profile.rows if r.where != "kernel")
    assert kernels > 0 and runtime > 0
    # against an independent whole count (other runs, plugin without per-block counters)
    inputs, _ = prepare_inputs(read_manifest(artifact), ProfileConfig(dims=DIMS))
    whole = emulate.count_instructions(artifact, inputs, repeat=2).per_inference
    assert kernels + runtime == pytest.approx(whole, rel=0.05)


def test_every_kernel_symbol_maps_to_a_manifest_kernel(artifact):
    manifest_kernels = {k["name"]: k for k in read_manifest(artifact)["kernels"]}
    functions, _ = elf_functions(artifact / "model.so")
    wrappers = {name.removeprefix("__tvm_ffi_") for _, _, name in functions if name.startswith("__tvm_ffi_")}
    assert set(manifest_kernels) <= wrappers
    for name in manifest_kernels:
        assert kernel_of(f"__tvm_ffi_{name}", manifest_kernels) == name
        assert kernel_of(f"{name}_compute_", manifest_kernels) == name


def test_cli_json_and_table(artifact):
    runner = CliRunner()
    result = runner.invoke(main, ["profile", str(artifact), "--emulate", "--dim", "T=48", "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total"] == sum(r["instructions"] for r in data["rows"])
    assert {r["name"] for r in data["rows"] if r["where"] == "kernel"} == \
        {k["name"] for k in read_manifest(artifact)["kernels"]}
    table = runner.invoke(main, ["profile", str(artifact), "--emulate", "--dim", "T=48", "--runs", "1"])
    assert table.exit_code == 0, table.output
    assert "runtime/VM" in table.output and "total" in table.output
    header = next(ln for ln in table.output.splitlines() if ln.startswith("kernel "))
    assert header.rstrip().endswith("ONNX nodes")
    named = {r["name"]: r["onnx_nodes"] for r in data["rows"] if r["where"] == "kernel"}
    assert named == {k["name"]: [n["name"] for n in k["onnx_nodes"]] for k in read_manifest(artifact)["kernels"]}
    assert any(nodes[:1] == ["conv_Conv"] for nodes in named.values())
    kernel_total = sum(r["instructions"] for r in data["rows"] if r["where"] == "kernel")
    assert sum(data["by_onnx_op"].values()) == kernel_total and next(iter(data["by_onnx_op"])) == "Conv"
    assert "kernel instructions by ONNX op (each kernel under its first node's op): Conv " in table.output


def test_a_host_artifact_is_refused_in_one_line(tmp_path):
    onnx_path = tmp_path / "mm.onnx"
    onnx.save(qdq_models.qdq_matmul(), onnx_path)
    compile_model(onnx_path, tmp_path / "host", CompileConfig(target="host"))
    with pytest.raises(NativeqError, match="aarch64 artifacts only"):
        profile_artifact(tmp_path / "host", ProfileConfig(dims=DIMS, emulate=True))
    result = CliRunner().invoke(main, ["profile", str(tmp_path / "host"), "--emulate", "--dim", "T=48"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_threads_are_refused(artifact):
    with pytest.raises(NativeqError, match="one thread"):
        profile_emulated(artifact, ProfileConfig(dims=DIMS, threads=2, emulate=True))


def test_missing_plugin_compiler_is_one_line(artifact, monkeypatch):
    monkeypatch.setattr(emulate, "HOST_CC", ("nativeq-no-such-cc", "gcc"))
    result = CliRunner().invoke(main, ["profile", str(artifact), "--emulate", "--dim", "T=48"])
    assert result.exit_code != 0
    assert "nativeq-no-such-cc not found" in result.output and "Traceback" not in result.output


def test_the_plugin_counts_per_block_only_when_asked(artifact):
    inputs, _ = prepare_inputs(read_manifest(artifact), ProfileConfig(dims=DIMS))
    plugin = emulate.build_insn_plugin()
    plain = emulate.emulate_run(artifact, inputs, plugin=plugin)
    blocks = emulate.emulate_run(artifact, inputs, plugin=plugin, plugin_options=("tb=on",), maps=True)
    assert plain.plugin_log.splitlines()[0].startswith("insns ")
    assert not any(line.startswith("tb ") for line in plain.plugin_log.splitlines())
    lines = blocks.plugin_log.splitlines()
    assert lines[0].startswith("insns ")
    whole = int(lines[0].split()[1])
    per_block = sum(int(line.split()[2]) for line in lines if line.startswith("tb "))
    assert per_block == whole  # every executed block counted once, at its start address
    assert blocks.library in blocks.maps
    np.testing.assert_array_equal(plain.outputs[0], blocks.outputs[0])


# Two kernels, each handing an unnamed function (a parallel lambda, `.L` label: no symbol, as LLVM emits
# TVM's private functions) to an external launcher; the lambdas lie side by side and branch to labels of
# their own. Every address of a lambda belongs to the kernel that references it.
_TWO_LAMBDAS = """
    .text
    .p2align 2
.Llambda_a:
    mov w0, #1
    cbz w1, .La_end
    b .La_mid
    nop
.La_mid:
    add w0, w0, #1
    b .La_end
    nop
.La_end:
    ret
.Llambda_b:
    mov w0, #2
    b .Lb_done
    nop
.Lb_done:
    add w0, w0, #2
    ret
.Llambda_end:
    .globl kernel_a
    .type kernel_a, %function
kernel_a:
    adrp x0, .Llambda_a
    add x0, x0, :lo12:.Llambda_a
    b launch
    .size kernel_a, .-kernel_a
    .globl kernel_b
    .type kernel_b, %function
kernel_b:
    adrp x0, .Llambda_b
    add x0, x0, :lo12:.Llambda_b
    b launch
    .size kernel_b, .-kernel_b
"""


def test_unnamed_lambdas_side_by_side_count_to_the_kernel_that_launches_them(tmp_path):
    """A lambda's own branch targets are not functions: followed, the first lambda found (its range then
    reaching over its neighbour) claimed the second lambda's labels, and a QuartzNet profile gave one
    matmul kernel the instructions of five others."""
    import shutil
    import subprocess

    gcc = shutil.which("aarch64-linux-gnu-gcc")
    assert gcc, "aarch64-linux-gnu-gcc missing: apt-get install gcc-aarch64-linux-gnu"
    (tmp_path / "k.s").write_text(_TWO_LAMBDAS)
    library = tmp_path / "k.so"
    subprocess.run([gcc, "-shared", "-nostdlib", "-o", library, tmp_path / "k.s"], check=True)
    functions, _ = elf_functions(library)
    text_start = min(start for start, _, name in functions if name != "[model.so plt]")
    lambda_a = range(text_start, text_start + 8 * 4, 4)  # 8 instructions, then lambda_b's 5
    lambda_b = range(lambda_a.stop, lambda_a.stop + 5 * 4, 4)

    def owner(address):
        return next(name for start, end, name in functions if start <= address < end)

    assert [owner(a) for a in lambda_a] == ["kernel_a"] * 8
    assert [owner(a) for a in lambda_b] == ["kernel_b"] * 5
