"""int8 activation x activation matmuls (attention's Q.K^T and P.V) on the dot intrinsics, their int8 rhs
packed at run time (`compile/schedules/pack_activations.py`, `matmul.py`).

Bit-exactness is the requirement: int32 accumulators against numpy int64, a QDQ attention model against
ONNX Runtime with 0 steps of tolerance and against an exact numpy reference (power-of-two scales make the
float QDQ arithmetic exact, so ORT, numpy and the integer kernels must agree to the bit), and the whole
encoder against the build without the pass.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.targets import get_target, host_cpu_features

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from nativeq.compile import CompileConfig, compile_model  # noqa: E402
from nativeq.compile.onnx_import import import_onnx  # noqa: E402
from nativeq.compile.pipeline import compile_passes  # noqa: E402
from nativeq.compile.schedules.intrinsics import dot_intrin_for  # noqa: E402
from nativeq.compile.schedules.pack_activations import PackInt8Activations, pack_activation_te  # noqa: E402
from nativeq.compile.schedules.pack_weights import REDUCTION_BLOCK  # noqa: E402
from nativeq.compile.schedules.weight_formats import pack_weight  # noqa: E402
from nativeq.verify import VerifyConfig, verify_artifact  # noqa: E402

PACK_PASS = "nativeq.PackInt8Activations"


def _can_run(target) -> bool:
    return set(target.cpu_features) <= host_cpu_features()


def _passes(target, *, pack: bool = True, upto: str | None = None) -> list:
    """The compile pipeline for `target`, without the activation packing when `pack` is False, cut after `upto`."""
    passes = [p for p in compile_passes(target) if pack or p.info.name != PACK_PASS]
    if upto is not None:
        passes = passes[: [p.info.name for p in passes].index(upto) + 1]
    return passes


def _scheduled(mod, target, pack: bool = True):
    """({PrimFunc name: rule of the default schedules that scheduled it}, PrimFuncs packed at run time)."""
    passes = _passes(target, pack=pack, upto="nativeq.DefaultCpuSchedule")
    with tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(passes[:-1])(mod)
        packed = _packed_at_run_time(fused)  # before scheduling renames the blocks
        passes[-1](fused)
    return passes[-1].applied, packed


def _packed_at_run_time(mod) -> list[str]:
    """PrimFuncs whose int8 matmul block reads a packed operand with batch dims (one packed matrix per batch entry)."""
    names = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = tvm.s_tir.Schedule(func)
        try:
            block = sch.get_sblock(REDUCTION_BLOCK)
        except Exception:  # noqa: BLE001  (no such block)
            continue
        loops = len(sch.get_loops(block))  # batch..., rows, N, K
        if any(len(r.source.shape) == loops + 1 > 4 for r in sch.get(block).reads):
            names.append(gvar.name_hint)
    return names


def test_pack_activation_layout_is_the_weight_layout_zero_padded():
    """pack_activation_te == pack_weight per batch entry, with K and N zero-padded to whole tiles."""
    lanes, kstep, (b, k, n) = 16, 4, (3, 30, 20)
    w = np.random.default_rng(0).integers(-128, 128, (b, k, n), dtype=np.int8)
    wt = tvm.te.placeholder((b, k, n), "int8", name="w")
    func = tvm.te.create_prim_func([wt, pack_activation_te(wt, lanes, kstep)])
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((b, 2, 8, lanes, kstep), np.int8))
    lib["main"](tvm.runtime.tensor(w), out)
    padded = np.zeros((b, 32, 32), np.int8)
    padded[:, :k, :n] = w
    np.testing.assert_array_equal(out.numpy(), np.stack([pack_weight(p, lanes, kstep) for p in padded]))


# lhs [..., M, K] (activation dtype) x rhs [..., K, N] int8; "T" is the symbolic time axis.
SHAPES = {
    "q_kt": ((1, 4, "T", 36), (1, 4, 36, "T")),  # attention scores: N symbolic
    "p_v": ((1, 3, "T", "T"), (1, 3, "T", 20)),  # attention context: K symbolic, N not a multiple of 16
    "odd": ((3, "T", 30), (3, 30, 20)),  # K, N multiples of neither 4 nor 16
    "shared_rhs": ((2, "T", 30), (30, "T")),  # one rhs for every batch entry
    "rhs_fewer_batch_axes": ((2, 3, "T", 24), (3, 24, "T")),  # a relative-position table [H, dk, P], broadcast
    "rhs_unit_batch_axis": ((2, 3, "T", 24), (1, 3, 24, 40)),  # over the queries' batch
}


def _product_module(lhs_shape, rhs_shape, act_dtype):
    t = tvm.tirx.Var("T", "int64")
    sym = lambda shape: tuple(t if d == "T" else d for d in shape)  # noqa: E731
    bb = relax.BlockBuilder()
    a = relax.Var("a", R.Tensor(sym(lhs_shape), act_dtype))
    b = relax.Var("b", R.Tensor(sym(rhs_shape), "int8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(R.matmul(a, b, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("target_name", ["x86-avx512-vnni", "x86-avx2"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_int32_accumulators_exact_on_the_dot_kernel(case, target_name):
    target = get_target(target_name)
    if not _can_run(target):
        pytest.skip(f"this CPU cannot run {target_name} code")
    lhs_shape, rhs_shape = SHAPES[case]
    mod = _product_module(lhs_shape, rhs_shape, "uint8")
    rules, _ = _scheduled(mod, target)
    assert sorted(rules.values()) == ["int8-matmul", "int8-pack"], rules
    ex = relax.build(mod, tvm.target.Target(target.tvm_dict(num_cores=1)),
                     relax_pipeline=tvm.transform.Sequential(_passes(target)))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(list(SHAPES).index(case))
    for t in (1, 6, 37, 64):
        size = lambda shape: tuple(t if d == "T" else d for d in shape)  # noqa: E731
        a = rng.integers(0, 256, size(lhs_shape), dtype=np.uint8)
        b = rng.integers(-128, 128, size(rhs_shape), dtype=np.int8)
        a.reshape(-1)[: a.shape[-1]] = 255  # a full row of 255 x a full column of -128: the extreme sums
        b[..., 0] = -128
        got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
        np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


# --- a QDQ attention model: scores = Q.K^T, context = P.V, uint8 activations, non-zero zero points ---
HEADS, DK, DV = 3, 30, 20
# power-of-two scales: the float QDQ graph (ORT, numpy) is exact, so every backend must agree to the bit
QP = {"q": (2.0**-5, 120), "k": (2.0**-5, 131), "s": (2.0**-2, 125), "v": (2.0**-5, 140), "y": (4.0, 128)}


def attention_products_model(t: int | str = "T") -> onnx.ModelProto:
    """q[1,H,T,30], k[1,H,T,30] (transposed in the graph), v[1,H,T,20] -> Q/DQ -> P=QDQ(Q.K^T) -> QDQ(P.V) -> y;
    `t` a static length instead of the symbolic T (a model exported without dynamic axes)."""
    nodes, inits = [], []

    def qdq(src, name):
        scale, zp = QP[name]
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"))
        inits.append(numpy_helper.from_array(np.array(zp, np.uint8), f"{name}_z"))
        nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
        return f"{name}_dq"

    q, k, v = qdq("q_in", "q"), qdq("k_in", "k"), qdq("v_in", "v")
    nodes.append(helper.make_node("Transpose", [k], ["k_t"], perm=[0, 1, 3, 2]))
    nodes.append(helper.make_node("MatMul", [q, "k_t"], ["scores"]))
    p = qdq("scores", "s")
    nodes.append(helper.make_node("MatMul", [p, v], ["context"]))
    y = qdq("context", "y")
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(
        nodes, "attention_products",
        [helper.make_tensor_value_info("q_in", TensorProto.FLOAT, [1, HEADS, t, DK]),
         helper.make_tensor_value_info("k_in", TensorProto.FLOAT, [1, HEADS, t, DK]),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, HEADS, t, DV])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HEADS, t, DV])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantize(x, name):
    scale, zp = QP[name]
    return np.clip(np.rint(x.astype(np.float64) / scale) + zp, 0, 255).astype(np.int64) - zp  # centered


def attention_reference(q_in, k_in, v_in) -> np.ndarray:
    """The model in exact integer arithmetic (int64 matmuls; power-of-two rescales are exact in float64)."""
    q, k, v = _quantize(q_in, "q"), _quantize(k_in, "k"), _quantize(v_in, "v")
    scores = q @ k.transpose(0, 1, 3, 2)
    p = _quantize(scores * (QP["q"][0] * QP["k"][0]), "s")
    context = p @ v
    return (_quantize(context * (QP["s"][0] * QP["v"][0]), "y") * QP["y"][0]).astype(np.float32)


def _inputs(t: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ranges = {name: ((0 - zp) * s, (255 - zp) * s) for name, (s, zp) in QP.items()}
    return {f"{n}_in": rng.uniform(*ranges[n], (1, HEADS, t, DK if n != "v" else DV)).astype(np.float32)
            for n in ("q", "k", "v")}


@pytest.fixture(scope="module")
def attention_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("attention") / "attention.onnx"
    onnx.save(attention_products_model(), path)
    return path


def test_both_attention_products_are_packed():
    model = import_onnx(attention_products_model())
    target = get_target("x86-avx512-vnni")
    packer = PackInt8Activations(dot_intrin_for(target))
    passes = [*_passes(target, upto="nativeq.PackInt8Weights"), packer]
    tvm.transform.Sequential(passes)(model)
    assert packer.packed == 2


def test_attention_model_matches_ort_and_int64_reference_exactly(attention_onnx, tmp_path):
    from nativeq.runtime import load

    artifact = tmp_path / "host"
    compile_model(attention_onnx, artifact, CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(artifact, attention_onnx, VerifyConfig(runs=2, dims={"T": 37}, tol_steps=0))
    assert report.passed, report.table()
    (out,) = report.outputs
    assert out.max_steps == 0.0 and out.exact_pct == 100.0
    model = load(artifact)
    for t in (1, 5, 37, 64):
        inputs = _inputs(t, seed=t)
        ref = attention_reference(**inputs)
        assert len(np.unique(ref)) > 20  # not a saturated, constant output
        np.testing.assert_array_equal(model.run(inputs)["y"], ref)


def test_encoder_attention_matmuls_become_packed_dot_kernels():
    """ORT-quantized encoder (2 blocks): its 4 attention matmuls run on packed, tensorized kernels (3: the blocks'
    P·V share one; Q·Kᵀ, [B, H, T, T], keeps its requantize constants baked in, one per block)."""
    import qdq_models

    target = get_target("x86-avx512-vnni")
    mod = import_onnx(qdq_models.ort_quantized_encoder("uint8"))
    rules, packed = _scheduled(mod, target)
    assert len(packed) == 3, packed
    assert all(rules[name] == "int8-matmul" for name in packed), {n: rules[n] for n in packed}
    assert sum(rule == "int8-pack" for rule in rules.values()) >= 2  # the K and V packs (identical ones may be shared)
    assert not [name for name in rules if "matmul" in name and "int8_matmul_packed" not in name]
    before_rules, before = _scheduled(mod, target, pack=False)
    assert before == []
    kernels = lambda names: sum("int8_matmul_packed" in name for name in names)  # noqa: E731
    assert kernels(rules) == kernels(before_rules) + 3


def _vpdpbusd(lib) -> int:
    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in asm.splitlines() if "\tvpdpbusd " in line)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_encoder_host_library_more_vpdpbusd_and_bit_identical_to_the_unpacked_build(tmp_path):
    import qdq_models

    target = get_target("host")
    if target.int8 != "avx512-vnni":
        pytest.skip("needs an AVX-512 VNNI host")
    mod = import_onnx(qdq_models.ort_quantized_encoder("uint8"))
    tvm_target = tvm.target.Target(target.tvm_dict(num_cores=1))
    libs, vms = {}, {}
    for pack in (False, True):
        with tvm.transform.PassContext(opt_level=3):
            ex = relax.build(mod, tvm_target, relax_pipeline=tvm.transform.Sequential(_passes(target, pack=pack)))
        libs[pack] = tmp_path / f"encoder_{pack}.so"
        ex.export_library(str(libs[pack]))
        vms[pack] = relax.VirtualMachine(ex, tvm.cpu())
    before, after = _vpdpbusd(libs[False]), _vpdpbusd(libs[True])
    print(f"vpdpbusd: {before} without run-time packing, {after} with")
    assert after > before
    for t in (1, 9, 48, 130):
        feats = np.random.default_rng(t).normal(0, 1, (1, t, 80)).astype(np.float32)
        outs = [vms[pack]["main"](tvm.runtime.tensor(feats)).numpy() for pack in (False, True)]
        np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.arm
def test_rpi5_sdot_build_matches_reference_under_qemu(attention_onnx, tmp_path):
    from nativeq.runtime.emulate import run_emulated

    artifact = tmp_path / "rpi5"
    compile_model(attention_onnx, artifact, CompileConfig(target="rpi5", use_tuning=False))
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:  # both products (and nothing else here) run on sdot
        asm = subprocess.run([objdump, "-d", str(artifact / "model.so")], capture_output=True, text=True,
                             check=True).stdout
        assert sum(1 for line in asm.splitlines() if "\tsdot\t" in line) > 0
    for t in (1, 37):
        inputs = _inputs(t, seed=100 + t)
        (got,) = run_emulated(artifact, inputs)
        np.testing.assert_array_equal(got, attention_reference(**inputs))


@pytest.mark.arm
def test_rpi4_build_matches_reference_under_qemu(attention_onnx, tmp_path):
    """On the Pi 4 both attention products (Q·Kᵀ with N = T on whole padded tiles, P·V with K = T) run on the kernel
    with k along the lanes in its form for any int8 operands (`smull` + `smull2`, each widened by `sadalp`, no int16
    pair sums: both operands may be -128). Every output equals the int64 reference."""
    from disassembly import aarch64_disassembly

    from nativeq.runtime.emulate import run_emulated

    artifact = tmp_path / "rpi4"
    compile_model(attention_onnx, artifact, CompileConfig(target="rpi4", use_tuning=False))
    lines = aarch64_disassembly(artifact).splitlines()
    assert any("\tsmull2\t" in line and ".8h," in line for line in lines)
    assert not any(("\tsmlal2\t" in line or "\tsmlal\t" in line) and ".8h," in line for line in lines)
    for t in (1, 37):
        inputs = _inputs(t, seed=200 + t)
        (got,) = run_emulated(artifact, inputs, cpu="cortex-a72")
        np.testing.assert_array_equal(got, attention_reference(**inputs))


@pytest.mark.arm
def test_run_time_k_rows_are_copied_by_a_split_loop_on_arm(attention_onnx, tmp_path, monkeypatch):
    """P·V's activation rows (K = T, known at run time) are copied into the zero-padded tile rows by a loop that
    LoopPartition splits where the length check holds (`generic.split_off_guards`): vector code on NEON. The same
    build with the copy left whole (byte by byte, the check in the loop) runs more instructions per inference;
    both equal the exact integer reference."""
    from nativeq.compile.schedules import matmul
    from nativeq.runtime.emulate import count_instructions, run_emulated

    split, whole = tmp_path / "split", tmp_path / "whole"
    compile_model(attention_onnx, split, CompileConfig(target="rpi5", use_tuning=False))
    monkeypatch.setattr(matmul, "split_off_guards", lambda sch, loop: None)
    compile_model(attention_onnx, whole, CompileConfig(target="rpi5", use_tuning=False))
    inputs = _inputs(96, seed=7)
    for artifact in (split, whole):
        np.testing.assert_array_equal(run_emulated(artifact, inputs)[0], attention_reference(**inputs))
    counts = {name: count_instructions(artifact, inputs, repeat=2).per_inference
              for name, artifact in (("split", split), ("whole", whole))}
    assert counts["split"] < 0.95 * counts["whole"], counts


def _blocks_text(func) -> dict[str, str]:
    """Block name -> its text in the TVMScript of `func` (up to the next block)."""
    parts = func.script().split('with T.sblock("')[1:]
    return {part.split('"', 1)[0]: part for part in parts}


def _writes(text: str) -> str:
    return text.split("T.writes(", 1)[1].split(")", 1)[0] if "T.writes(" in text else ""


@pytest.mark.parametrize("target_name", ["x86-avx512-vnni", "rpi4"])
def test_symbolic_n_epilogue_runs_on_whole_tiles_then_crops(target_name):
    """Q·Kᵀ has N = T (symbolic): its epilogue runs unpredicated on whole 16-lane tiles into a padded
    buffer, and a plain copy crops it (a lane predicate would scalarize the epilogue). P·V (N = the
    head size, static) keeps its epilogue in the tile directly. The same on the Pi 4, whose kernel with k along
    the lanes adds each output's partial sums per tile (an `rfactor` write-back) before the padded epilogue."""
    target = get_target(target_name)
    passes = _passes(target, upto="nativeq.DefaultCpuSchedule")
    with tvm.transform.PassContext(opt_level=3):
        scheduled = tvm.transform.Sequential(passes)(import_onnx(attention_products_model()))
    kernels = [_blocks_text(func) for gvar, func in scheduled.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and "int8_matmul_packed" in gvar.name_hint]
    assert len(kernels) == 2
    padded = [{name: text for name, text in blocks.items() if "_pad[" in _writes(text) and name != "nativeq_int8_rows_pad"}
              for blocks in kernels]
    with_padding = [i for i, writers in enumerate(padded) if writers]
    assert len(with_padding) == 1, "exactly one product (Q·Kᵀ) has a symbolic N"
    blocks, writers = kernels[with_padding[0]], padded[with_padding[0]]
    epilogue = [name for name in writers if not name.endswith("_pad") and name not in ("nativeq_int8_rows_pad",)]
    assert epilogue and all("T.where" not in writers[name] for name in epilogue), epilogue
    crops = [name for name, text in blocks.items() if name.endswith("_pad") and "_pad[" in text.split("T.reads(", 1)[1]
             and "_pad[" not in _writes(text)]
    assert crops, "no crop from the padded buffer"
    assert ("nativeq_int8_matmul_rf_update_o" in blocks) == (target_name == "rpi4"), sorted(blocks)


STATIC_T = 50  # no multiple of the 16 (x86) or 4 (Pi) columns of a tile: both products' N padded by the packing


@pytest.mark.parametrize("target_name", ["x86-avx512-vnni", "rpi4"])
def test_static_ragged_n_epilogue_runs_on_whole_tiles_then_crops(target_name):
    """A static-length model (exported without dynamic axes): Q·Kᵀ's N = T = 50 and P·V's N = 20 are static but no
    multiple of the tile's columns, which the run-time packing pads. Each epilogue runs unpredicated on whole tiles
    into a padded buffer that a copy crops, as for a symbolic N: with the last tile's lane predicate TVM scalarized
    every tile's epilogue (a static-length Conformer's Q·Kᵀ at T = 200: 0.31 ms per call, 0.14 ms now)."""
    target = get_target(target_name)
    passes = _passes(target, upto="nativeq.DefaultCpuSchedule")
    with tvm.transform.PassContext(opt_level=3):
        scheduled = tvm.transform.Sequential(passes)(import_onnx(attention_products_model(STATIC_T)))
    kernels = [_blocks_text(func) for gvar, func in scheduled.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and "int8_matmul_packed" in gvar.name_hint]
    assert len(kernels) == 2
    # N = 50 fills no whole tile on either target; N = 20 does on the Pi 4 (4 columns a tile), not on x86 (16)
    ragged = 2 if target_name.startswith("x86") else 1
    padded_epilogues = 0
    for blocks in kernels:
        padded = {name: text for name, text in blocks.items() if "_pad[" in _writes(text) and not name.endswith("_pad")}
        epilogue = [name for name in padded if name != "nativeq_int8_rows_pad"]
        if not epilogue:
            continue
        padded_epilogues += 1
        assert all("T.where" not in padded[name] for name in epilogue), epilogue
        crops = [name for name, text in blocks.items() if name.endswith("_pad") and "_pad[" in text.split("T.reads(", 1)[1]
                 and "_pad[" not in _writes(text)]
        assert crops, "no crop from the padded buffer"
    assert padded_epilogues == ragged


def test_static_length_attention_matches_the_int64_reference_exactly(tmp_path):
    from nativeq.runtime import load

    path = tmp_path / "attention_static.onnx"
    onnx.save(attention_products_model(STATIC_T), path)
    compile_model(path, tmp_path / "host", CompileConfig(target="host", use_tuning=False))
    inputs = _inputs(STATIC_T, seed=3)
    ref = attention_reference(**inputs)
    assert len(np.unique(ref)) > 20
    np.testing.assert_array_equal(load(tmp_path / "host").run(inputs)["y"], ref)


def test_int8_attention_on_a_sliced_time_axis_compiles_and_matches_onnxruntime(tmp_path):
    """Q, K, V on every second frame (a Slice with step 2 along T): LegalizeOps writes the sliced length as another
    expression of T than the one inferred when the pack of Kᵀ was built; the pack is rebuilt after LegalizeOps
    (`passes/repack_after_legalize.py`), where FuseTIR used to stop with "Inconsistent buffers"."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from test_float_kernels import _float_attention

    class Calibration(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{n: rng.standard_normal((1, 4, 40, 36)).astype(np.float32) for n in "qkv"}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    onnx.save(_float_attention(time_step=2), tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Softmax", "Transpose", "Slice"])
    result = compile_model(tmp_path / "qdq.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False),
                           progress=False)
    assert {k["schedule"] for k in result.kernels if k["kind"] == "contraction"} == {"int8 tensorized"}
    for frames in (45, 200):
        report = verify_artifact(tmp_path / "art", tmp_path / "qdq.onnx", VerifyConfig(dims={"T": frames}, accept_ties=True))
        assert report.passed, report.table()


def _scores_plus_bias_module():
    """acc = uint8 Q [1, 4, T, 36] . int8 Kᵀ [1, 4, 36, T] (int32), + a float32 [1, 4, T, T] term (relative-position
    scores, a mask) in the epilogue: N = T symbolic, a tile-shaped side input."""
    t = tvm.tirx.Var("T", "int64")
    bb = relax.BlockBuilder()
    q = relax.Var("q", R.Tensor((1, 4, t, 36), "uint8"))
    kt = relax.Var("kt", R.Tensor((1, 4, 36, t), "int8"))
    bias = relax.Var("bias", R.Tensor((1, 4, t, t), "float32"))
    with bb.function("main", [q, kt, bias]):
        with bb.dataflow():
            acc = bb.emit(R.matmul(q, kt, out_dtype="int32"))
            out = bb.emit_output(R.add(R.multiply(R.astype(acc, "float32"), R.const(0.125, "float32")), bias))
        bb.emit_func_output(out)
    return bb.get()


def test_symbolic_n_epilogue_rows_unrolled_and_side_input_copied_by_vectors():
    """The padded epilogue reads its accumulator tile row by row in an unrolled loop (the tile stays in registers),
    and the tile-shaped side input's zero-padded copy is one vector per row, in a loop LoopPartition splits into
    the whole column tiles and the last (its per-lane guard would scalarize the vector); values exact."""
    target = get_target("x86-avx512-vnni")
    if not _can_run(target):
        pytest.skip("this CPU cannot run x86-avx512-vnni code")
    mod = _scores_plus_bias_module()
    passes = _passes(target, upto="nativeq.DefaultCpuSchedule")
    with tvm.transform.PassContext(opt_level=3):
        scheduled = tvm.transform.Sequential(passes)(mod)
    [text] = [func.script() for gvar, func in scheduled.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and "int8_matmul_packed" in gvar.name_hint]
    lines = text.splitlines()
    side = next(i for i, line in enumerate(lines) if 'T.sblock("bias_pad")' in line)
    assert "T.vectorized(T.int64(16))" in lines[side - 1], lines[side - 3:side + 1]
    assert "pragma_loop_partition_hint" in "".join(lines[side - 3:side]), lines[side - 3:side + 1]
    matmul = next(i for i, line in enumerate(lines) if "nativeq_int8_matmul_update_o" in line)
    epilogue = next(i for i in range(matmul + 1, len(lines)) if "with T.sblock(" in lines[i])
    assert "T.unroll(T.int64(6))" in lines[epilogue - 2], lines[epilogue - 2:epilogue + 1]
    ex = relax.build(mod, tvm.target.Target(target.tvm_dict(num_cores=1)),
                     relax_pipeline=tvm.transform.Sequential(_passes(target)))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(3)
    for t in (5, 16, 37):
        q = rng.integers(0, 256, (1, 4, t, 36), dtype=np.uint8)
        kt = rng.integers(-128, 128, (1, 4, 36, t), dtype=np.int8)
        bias = rng.standard_normal((1, 4, t, t)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(kt), tvm.runtime.tensor(bias)).numpy()
        want = (q.astype(np.int64) @ kt.astype(np.int64)).astype(np.float32) * np.float32(0.125) + bias
        np.testing.assert_array_equal(got, want)
