"""Compressed weight formats (`compile/schedules/weight_formats.py`): 4-bit packed and block-sparse int8
matmul weights, chosen from the values, unpacked and skipped inside the kernel.

Three layers of proof: the formats themselves (pack -> unpack is the identity, the choice follows the
values), the x86 kernels (tensorized, bit-identical to exact integer math, fewer weight bytes), and
whole QDQ models on every target (x86 natively, rpi4/rpi5 under qemu): the compressed build's output
equals the dense 8-bit build's bit for bit and ONNX Runtime's within one quantization step.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativeq.compile.schedules.weight_formats import (
    SPARSE_MAX_DENSITY,
    pack_for_kernel,
    pack_int4_pairs,
    to_int4,
    unpack_int4_pairs,
    unpack_to_dense,
    with_wider_tiles,
)

BAND, STEP = 16, 4  # the kernel-friendly block: 16 outputs x 4 inputs


def block_pruned(w: np.ndarray, sparsity: float, rng) -> np.ndarray:
    """`w` [K, N] with round(sparsity * K/4) blocks of 4 inputs zeroed in every band of 16 outputs (balanced)."""
    w = w.copy()
    k_blocks = -(-w.shape[0] // STEP)
    for band in range(0, w.shape[1], BAND):
        for block in rng.permutation(k_blocks)[:int(round(sparsity * k_blocks))]:
            w[block * STEP:(block + 1) * STEP, band:band + BAND] = 0
    return w


def two_of_four(w: np.ndarray) -> np.ndarray:
    """`w` [K, N] with the 2 smallest of every 4 consecutive inputs zeroed (2:4 along K)."""
    w = w.copy()
    for start in range(0, w.shape[0] - w.shape[0] % 4, 4):
        group = w[start:start + 4]
        smallest = np.argsort(np.abs(group.astype(int)), axis=0)[:2]
        np.put_along_axis(group, smallest, 0, axis=0)
    return w


def _random(shape, bits, rng):
    high = 2 ** (bits - 1)
    return rng.integers(-high, high, shape, dtype=np.int8)


# ---------------------------------------------------------------------------------------------------------
# the formats: which one the values select, and that packing loses nothing

# (case, K, N, bits, pruning, expected format) -- lanes x kstep = 16 x 4 (VNNI) unless noted
FORMAT_TABLE = [
    ("int8 dense", 128, 96, 8, None, "int8 dense"),
    ("int4 dense", 128, 96, 4, None, "int4 dense"),
    ("int4 ragged K and N", 130, 99, 4, None, "int4 dense"),
    ("int8 blocks 75%", 128, 96, 8, ("blocks", 0.75), "int8 block-sparse 25%"),
    ("int4 blocks 50%", 128, 96, 4, ("blocks", 0.5), "int4 block-sparse 50%"),
    ("int8 blocks 87.5%, ragged", 130, 99, 8, ("blocks", 0.875), "int8 block-sparse 12%"),
    ("int8 blocks 20%: not worth it", 128, 96, 8, ("blocks", 0.2), "int8 dense"),
    ("int8 2:4: no zero tile", 128, 96, 8, ("2:4", None), "int8 dense"),
    ("int4 2:4: no zero tile", 128, 96, 4, ("2:4", None), "int4 dense"),
]


@pytest.mark.parametrize("case, k, n, bits, pruning, expected", FORMAT_TABLE, ids=[row[0] for row in FORMAT_TABLE])
def test_format_follows_the_values_and_round_trips(case, k, n, bits, pruning, expected):
    rng = np.random.default_rng(len(case))
    w = _random((k, n), bits, rng)
    if pruning and pruning[0] == "blocks":
        w = block_pruned(w, pruning[1], rng)
    elif pruning:
        w = two_of_four(w)
    packed = pack_for_kernel(w, lanes=16, kstep=4)
    assert packed.format_name() == expected
    padded_k = -(-k // 4) * 4
    np.testing.assert_array_equal(unpack_to_dense(packed), np.pad(w, ((0, padded_k - k), (0, 0))))
    dense_bytes = -(-n // 16) * 16 * padded_k
    assert packed.nbytes <= dense_bytes
    if bits == 4:
        assert packed.values.nbytes <= dense_bytes * packed.density / 2 + 16 * 4 * -(-n // 16)  # + one odd tile


def test_int4_pairs_table():
    """Low nibble = even tile, high nibble = odd tile, sign-extended; an odd count pads with zero."""
    tiles = np.array([-8, 7, -1, 0, 3], np.int8).reshape(1, 5, 1, 1)
    packed = pack_int4_pairs(tiles)
    assert packed.shape == (1, 3, 1, 1)
    assert [int(b) & 0xFF for b in packed.ravel()] == [0x78, 0x0F, 0x03]
    np.testing.assert_array_equal(unpack_int4_pairs(packed, 5), tiles)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_pairs(np.array([8], np.int8).reshape(1, 1, 1, 1))


def test_unbalanced_blocks_are_padded_to_the_longest_list():
    rng = np.random.default_rng(3)
    w = block_pruned(_random((128, 32), 8, rng), 0.75, rng)
    w[:40, 16:] = 1  # the second band keeps 10 of 32 tiles at least, the first 8
    packed = pack_for_kernel(w, lanes=16, kstep=4)
    assert packed.blocks is not None and packed.tiles == int((np.abs(w[:, 16:]).reshape(32, 4, 16).sum((1, 2)) > 0).sum())
    np.testing.assert_array_equal(unpack_to_dense(packed), w)


def test_arm_tiles_share_one_list_per_16_columns_of_a_16x4_pruned_weight():
    """ARM tiles are 4 x 4: a 16 x 4 block pattern gives four column blocks the same list (one activation
    broadcast per listed k-step for the register tile); independent 4 x 4 blocks keep one list each."""
    rng = np.random.default_rng(5)
    w = block_pruned(_random((128, 64), 8, rng), 0.75, rng)
    packed = pack_for_kernel(w, lanes=4, kstep=4)
    assert packed.group == 4 and packed.blocks.shape == (64 // 16, 8)
    np.testing.assert_array_equal(unpack_to_dense(packed), w)
    w4 = _random((128, 64), 8, rng)
    for band in range(0, 64, 4):  # 4-column bands pruned independently
        for block in rng.permutation(32)[:24]:
            w4[block * 4:(block + 1) * 4, band:band + 4] = 0
    packed = pack_for_kernel(w4, lanes=4, kstep=4)
    assert packed.group == 1 and packed.blocks.shape == (16, 8)
    np.testing.assert_array_equal(unpack_to_dense(packed), w4)


@pytest.mark.parametrize("k, n, sparsity, bits", [(144, 64, 0.5, 8), (130, 40, 0.75, 8), (576, 144, 0.5, 4)])
def test_listed_blocks_join_into_wider_tiles_and_round_trip(k, n, sparsity, bits):
    """The Pi 4's kernel with k along the lanes reads 16 listed inputs per weight vector: the 4 x 4 tiles of a
    block-sparse weight are joined four at a time (each list padded with zero tiles to a multiple of 4), the
    listed unit stays 4, and the weight it stands for is unchanged (8-bit and 4-bit; N = 40 shares lists by 8
    columns)."""
    rng = np.random.default_rng(k + n)
    w = block_pruned(_random((k, n), bits, rng), sparsity, rng)
    packed = pack_for_kernel(w, lanes=4, kstep=4, allow_int4=False)
    wide = with_wider_tiles(packed, 16)
    listed = packed.blocks.shape[1]
    assert (wide.kstep, wide.list_unit, wide.group) == (16, 4, packed.group)
    assert wide.blocks.shape[1] == -(-listed // 4) * 4 and wide.tiles == wide.blocks.shape[1] // 4
    assert wide.values.shape == (packed.values.shape[0], wide.tiles, 4, 16)
    padded_k = -(-k // 4) * 4
    np.testing.assert_array_equal(unpack_to_dense(wide), np.pad(w, ((0, padded_k - k), (0, 0))))
    if bits == 4:
        np.testing.assert_array_equal(unpack_to_dense(to_int4(wide)), unpack_to_dense(wide))
    with pytest.raises(ValueError, match="block-sparse"):
        with_wider_tiles(pack_for_kernel(w, lanes=4, kstep=4, allow_sparse=False), 16)


def test_density_threshold_is_the_documented_one():
    rng = np.random.default_rng(4)
    k_blocks = 32
    kept_at_threshold = int(SPARSE_MAX_DENSITY * k_blocks)
    w = block_pruned(_random((128, 16), 8, rng), 1 - kept_at_threshold / k_blocks, rng)
    assert pack_for_kernel(w, 16, 4).blocks is not None
    w = block_pruned(_random((128, 16), 8, rng), 1 - (kept_at_threshold + 1) / k_blocks, rng)
    assert pack_for_kernel(w, 16, 4).blocks is None


# ---------------------------------------------------------------------------------------------------------
# x86 kernels: tensorized, exact, smaller

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from nativeq.targets import get_target, host_cpu_features  # noqa: E402
from test_schedules import _build, _count, _reference, _requant_module, _rules, needs_objdump  # noqa: E402

KERNEL_TABLE = [  # (case, K, N, bits, block sparsity or None)
    ("int4 dense", 128, 96, 4, None),
    ("int4 dense ragged", 130, 99, 4, None),
    ("int8 sparse 75%", 128, 96, 8, 0.75),
    ("int8 sparse 50% ragged", 130, 99, 8, 0.5),
    ("int4 sparse 87.5% ragged", 134, 100, 4, 0.875),
]


@needs_objdump
@pytest.mark.parametrize("target_name, instruction", [("x86-avx512-vnni", "vpdpbusd"), ("x86-avx2", "vpmaddwd")])
@pytest.mark.parametrize("case, k, n, bits, sparsity", KERNEL_TABLE, ids=[row[0] for row in KERNEL_TABLE])
def test_compressed_kernel_is_tensorized_and_exact(tmp_path, target_name, instruction, case, k, n, bits, sparsity):
    target = get_target(target_name)
    rng = np.random.default_rng(k * n + bits)
    w = _random((k, n), bits, rng)
    if sparsity is not None:
        w = block_pruned(w, sparsity, rng)
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    scale = (rng.random(n) * 2e-4 + 1e-5).astype(np.float32)
    mod = _requant_module(w, bias, scale, tvm.tirx.Var("T", "int64"))
    assert list(_rules(mod, target).values()) == ["int8-matmul"]
    ex, lib = _build(mod, target, tmp_path)
    assert _count(lib, instruction) > 0
    if not set(target.cpu_features) <= host_cpu_features():
        pytest.skip(f"this CPU cannot run {target_name} code")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for t in (1, 50, 133):
        x = rng.integers(0, 256, (1, t, k), dtype=np.uint8)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, w, bias, scale))


# ---------------------------------------------------------------------------------------------------------
# whole models on every target: compressed == dense bit for bit, and == ORT within one step

OUT_SCALE = 0.1


def _weight(inits, nodes, name, wq: np.ndarray, int4: bool):
    """wq [K, N] behind a per-column DequantizeLinear (an INT4 initializer when `int4`)."""
    k, n = wq.shape
    scale = np.random.default_rng(n).uniform(0.01, 0.03, n).astype(np.float32)
    if int4:
        inits.append(helper.make_tensor(f"{name}_wq", TensorProto.INT4, [k, n], wq.flatten().tolist()))
        inits.append(helper.make_tensor(f"{name}_wzp", TensorProto.INT4, [n], [0] * n))
    else:
        inits.append(numpy_helper.from_array(wq, f"{name}_wq"))
        inits.append(numpy_helper.from_array(np.zeros(n, np.int8), f"{name}_wzp"))
    inits.append(numpy_helper.from_array(scale, f"{name}_ws"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws", f"{name}_wzp"], [f"{name}_w"], axis=1))
    return f"{name}_w"


def _qdq(nodes, inits, name, src, scale):
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
    return f"{name}_dq"


def compressed_layers_model(seed: int = 0) -> onnx.ModelProto:
    """x[1, T, 130] -> int4 blocks 75% (130 -> 99) -> int8 blocks 50% (99 -> 64) -> int8 2:4 (64 -> 40) -> y,
    every layer requantized to int8 (ragged K and N on purpose)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = _qdq(nodes, inits, "x", "x", 0.05)
    layers = [("fc1", 130, 99, 4, "blocks", 0.75), ("fc2", 99, 64, 8, "blocks", 0.5), ("fc3", 64, 40, 8, "2:4", None)]
    for name, k, n, bits, pattern, sparsity in layers:
        wq = _random((k, n), bits, rng)
        wq = block_pruned(wq, sparsity, rng) if pattern == "blocks" else two_of_four(wq)
        w = _weight(inits, nodes, name, wq, int4=bits == 4)
        nodes.append(helper.make_node("MatMul", [h, w], [f"{name}_mm"]))
        h = _qdq(nodes, inits, f"{name}_out", f"{name}_mm", OUT_SCALE if name == "fc3" else 0.2)
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, "compressed_layers",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 130])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 40])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _compile(onnx_path, out, target, compressed: bool):
    from nativeq.compile import CompileConfig, compile_model

    compile_model(onnx_path, out, CompileConfig(target=target, dense_weights=not compressed))
    return out


def _check(run, onnx_path, t):
    from nativeq.verify.api import ort_session

    x = np.random.default_rng(t).normal(0, 1.5, (1, t, 130)).astype(np.float32)
    compressed, dense = run("compressed", x), run("dense", x)
    np.testing.assert_array_equal(compressed, dense)
    (ref,) = ort_session(onnx_path, "disable").run(None, {"x": x})
    steps = np.abs(compressed - ref) / OUT_SCALE
    assert steps.max() <= 1.0 + 1e-4 and (steps < 1e-3).mean() >= 0.99
    assert np.abs(ref).max() > 10 * OUT_SCALE


@pytest.fixture(scope="module")
def compressed_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("formats") / "compressed.onnx"
    onnx.save(compressed_layers_model(), path)
    return path


def test_compressed_model_on_host_equals_dense_build_and_ort(compressed_model, tmp_path):
    import json

    import nativeq

    builds = {name: _compile(compressed_model, tmp_path / name, "host", name == "compressed")
              for name in ("compressed", "dense")}
    models = {name: nativeq.load(path) for name, path in builds.items()}
    for t in (1, 37, 200):
        _check(lambda name, x: models[name].run({"x": x})["y"], compressed_model, t)
    sizes = {name: (path / json.loads((path / "manifest.json").read_text())["library"]).stat().st_size
             for name, path in builds.items()}
    assert sizes["compressed"] < sizes["dense"]


@pytest.mark.arm
@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_compressed_model_under_qemu_equals_dense_build_and_ort(compressed_model, tmp_path, target):
    from kernel_rules import schedule_rules
    from nativeq.runtime.emulate import run_emulated

    rules = schedule_rules(onnx.load(compressed_model), tmp_path, target)
    assert sum(rule == "int8-matmul" for rule in rules.values()) == 3, rules
    builds = {name: _compile(compressed_model, tmp_path / name, target, name == "compressed")
              for name in ("compressed", "dense")}
    _check(lambda name, x: run_emulated(builds[name], {"x": x})[0], compressed_model, 45)

