"""A constant weight whose column blocks no full-rate register tile divides is packed with a few zero blocks more
(`intrinsics.padded_column_blocks`): on AVX-512 VNNI over a long reduction only; the kernel crops them and stays
exact against ONNX Runtime."""

import re

import numpy as np
import onnx
import pytest

from nativeq.compile.schedules.intrinsics import AVX2, SDOT, SDOT_LANES, VNNI, padded_column_blocks
from nativeq.targets import get_target, host_cpu_features

# (case, column blocks, k-steps, intrinsic, blocks packed)
PADDING_TABLE = [
    ("Wav2Letter 2000 columns: 3-wide tiles", 125, 2000, VNNI, 126),
    ("80 columns, K = 256: 3-wide", 5, 64, VNNI, 6),
    ("7 blocks: 4-wide", 7, 64, VNNI, 8),
    ("13 blocks: 2-wide", 13, 64, VNNI, 14),
    ("9 blocks: 3 divides", 9, 64, VNNI, 9),
    ("one block: a wider tile only adds work", 1, 2000, VNNI, 1),
    ("128 blocks: 4 divides", 128, 2000, VNNI, 128),
    ("short reduction (K = 252): the chains overlap", 5, 63, VNNI, 5),
    ("AVX2 adds with a 1-cycle vpaddd", 125, 4000, AVX2, 125),
    ("sdot keeps busy on 6 rows", 125, 2000, SDOT, 125),
    ("sdot lanes", 65, 64, SDOT_LANES, 65),
]


@pytest.mark.parametrize("case, n_blocks, k_steps, intrin, expected", PADDING_TABLE, ids=[r[0] for r in PADDING_TABLE])
def test_padded_column_blocks_table(case, n_blocks, k_steps, intrin, expected):
    assert padded_column_blocks(n_blocks, k_steps, intrin) == expected


def _packed_weight_blocks(mod) -> list[int]:
    """N/lanes of every packed int8 weight [N/lanes, K/kstep, lanes, kstep] an int8 matmul kernel of `mod` takes."""
    from nativeq.compile._tvm import tirx

    blocks = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and "int8_matmul" in gv.name_hint:
            dims = r"T\.int64\((\d+)\), T\.int64\(\d+\), T\.int64\(\d+\), T\.int64\(\d+\)"
            shapes = re.findall(r"T\.Buffer\(\(" + dims + r"\), \"int8\"\)", func.script())
            blocks += [int(n) for n in dict.fromkeys(shapes)]
    return blocks


@pytest.mark.parametrize("target_name, blocks", [("x86-avx512-vnni", 6), ("x86-avx2", 10), ("rpi5", 20)])
def test_a_weight_of_five_blocks_is_packed_for_the_target_and_equals_ort(target_name, blocks, tmp_path):
    """K = 256, N = 80: five blocks of 16 on VNNI are packed as six (3-wide tiles), the other targets keep theirs
    (80 / 8 and 80 / 4 lanes); compiled (where this CPU runs the code) it is 0 steps from ORT at two lengths."""
    pytest.importorskip("tvm")
    import qdq_models
    from kernel_rules import scheduled

    from nativeq.compile import CompileConfig, compile_model
    from nativeq.verify import VerifyConfig, verify_artifact

    model = qdq_models.qdq_matmul(k=256, n=80, act_dtype="uint8")
    rules, mod = scheduled(model, tmp_path, target_name)
    assert [v for name, v in rules.items() if "matmul" in name] == ["int8-matmul"], rules
    assert _packed_weight_blocks(mod) == [blocks]
    if not set(get_target(target_name).cpu_features) <= host_cpu_features():
        return
    onnx.save(model, tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "art", CompileConfig(target=target_name, use_tuning=False))
    for t in (37, 6):
        report = verify_artifact(tmp_path / "art", tmp_path / "m.onnx", VerifyConfig(dims={"T": t}, runs=2))
        assert report.passed and report.outputs[0].max_steps == 0, report.table()
        assert tuple(report.outputs[0].shape) == (1, t, 80)


def test_a_conv_with_2000_output_channels_runs_on_tiles_three_blocks_wide(tmp_path, monkeypatch):
    """The class Wav2Letter's convs belong to (C_out = 2000; K = 8000 in the real model, here 512): packed as 126
    blocks of 16, bit-identical to the build packed as 125, both within ORT's float rounding (1 step)."""
    pytest.importorskip("tvm")
    if get_target("host").int8 != "avx512-vnni":
        pytest.skip("AVX-512 VNNI host needed")
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from kernel_rules import scheduled
    from nativeq.compile import CompileConfig, compile_model
    from nativeq.compile.schedules import pack_weights
    from nativeq.runtime import load
    from nativeq.verify import VerifyConfig, verify_artifact

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.05, (2000, 64, 8)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[8], pads=[4, 4])
    relu = helper.make_node("Relu", ["c"], ["y"])
    graph = helper.make_graph([conv, relu], "wide_conv",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, "T"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2000, None])],
                              initializer=[weight])
    float_path, qdq_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), float_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": rng.normal(0, 1, (1, 64, 40)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    _, mod = scheduled(onnx.load(qdq_path), tmp_path)
    assert _packed_weight_blocks(mod) == [126]
    compile_model(qdq_path, tmp_path / "padded", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "padded", qdq_path, VerifyConfig(dims={"T": 45}, runs=2))
    assert report.passed and report.outputs[0].max_steps <= 1 and report.outputs[0].exact_pct > 99.9, report.table()

    monkeypatch.setattr(pack_weights, "padded_column_blocks", lambda n_blocks, k_steps, intrin: n_blocks)
    assert _packed_weight_blocks(scheduled(onnx.load(qdq_path), tmp_path)[1]) == [125]
    compile_model(qdq_path, tmp_path / "unpadded", CompileConfig(target="host", use_tuning=False))
    x = {"x": rng.normal(0, 1, (1, 64, 45)).astype(np.float32)}
    padded, unpadded = (load(tmp_path / name).run(x) for name in ("padded", "unpadded"))
    np.testing.assert_array_equal(np.asarray(padded["y"]), np.asarray(unpadded["y"]))
