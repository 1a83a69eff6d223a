"""Default CPU schedules: packed-weight int8 matmuls tensorized with the target's dot instruction.

Numerics are checked against numpy int64 (exact: the int32 accumulation must be bit-exact,
the requantize epilogue is the same float32 math as the reference), machine code by counting
instructions in the exported library.
"""

import shutil
import subprocess

import numpy as np
import pytest

from nativeq.targets import get_target, host_cpu_features

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from nativeq.compile.pipeline import compile_pipeline  # noqa: E402
from nativeq.compile.schedules import schedule_passes  # noqa: E402
from nativeq.compile.schedules.weight_formats import pack_weight  # noqa: E402

K, N = 128, 96


def _requant_module(w, bias, scale, rows, act_dtype="uint8"):
    """x[1, rows, K] (act_dtype) @ w[K, N] int8 -> +bias -> *scale -> round -> clip -> int8, as the int8 rewrite emits it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, rows, w.shape[0]), act_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(R.matmul(x, relax.const(w), out_dtype="int32"))
            acc = bb.emit(R.add(acc, relax.const(bias)))
            y = bb.emit(R.multiply(R.astype(acc, "float32"), relax.const(scale)))
            out = bb.emit_output(R.astype(R.clip(R.round(y), -128, 127), "int8"))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x, w, bias, scale):
    acc = x.astype(np.int64) @ w.astype(np.int64) + bias
    return np.clip(np.round(acc.astype(np.float32) * scale), -128, 127).astype(np.int8)


def _build(mod, target, tmp_path):
    """The project's compile pipeline; returns (VM executable, exported .so path, rule per PrimFunc)."""
    passes = compile_pipeline(target)
    ex = relax.build(mod, tvm.target.Target(target.tvm_dict(num_cores=1)), relax_pipeline=passes)
    lib = tmp_path / "lib.so"
    ex.export_library(str(lib))
    return ex, lib


def _fused(mod, target):
    """`mod` through the pipeline up to and including FuseTIR (the PrimFuncs the schedule rules see)."""
    seq = [p for p in compile_pipeline(target).passes]
    upto = next(i for i, p in enumerate(seq) if p.info.name == "FuseTIR") + 1
    return tvm.transform.Sequential(seq[:upto])(mod)


def _scheduled(mod, target):
    """`mod` through the pipeline up to and including FuseTIR, then nativeq's schedule passes: (the default schedule
    pass, module)."""
    *before, sched = schedule_passes(target)
    mod = _fused(mod, target)
    for schedule_pass in before:
        mod = schedule_pass(mod)
    return sched, sched(mod)


def _rules(mod, target):
    """Which nativeq rule schedules each PrimFunc of `mod` after legalization and fusion."""
    sched, _ = _scheduled(mod, target)
    return sched.applied


def _count(lib, mnemonic):
    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in asm.splitlines() if f"\t{mnemonic} " in line or line.rstrip().endswith(f"\t{mnemonic}"))


def _can_run(target):
    return set(target.cpu_features) <= host_cpu_features()


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")


def _random_layer(seed, k=K, n=N):
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)  # full range: catches 16-bit saturation
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    scale = (rng.random(n) * 2e-4 + 1e-5).astype(np.float32)
    return rng, w, bias, scale


def test_pack_weight_layout():
    w = np.arange(8 * 32, dtype=np.int64).reshape(8, 32).astype(np.int8)
    packed = pack_weight(w, lanes=16, kstep=4)
    assert packed.shape == (2, 2, 16, 4)
    for n0, k0, n1, k1 in np.ndindex(*packed.shape):
        assert packed[n0, k0, n1, k1] == w[k0 * 4 + k1, n0 * 16 + n1]


@needs_objdump
@pytest.mark.parametrize(
    "target_name, instruction, forbidden",
    [("x86-avx512-vnni", "vpdpbusd", None), ("x86-avx2", "vpmaddwd", "vpmaddubsw")],
)
def test_int8_matmul_symbolic_rows_exact_and_uses_dot_instruction(tmp_path, target_name, instruction, forbidden):
    target = get_target(target_name)
    rng, w, bias, scale = _random_layer(0)
    rows = tvm.tirx.Var("T", "int64")
    mod = _requant_module(w, bias, scale, rows)
    assert "int8-matmul" in _rules(mod, target).values()
    ex, lib = _build(mod, target, tmp_path)
    assert _count(lib, instruction) > 0
    if forbidden:
        assert _count(lib, forbidden) == 0, f"{forbidden} saturates for full-range uint8 x int8"
    if not _can_run(target):
        pytest.skip(f"this CPU cannot run {target_name} code")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for t in (50, 133):  # two lengths of the symbolic time axis
        x = rng.integers(0, 256, (1, t, K), dtype=np.uint8)
        x[0, 0] = 255  # worst case for a saturating int16 pair sum
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, w, bias, scale))


def test_int8_matmul_static_rows_register_tile_exact(tmp_path):
    target = get_target("host")
    if target.int8 not in ("avx512-vnni", "avx2"):
        pytest.skip("x86 host needed")
    rng, w, bias, scale = _random_layer(1)
    mod = _requant_module(w, bias, scale, 48)  # static rows: multi-row register tile
    ex, _ = _build(mod, target, tmp_path)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = rng.integers(0, 256, (1, 48, K), dtype=np.uint8)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, w, bias, scale))


def test_every_tunable_tile_is_exact(tmp_path, monkeypatch):
    """Each knob setting the tuner may pick (register tile, parallel order) computes the same exact
    result: static rows (3 row tiles of 6 padded from 16), N = 96 (6 column blocks of 16)."""
    from nativeq.compile.schedules import default_schedule, matmul
    from nativeq.compile.schedules.intrinsics import dot_intrin_for

    target = get_target("host")
    if target.int8 not in ("avx512-vnni", "avx2"):
        pytest.skip("x86 host needed")
    intrin = dot_intrin_for(target)
    rng, w, bias, scale = _random_layer(3)
    x = rng.integers(0, 256, (1, 16, K), dtype=np.uint8)
    choices = matmul.tile_choices(N // intrin.lanes, intrin)
    assert len(choices) >= 8
    for knobs in choices:
        applied = []

        def with_knobs(func, intrin, knobs=knobs, applied=applied):
            applied.append(knobs)
            return matmul.schedule_int8_matmul(func, intrin, knobs)

        monkeypatch.setattr(default_schedule, "schedule_int8_matmul", with_knobs)
        ex, _ = _build(_requant_module(w, bias, scale, 16), target, tmp_path)
        assert knobs in applied
        vm = relax.VirtualMachine(ex, tvm.cpu())
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, w, bias, scale),
                                      err_msg=knobs.as_text())


def test_odd_k_and_n_are_packed_with_zero_padding_and_float_ops_keep_correct_generic_schedules(tmp_path):
    """K=30 and N=20 are not multiples of the dot tile (4 x 16): zero weight rows and columns make them one,
    the kernel zero-pads x and crops the columns, and stays exact; the float ops around it get the generic rule."""
    target = get_target("host")
    rng, w, bias, scale = _random_layer(2, k=30, n=20)
    rows = tvm.tirx.Var("T", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, rows, 30), "uint8"))
    f = relax.Var("f", R.Tensor((1, rows, 20), "float32"))
    gamma = relax.const(rng.random(20).astype(np.float32))
    with bb.function("main", [x, f]):
        with bb.dataflow():
            acc = bb.emit(R.matmul(x, relax.const(w), out_dtype="int32"))
            y = bb.emit(R.multiply(R.astype(R.add(acc, relax.const(bias)), "float32"), relax.const(scale)))
            z = bb.emit(R.nn.softmax(R.add(y, f), axis=-1))
            ln = bb.emit(R.nn.layer_norm(z, gamma, gamma, axes=[-1]))
            tr = bb.emit(R.permute_dims(ln, [0, 2, 1]))
            out = bb.emit_output((acc, tr))
        bb.emit_func_output(out)
    mod = bb.get()
    rules = _rules(mod, target)
    assert "int8-matmul" in rules.values()
    assert "generic" in rules.values()
    ex, _ = _build(mod, target, tmp_path)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xa = rng.integers(0, 256, (1, 37, 30), dtype=np.uint8)
    fa = rng.standard_normal((1, 37, 20)).astype(np.float32)
    acc, tr = vm["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(fa))
    ref_acc = xa.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(acc.numpy(), ref_acc)
    y = (ref_acc + bias).astype(np.float32) * scale + fa
    e = np.exp(y - y.max(-1, keepdims=True))
    sm = e / e.sum(-1, keepdims=True)
    g = gamma.value.numpy()
    ln = (sm - sm.mean(-1, keepdims=True)) / np.sqrt(sm.var(-1, keepdims=True) + 1e-5) * g + g
    np.testing.assert_allclose(tr.numpy(), ln.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target_name, instruction, forbidden", [("rpi5", "sdot", None), ("rpi4", "smull", "sdot")])
def test_arm_int8_matmul_uses_target_dot_instruction(target_name, instruction, forbidden):
    """aarch64 code generation (no cross linker needed): sdot on the Pi 5, smull on the Pi 4 (no dotprod)."""
    target = get_target(target_name)
    _, w, _, _ = _random_layer(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, tvm.tirx.Var("T", "int64"), K), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(R.matmul(x, relax.const(w), out_dtype="int32"))
        bb.emit_func_output(out)
    ex = relax.build(bb.get(), tvm.target.Target(target.tvm_dict()), relax_pipeline=compile_pipeline(target))
    asm = "".join(m.inspect_source("asm") for m in ex.mod.imports if m.kind == "llvm")
    assert asm.count(f"{instruction}\t") > 0
    if forbidden:
        assert asm.count(f"{forbidden}\t") == 0, f"{forbidden} would SIGILL on {target_name}"


def test_erf_is_a_vectorizable_polynomial_and_accurate(tmp_path):
    """GELU's erf is MLAS's polynomial (no scalar libm `erff` call left), vectorized (packed FMAs, no scalar
    ones: a branch in the formula would scalarize the loop), within 1e-6 of the exact one."""
    import math

    target = get_target("host")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((tvm.tirx.Var("T", "int64"), 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(R.multiply(x, R.erf(x)))
        bb.emit_func_output(out)
    ex, lib = _build(bb.get(), target, tmp_path)
    if shutil.which("objdump"):
        assert "erff" not in subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
        assert _count(lib, "vfmadd213ps") + _count(lib, "vfmadd231ps") > 0
        assert _count(lib, "vfmadd213ss") + _count(lib, "vfmadd231ss") == 0
    xs = np.random.default_rng(4).normal(0, 2, (37, 64)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    expected = xs * np.vectorize(math.erf)(xs.astype(np.float64))
    np.testing.assert_allclose(got, expected, atol=1e-6 * 8, rtol=1e-6)


@pytest.mark.parametrize("k, n", [(64, 12), (30, 48), (21, 7)])
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_qdq_matmul_with_odd_k_or_n_is_tensorized_and_exact(k, n, act_dtype, tmp_path):
    """A 12-class head, K off the k-step: padded to the tile, on the int8 kernel, 0 steps from ORT."""
    import onnx
    import qdq_models
    from kernel_rules import schedule_rules

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.verify import VerifyConfig, verify_artifact

    model = qdq_models.qdq_matmul(k=k, n=n, act_dtype=act_dtype)
    rules = schedule_rules(model, tmp_path)
    assert [v for name, v in rules.items() if "matmul" in name] == ["int8-matmul"], rules
    onnx.save(model, tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(dims={"T": 37}, runs=2))
    assert report.passed and report.outputs[0].max_steps == 0, report.table()


@pytest.mark.parametrize("n", [1, 3])
def test_a_one_row_head_with_a_lookup_epilogue_is_tensorized_and_exact(n, tmp_path):
    """A classifier head on one pooled vector (a wake-word or VAD score: 1 row, N = 1 or 3 outputs) whose
    epilogue requantizes through a sigmoid table: its tile has one row and fewer columns than a vector, and
    the table is read at any index (not one entry per column): on the int8 kernel, 0 steps from ORT."""
    import onnx
    import qdq_models
    from kernel_rules import scheduled
    from onnx import helper

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.verify import VerifyConfig, verify_artifact

    model = qdq_models.qdq_matmul(k=128, n=n, t=1, act_dtype="uint8")
    graph = model.graph
    graph.node[-1].output[0] = "logit"  # the head's Identity -> a sigmoid, quantized
    nodes, inits = [helper.make_node("Sigmoid", ["logit"], ["score"], name="score")], []
    score = qdq_models._q_dq(nodes, inits, "score", "score", 1 / 256, "uint8")
    nodes.append(helper.make_node("Identity", [score], ["y"], name="y"))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    rules, mod = scheduled(model, tmp_path)
    assert [v for name, v in rules.items() if "matmul" in name] == ["int8-matmul"], rules
    onnx.save(model, tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(runs=3))
    assert report.passed and report.outputs[0].max_steps == 0, report.table()


@pytest.mark.parametrize("rows, parallel", [(1, False), (64, True)])
def test_a_dense_layer_on_one_row_runs_on_the_calling_thread(rows, parallel, tmp_path):
    """A wake-word model's dense layer on its one flattened window ([1, 1536] x [1536, 128], 197k multiply-adds:
    a few microseconds) is not worth a parallel launch (~3-4 us), though its register tile pads it to 6 rows; 64
    rows are."""
    import qdq_models
    from kernel_rules import scheduled

    rules, mod = scheduled(qdq_models.qdq_matmul(k=1536, n=128, t=rows, act_dtype="uint8"), tmp_path)
    (name,) = [name for name, rule in rules.items() if rule == "int8-matmul"]
    assert ("T.parallel" in mod[name].script()) == parallel


@pytest.mark.parametrize("n", [36, 48, "T"])
def test_float_batched_matmul_runs_on_the_packed_float_kernel(n, tmp_path):
    """Attention's float P·V ([B, H, T, T] x [B, H, T, 36], as `quantize_dynamic` leaves it): V packed at
    run time (zero padded to whole 16-column tiles when 16 does not divide 36, or when the column count is
    symbolic) and multiplied on the register-tiled kernel with the float multiply-add intrinsic."""
    target = get_target("host")
    rows = tvm.tirx.Var("T", "int64")
    cols = rows if n == "T" else n
    bb = relax.BlockBuilder()
    p = relax.Var("p", R.Tensor((1, 4, rows, rows), "float32"))
    v = relax.Var("v", R.Tensor((1, 4, rows, cols), "float32"))
    with bb.function("main", [p, v]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(R.matmul(p, v)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert set(_rules(mod, target).values()) == {"float-matmul", "float-pack"}
    ex, _ = _build(mod, target, tmp_path)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    length = 29
    pa = rng.standard_normal((1, 4, length, length)).astype(np.float32)
    va = rng.standard_normal((1, 4, length, length if n == "T" else n)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(pa), tvm.runtime.tensor(va)).numpy()
    np.testing.assert_allclose(got, pa.astype(np.float64) @ va.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_name", ["rpi5", "x86-avx512-vnni"])
def test_epilogue_copies_its_per_column_inputs_once_per_tile(target_name):
    """The requantize epilogue's per-column inputs (bias, scale) are copied onto the stack once per register tile,
    for the tile's columns only, before the tile's rows read them (read in place, LLVM reloads them for every row:
    it cannot prove the output stores leave them unchanged)."""
    target = get_target(target_name)
    _, w, bias, scale = _random_layer(5)
    mod = _requant_module(w, bias, scale, 48, act_dtype="int8" if target_name == "rpi5" else "uint8")
    _, scheduled = _scheduled(mod, target)
    (func,) = [f for gv, f in scheduled.functions_items() if "int8_matmul" in gv.name_hint]
    text = func.script()
    dots = text.index('T.sblock("nativeq_int8_matmul_update_o")')  # the tile's dot products, then its epilogue
    epilogue = text.index('T.sblock("compute')
    for name in ("param_1", "param_2"):  # bias, scale
        copy = text.index(f'T.sblock("{name}_local")')
        assert dots < copy < epilogue, text
        # the copy covers the tile's columns: one vector of nr * lanes, indexed by the tile
        loop = text.rindex("for ax0 in T.vectorized(", 0, copy)
        assert text[loop:copy].count("for ") == 1, text[loop:copy]


def _enclosing_loops(func, block_name: str) -> list:
    """The For loops around the first block named `block_name` in `func`, outermost first."""
    found = []

    def visit(stmt, loops):
        if isinstance(stmt, tvm.tirx.For):
            visit(stmt.body, loops + [stmt])
        elif isinstance(stmt, tvm.s_tir.SBlockRealize):
            if stmt.block.name_hint == block_name and not found:
                found.append(loops)
            visit(stmt.block.body, loops)
        elif isinstance(stmt, tvm.tirx.SeqStmt):
            for child in stmt.seq:
                visit(child, loops)
        elif hasattr(stmt, "body"):
            visit(stmt.body, loops)

    visit(func.body, [])
    return found[0] if found else []


@pytest.mark.parametrize("target_name, per_row_tile", [("rpi5", True), ("rpi4", True), ("x86-avx512-vnni", False)])
def test_padded_activation_rows_are_built_once_per_row_tile_on_arm(target_name, per_row_tile):
    """A matmul over a symbolic number of rows zero-pads each register tile's activation rows. On NEON they are
    built once per row tile, outside the loop over its column tiles (the parallel loop runs over row tiles: for
    N = 576, 72 column tiles share one copy); built per tile, the copy was a `memcpy` call per 6 x 8 tile (zoo
    Conformer on the Pi 5 core: 46.5 -> 42.7 M instructions). x86 keeps the fused row x column tile loop, which
    measured faster there."""
    from nativeq.compile._tvm import Analyzer
    from nativeq.compile.schedules.pack_weights import ROWS_PAD_BLOCK

    target = get_target(target_name)
    _, w, bias, scale = _random_layer(4, 144, 576)
    act_dtype = "uint8" if target_name.startswith("x86") else "int8"
    _, mod = _scheduled(_requant_module(w, bias, scale, tvm.tirx.Var("T", "int64"), act_dtype), target)
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    pad_loops = _enclosing_loops(func, ROWS_PAD_BLOCK)
    parallel = [loop for loop in pad_loops if loop.kind == tvm.tirx.ForKind.PARALLEL]
    assert len(parallel) == 1, pad_loops
    # the parallel loop's extent at T = 600: row tiles only, or row x column tiles
    analyzer = Analyzer()
    for var in tvm.tirx.analysis.undefined_vars(parallel[0].extent):
        analyzer.bind(var, tvm.tirx.const(600, "int64"))
    extent = analyzer.simplify(parallel[0].extent)
    mr = 4 if target_name == "rpi4" else 6
    row_tiles = -(-600 // mr)
    assert (int(extent) == row_tiles) if per_row_tile else (int(extent) > row_tiles), (int(extent), row_tiles)


@pytest.mark.parametrize("pruned", [False, True])
def test_every_tile_choice_of_the_k_lanes_kernel_schedules(pruned):
    """The Pi 4's kernel with k along the lanes (dense, and block-sparse with its listed-activation gather) takes
    every register tile the tuner may record, including one-row tiles (whose row loop TVM drops) and column
    tiles that do not divide a tile list's columns (the default tile then)."""
    from test_weight_formats import block_pruned

    from nativeq.compile.schedules.intrinsics import NEON_K_LANES, dot_intrin_for
    from nativeq.compile.schedules.matmul import (int8_matmul_n_blocks, is_int8_matmul, kernel_intrin,
                                                  schedule_int8_matmul, tile_choices)

    target = get_target("rpi4")
    rng, w, bias, scale = _random_layer(6, 576, 144)
    w = np.maximum(w, -127)  # no -128: the pair-sum form
    if pruned:
        w = block_pruned(w, 0.5, rng)
    mod = _requant_module(w, bias, scale, tvm.tirx.Var("T", "int64"), "int8")
    with tvm.target.Target(target.tvm_dict()):
        fused = _fused(mod, target)
        (func,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and is_int8_matmul(f)]
        intrin = dot_intrin_for(target)
        assert kernel_intrin(func, intrin) == NEON_K_LANES
        choices = tile_choices(int8_matmul_n_blocks(func, NEON_K_LANES), NEON_K_LANES)
        assert any(k.mr == 1 for k in choices) and any(k.nr > 1 for k in choices), choices
        failed = [k.as_text() for k in choices if schedule_int8_matmul(func, intrin, k) is None]
    assert not failed, failed
