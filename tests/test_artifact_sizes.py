"""Artifact size accounting (`compile/sizes.py`, manifest `sizes`) and debug stripping of `model.so`.

The model is a two-layer QDQ MatMul built here with onnx.helper, its sizes off the dot tile (K=30,
N=20 and K=20, N=36) so the packed weights are padded.
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile import sizes as sizes_mod
from nativeq.errors import NativeqError
from nativeq.targets import get_target

LAYERS = ((30, 20), (20, 36))  # (K, N) of each MatMul


def two_matmuls() -> onnx.ModelProto:
    """x[1, T, 30] -> Q/DQ -> MatMul(DQ(W1 int8 [30, 20])) -> Q/DQ -> MatMul(DQ(W2 int8 [20, 36])) -> Q/DQ -> y."""
    rng = np.random.default_rng(7)
    nodes, inits = [], []

    def q_dq(name, src, scale):
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"))
        inits.append(numpy_helper.from_array(np.array(0, np.int8), f"{name}_z"))
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
        return f"{name}_dq"

    x = q_dq("x", "x", 0.05)
    for i, (k, n) in enumerate(LAYERS):
        # every weight nonzero: nothing for a sparse format to drop
        wq = (rng.integers(1, 128, (k, n)) * rng.choice([-1, 1], (k, n))).astype(np.int8)
        inits.append(numpy_helper.from_array(wq, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.uniform(0.005, 0.01, n).astype(np.float32), f"w{i}_s"))
        inits.append(numpy_helper.from_array(np.zeros(n, np.int8), f"w{i}_z"))
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}", f"w{i}_s", f"w{i}_z"], [f"w{i}_dq"], axis=1))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}_dq"], [f"mm{i}"]))
        x = q_dq(f"y{i}", f"mm{i}", 0.1)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "two_matmuls",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", LAYERS[0][0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", LAYERS[-1][1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _stored_constant_bytes(mod) -> int:
    """Bytes of the distinct tensor constants of a Relax module, by numpy (independent of `sizes.constant_bytes`)."""
    from nativeq.compile._tvm import relax

    seen = {}

    def visit(expr):
        if sizes_mod.is_tensor_constant(expr):
            array = expr.value.numpy()
            seen[(array.dtype.str, array.shape, array.tobytes())] = array.nbytes

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sum(seen.values())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(onnx path, stripped artifact, the module the VM code generator was handed) for `host`."""
    import tvm.relax.vm_build as vm_build

    root = tmp_path_factory.mktemp("sizes")
    onnx.save(two_matmuls(), root / "two.onnx")
    handed = []
    original = vm_build._vmcodegen

    def recording(builder, mod, *args, **kwargs):
        handed.append(mod)
        return original(builder, mod, *args, **kwargs)

    vm_build._vmcodegen = recording
    try:
        compile_model(root / "two.onnx", root / "host", CompileConfig(target="host", use_tuning=False), progress=False)
    finally:
        vm_build._vmcodegen = original
    return root / "two.onnx", root / "host", handed[-1]


@pytest.fixture(scope="module")
def debug_build(built, tmp_path_factory):
    """The same model through `nativeq compile --debug --json` (a user's command line): (artifact, JSON)."""
    import subprocess

    out = tmp_path_factory.mktemp("sizes_debug") / "host-debug"
    exe = Path(sys.executable).with_name("nativeq")
    done = subprocess.run([str(exe), "compile", str(built[0]), "-t", "host", "-o", str(out), "--no-tuning", "--debug",
                           "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout)


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def test_library_is_stripped_by_default_and_debug_keeps_dwarf(built, debug_build):
    stripped = sizes_mod.elf_sections(built[1] / "model.so")
    assert not sizes_mod.debug_sections(stripped)
    assert any(s.name == ".text" for s in stripped)
    kept = sizes_mod.elf_sections(debug_build[0] / "model.so")
    assert {".debug_info", ".debug_line"} <= {s.name for s in sizes_mod.debug_sections(kept)}
    plain, debug = _manifest(built[1]), debug_build[1]["manifest"]
    assert plain["sizes"]["stripped"] and plain["sizes"]["debug_bytes"] == 0 and not plain["build"]["debug"]
    assert not debug["sizes"]["stripped"] and debug["sizes"]["debug_bytes"] > 0 and debug["build"]["debug"]
    assert plain["sizes"]["library_bytes"] == (built[1] / "model.so").stat().st_size
    assert plain["sizes"]["library_bytes"] < debug["sizes"]["library_bytes"]
    # the same machine code either way
    assert plain["sizes"]["code_bytes"] == debug["sizes"]["code_bytes"] > 0
    assert plain["sizes"]["weight_bytes"] == debug["sizes"]["weight_bytes"]


def test_stripped_and_debug_libraries_compute_bit_identical_outputs(built, debug_build):
    import nativeq

    feed = {"x": np.random.default_rng(0).normal(0, 1, (1, 50, LAYERS[0][0])).astype(np.float32)}
    got = nativeq.load(built[1]).run(feed)
    want = nativeq.load(debug_build[0]).run(feed)
    assert list(got) == list(want) == ["y"]
    assert got["y"].tobytes() == want["y"].tobytes()


def test_weight_bytes_are_the_constants_the_module_stores(built):
    manifest = _manifest(built[1])
    sizes = manifest["sizes"]
    assert sizes["weight_bytes"] == _stored_constant_bytes(built[2])
    # each layer's int8 weight is stored packed for the dot tile of the target: N and K padded
    intrin = {"avx512-vnni": (16, 4), "avx2": (8, 2), "neon": (4, 4), "sdot": (4, 4)}.get(get_target("host").int8)
    contractions = [k for k in manifest["kernels"] if k["kind"] == "contraction"]
    assert len(contractions) == len(LAYERS)
    if intrin is not None:
        lanes, kstep = intrin
        packed = sorted(-(-n // lanes) * lanes * -(-k // kstep) * kstep for k, n in LAYERS)
        # the rest a kernel reads: per-channel float32 vectors (scales, zero-point corrections) of its padded N
        for record, (k, n) in zip(sorted(contractions, key=lambda r: r["weight_bytes"]), sorted(LAYERS, key=lambda l: l[0] * l[1])):
            weight = -(-n // lanes) * lanes * -(-k // kstep) * kstep
            assert weight <= record["weight_bytes"] <= weight + 8 * 4 * -(-n // lanes) * lanes, record
        assert sum(k["weight_bytes"] for k in contractions) >= sum(packed)
    # every kernel record carries its bytes; the total counts each distinct constant once
    assert all(isinstance(k["weight_bytes"], int) for k in manifest["kernels"])
    assert sizes["weight_bytes"] <= sum(k["weight_bytes"] for k in manifest["kernels"])
    # sanity against the ONNX initializers: at least the int8 weights, at most a few times all of them
    model = onnx.load(str(built[0]))
    initializer_bytes = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    assert sum(k * n for k, n in LAYERS) <= sizes["weight_bytes"] <= 4 * initializer_bytes


def test_activation_arena_is_evaluated_at_the_kernel_report_sizes(built):
    manifest = _manifest(built[1])
    sizes = manifest["sizes"]
    assert sizes["arena_dims"] == manifest["kernel_dims"] == {"T": 64}
    assert "T" in sizes["arena_expr"]
    t = sizes["arena_dims"]["T"]
    assert sizes["arena_bytes"] > 0
    # at least the int8 activations planned between the layers, at most the float bound of every tensor
    assert sizes["arena_bytes"] >= t * LAYERS[0][0]
    bound = sum(term["coef"] * np.prod([t ** p for p in term["dims"].values()]) for term in manifest["memory"]["bytes"])
    assert sizes["arena_bytes"] <= bound


def test_arena_of_a_static_model_is_a_number_without_dims(tmp_path):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, x))
            z = bb.emit(relax.op.multiply(y, y))
            out = bb.emit_output(relax.op.add(z, x))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.ToNonDataflow(),
                                    relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory()])(bb.get())
    planned, expr, dims = sizes_mod.arena(mod, {})
    # two float32 [8, 16] intermediates live at once (the output is allocated apart, per call)
    assert (planned, expr, dims) == (2 * 8 * 16 * 4, None, {})


def test_a_waveform_model_is_reported_at_a_length_it_can_take(tmp_path):
    """A framing conv of 256 taps on a waveform of L samples has no output at the report's default L = 64 (its
    lengths, MACs and arena would be negative: the manifest used to be refused at load). The report takes the first
    of the larger sizes at which every contraction does work, for the MACs and the arena alike."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (16, 1, 256)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="frames", kernel_shape=[256], strides=[128])]
    graph = helper.make_graph(nodes, "framing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, "F"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "framing.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    manifest = result.manifest
    assert manifest["kernel_dims"] == manifest["sizes"]["arena_dims"] == {"L": 1024}
    assert manifest["sizes"]["arena_bytes"] >= 0
    frames = (1024 - 256) // 128 + 1
    contraction = [k for k in manifest["kernels"] if k["kind"] == "contraction"]
    assert len(contraction) == 1 and frames * 16 * 256 <= contraction[0]["macs"] < 2 * frames * 16 * 256  # rows padded to tiles
    import nativeq

    nativeq.load(tmp_path / "art")  # the manifest is valid


def test_compile_summary_prints_the_sizes(built):
    from nativeq.compile.api import CompileResult

    manifest = _manifest(built[1])
    line = next(l for l in CompileResult(built[1], manifest).summary().splitlines() if l.startswith("  sizes: "))
    assert line.startswith("  sizes: weights ") and ", code " in line and ", library " in line
    assert line.endswith("(T=64)") and "activation arena" in line and "debug" not in line
    assert sizes_mod.sizes_line({"weight_bytes": 620_000, "code_bytes": 410_000, "library_bytes": 1_100_000,
                                 "stripped": True, "arena_bytes": 350_000, "arena_dims": {"T": 300}}) == \
        "weights 0.62 MB, code 0.41 MB, library 1.10 MB, activation arena 0.35 MB (T=300)"


def test_cli_json_includes_the_sizes(debug_build):
    sizes = debug_build[1]["manifest"]["sizes"]
    assert {"weight_bytes", "code_bytes", "library_bytes", "arena_bytes", "arena_dims"} <= set(sizes)


def test_strip_debug_strips_a_debug_library_which_still_runs(built, debug_build, tmp_path):
    import nativeq
    from nativeq._fs import sha256_file

    if not sizes_mod.strip_tools(None):
        pytest.skip("no strip or objcopy on this machine")
    art = tmp_path / "art"
    shutil.copytree(debug_build[0], art)
    assert sizes_mod.strip_debug(art / "model.so") is True
    assert not sizes_mod.debug_sections(sizes_mod.elf_sections(art / "model.so"))
    # reseal the manifest over the new library and run it
    from nativeq.compile.artifact import write_manifest

    manifest = _manifest(art)
    manifest["files"]["model.so"] = sha256_file(art / "model.so")
    write_manifest(art, manifest)
    feed = {"x": np.random.default_rng(1).normal(0, 1, (1, 9, LAYERS[0][0])).astype(np.float32)}
    assert nativeq.load(art).run(feed)["y"].tobytes() == nativeq.load(built[1]).run(feed)["y"].tobytes()


def test_strip_debug_without_a_tool_warns_and_keeps_the_file(debug_build, tmp_path, monkeypatch):
    library = tmp_path / "model.so"
    shutil.copy(debug_build[0] / "model.so", library)
    before = library.read_bytes()
    monkeypatch.setattr(sizes_mod.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="keeps its debug sections: no tool to strip them"):
        assert sizes_mod.strip_debug(library) is False
    assert library.read_bytes() == before


def test_strip_tools_of_a_cross_target_are_its_triples(monkeypatch):
    monkeypatch.setattr(sizes_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert sizes_mod.strip_tools("aarch64-linux-gnu-g++")[0] == ["/usr/bin/aarch64-linux-gnu-strip", "--strip-debug"]
    assert sizes_mod.strip_tools(None)[0] == ["/usr/bin/strip", "--strip-debug"]


def test_elf_reader_refuses_other_files_in_one_line(tmp_path):
    (tmp_path / "x.so").write_bytes(b"not an elf file at all" * 4)
    with pytest.raises(NativeqError, match="is not an ELF file"):
        sizes_mod.elf_sections(tmp_path / "x.so")
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, 10_000)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)
    (tmp_path / "cut.so").write_bytes(bytes(header))
    with pytest.raises(NativeqError, match="truncated ELF"):
        sizes_mod.elf_sections(tmp_path / "cut.so")


def test_manifest_without_sizes_still_reads_and_bad_sizes_are_refused(built, tmp_path):
    from nativeq.compile.artifact import write_manifest
    from nativeq.runtime.manifest import read_manifest

    art = tmp_path / "art"
    shutil.copytree(built[1], art)
    manifest = _manifest(art)
    del manifest["sizes"]
    write_manifest(art, manifest)
    assert "sizes" not in read_manifest(art)
    manifest["sizes"] = {"weight_bytes": "many"}
    write_manifest(art, manifest)
    with pytest.raises(NativeqError, match="sizes.weight_bytes"):
        read_manifest(art)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross compiler")
def test_rpi5_library_is_stripped_too(built, tmp_path):
    compile_model(built[0], tmp_path / "rpi5", CompileConfig(target="rpi5", use_tuning=False), progress=False)
    library = tmp_path / "rpi5" / "model.so"
    data = library.read_bytes()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 18)[0] == 183  # EM_AARCH64
    sections = sizes_mod.elf_sections(library)
    assert not sizes_mod.debug_sections(sections)
    sizes = _manifest(tmp_path / "rpi5")["sizes"]
    assert sizes["stripped"] and sizes["code_bytes"] == sizes_mod.code_bytes(sections) > 0
    assert sizes["weight_bytes"] >= sum(k * n for k, n in LAYERS)


def test_demo_report_shows_artifact_sizes_next_to_stored_sizes():
    from nativeq.demo.report import ACCURACY_HEADER, accuracy_rows

    summary = {
        "float": {"wer": 0.2, "cer": 0.1, "stored_bytes": 8_000_000},
        "variants": {"int8": {"weight_bits": 8, "sparsity": "dense", "steps": 10, "wer": 0.21, "cer": 0.11,
                              "stored_bytes": 2_100_000, "fraction_of_float": 0.26},
                     "int4": {"weight_bits": 4, "sparsity": "dense", "steps": 10, "wer": 0.25, "cer": 0.12,
                              "stored_bytes": 1_100_000, "fraction_of_float": 0.14}},
        "artifacts": {"int8-host": {"variant": "int8", "target": "host", "weight_bytes": 2_190_000,
                                    "library_bytes": 2_650_000},
                      "int8-rpi5": {"variant": "int8", "target": "rpi5", "weight_bytes": 2_150_000,
                                    "library_bytes": 2_500_000},
                      "int4-host": {"variant": "int4", "target": "host"}},  # a summary from before sizes
        "bench": {"int8-host": {"variant": "int8", "compiled_wer": 0.22}},
    }
    rows = accuracy_rows(summary)
    assert all(len(row) == len(ACCURACY_HEADER) for row in rows)
    stored = ACCURACY_HEADER.index("stored MB")
    assert ACCURACY_HEADER[stored + 1:stored + 3] == ["compiled weights MB", "model.so MB"]
    by_name = {row[0]: row for row in rows}
    assert by_name["int8: this run"][stored:stored + 3] == ["2.10", "2.19 (host), 2.15 (rpi5)", "2.65 (host), 2.50 (rpi5)"]
    assert by_name["int4: this run"][stored:stored + 3] == ["1.10", "-", "-"]
    assert by_name["float (fp32)"][stored:stored + 3] == ["8.00", "-", "-"]
    assert by_name["int8: this run"][-1] == "22.0"

    # with a shipped model of a variant, its artifacts and compiled WER go to the shipped row
    summary["shipped"] = {"int8": {"name": "m-int8", "weight_bits": 8, "sparsity": "dense", "steps": 1200, "wer": 0.19,
                                   "cer": 0.09, "stored_bytes": 2_130_000, "fraction_of_float": 0.26}}
    for key in ("int8-host", "int8-rpi5"):
        summary["artifacts"][key]["model"] = "shipped"
    summary["bench"]["int8-host"]["model"] = "shipped"
    by_name = {row[0]: row for row in accuracy_rows(summary)}
    assert by_name["int8: shipped m-int8"][stored:stored + 3] == ["2.13", "2.19 (host), 2.15 (rpi5)",
                                                                  "2.65 (host), 2.50 (rpi5)"]
    assert by_name["int8: shipped m-int8"][-1] == "22.0"
    assert by_name["int8: this run"][stored + 1:stored + 3] == ["-", "-"] and by_name["int8: this run"][-1] == "-"
