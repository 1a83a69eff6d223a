"""int8 convs channels-last (compile/schedules/channels_last.py): full convs as im2col + the packed
int8 matmul (conv_as_matmul.py), depthwise convs as their own kernel (depthwise.py).

Numbers: every case compiled for `host` and checked against ONNX Runtime (0 steps). Structure:
after the pipeline's kernel passes, a full conv is one `int8_matmul_packed` kernel gathering its rows
from the conv's input where the channels fill whole vectors, else an `im2col` + `int8_matmul_packed`
pair (a 1x1 conv without im2col), a depthwise conv an `int8_depthwise` kernel, no conv is left, and no
transpose stands between consecutive convs.
"""

from __future__ import annotations

import re

import kernel_rules
import numpy as np
import onnx
import pytest
import qdq_models
from kernel_rules import schedule_rules
from onnx import helper

from nativeq.compile import CompileConfig, compile_model
from nativeq.compile.api import import_model
from nativeq.compile.passes.int8 import int8_passes
from nativeq.compile.schedules import kernel_relax_passes
from nativeq.compile._tvm import TVMTarget, relax, tvm
from nativeq.targets import get_target
from nativeq.verify import VerifyConfig, verify_artifact


def _dilated_conv1d() -> onnx.ModelProto:
    model = qdq_models.qdq_conv1d(c_in=16, c_out=32, kernel=3, act_dtype="uint8")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [3]), helper.make_attribute("pads", [2, 2]),
                           helper.make_attribute("dilations", [2])])
    return model


CASES = {
    "conv1d-u8": (lambda: qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=3, act_dtype="uint8"), {"T": 57}),
    "conv1d-s8-stride2-k15": (lambda: qdq_models.qdq_conv1d(c_in=5, c_out=16, kernel=3, stride=2, act_dtype="int8"),
                              {"T": 41}),  # reduction 5*3 = 15: padded to the k-step
    "conv1d-subsampling": (lambda: qdq_models.qdq_conv1d(c_in=80, c_out=144, kernel=3, stride=2, act_dtype="uint8"),
                           {"T": 200}),
    "conv1d-dilated": (_dilated_conv1d, {"T": 33}),
    "conv2d-stride2": (lambda: qdq_models.qdq_conv2d(c_in=8, c_out=16, kernel=3, stride=2, act_dtype="uint8"), {}),
    "conv2d-k27": (lambda: qdq_models.qdq_conv2d(c_in=3, c_out=32, kernel=3, stride=1, h=13, w=9,
                                                 act_dtype="int8"), {}),
    # depthwise-separable blocks: depthwise (zero-point padding folded in) + Relu + 1x1 conv
    "separable1d-k33": (lambda: qdq_models.qdq_separable_block(1, channels=64, kernel=33, residual=False), {"T": 70}),
    "separable1d-s8-c24": (lambda: qdq_models.qdq_separable_block(1, channels=24, kernel=5, act_dtype="int8",
                                                                  residual=False), {"T": 19}),  # 8-lane vectors
    "separable1d-stride2-dilated": (lambda: qdq_models.qdq_separable_block(1, channels=32, kernel=3, stride=2,
                                                                           dilation=2), {"T": 41}),
    "separable2d-dscnn": (lambda: qdq_models.qdq_separable_block(2, channels=64, kernel=3, spatial=(25, 5),
                                                                 residual=False), {}),
    "separable1d-valid-k7": (lambda: qdq_models.qdq_separable_block(1, channels=48, kernel=7, same=False),
                             {"T": 45}),  # no padding: the last block of 4 positions reads clamped rows
    "separable1d-valid-k5-T12": (lambda: qdq_models.qdq_separable_block(1, channels=32, kernel=5, same=False),
                                 {"T": 12}),
    "separable2d-stride2": (lambda: qdq_models.qdq_separable_block(2, channels=16, kernel=3, stride=2,
                                                                   spatial=(13, 9), act_dtype="int8"), {}),
    # depthwise register blocks of 6 and 3 output columns (a width 4 does not divide), and 4 with a crop (7)
    "separable2d-w6": (lambda: qdq_models.qdq_separable_block(2, channels=32, kernel=3, spatial=(10, 6),
                                                              residual=False), {}),
    "separable2d-w7": (lambda: qdq_models.qdq_separable_block(2, channels=32, kernel=3, spatial=(8, 7),
                                                              residual=False), {}),
    "separable2d-w3-s8": (lambda: qdq_models.qdq_separable_block(2, channels=32, kernel=3, spatial=(12, 3),
                                                                 act_dtype="int8", residual=False), {}),
    # grouped convs (1 < groups < channels): one im2col + matmul per group; wav2vec2's positional conv shape (16
    # groups, a long odd kernel), int8 activations and ragged per-group widths
    "grouped1d-g4": (lambda: qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=5, groups=4, act_dtype="uint8"),
                     {"T": 37}),
    "grouped1d-g16-k31-s8": (lambda: qdq_models.qdq_conv1d(c_in=64, c_out=64, kernel=31, groups=16, act_dtype="int8"),
                             {"T": 45}),
    "grouped1d-g2-stride2": (lambda: qdq_models.qdq_conv1d(c_in=24, c_out=10, kernel=3, groups=2, stride=2,
                                                           act_dtype="uint8"), {"T": 29}),
    # x86 VNNI: 4 taps per `vpdpbusd` lane (kernels of 8 taps and more): ragged tap groups, stride, dilation,
    # no padding, 2-D, a symbolic length the register blocks crop
    "quad-taps-1d-k15-stride2-dilated": (lambda: qdq_models.qdq_separable_block(1, channels=32, kernel=15, stride=2,
                                                                                dilation=2), {"T": 53}),
    "quad-taps-1d-valid-k9": (lambda: qdq_models.qdq_separable_block(1, channels=16, kernel=9, same=False),
                              {"T": 30}),
    "quad-taps-2d-k9": (lambda: qdq_models.qdq_separable_block(2, channels=16, kernel=9, spatial=(11, 13),
                                                               residual=False), {}),
}


@pytest.mark.parametrize("last, positions", [(5, 5), (6, 6), (3, 3), (7, 4), (8, 4), (12, 4), (10, 5), (1, 4)])
def test_depthwise_register_block_divides_a_static_last_axis(last, positions):
    """Output positions per depthwise register block: 4, or for a static width 4 does not divide the first of 5, 6,
    3 that does (DS-CNN's 5 columns computed as 5, not 8 cropped to 5); 4 with a crop otherwise."""
    from nativeq.compile.schedules.depthwise import positions_for

    assert positions_for(last) == positions
    assert positions_for(tvm.tirx.Var("T", "int64")) == 4


@pytest.mark.parametrize("name", list(CASES))
def test_conv_as_matmul_matches_onnxruntime(name, tmp_path):
    builder, dims = CASES[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(builder(), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps == 0 and out.exact_pct == 100.0, report.table()


@pytest.mark.parametrize("ndim, spatial, dims", [(1, ("T",), {"T": 70}), (2, (25, 5), {})])
def test_separable_block_with_residual_add_matches_onnxruntime(ndim, spatial, dims, tmp_path):
    """The residual add of two dequantized tensors is float math on both sides. NOTE: its scales (0.05,
    0.1, 0.12) put many sums exactly on a rounding tie; LLVM contracts a dequantize's multiply into the
    add (an FMA) where ORT rounds each step, so a tie may go the other way: at most 1 step, on < 1%."""
    path = tmp_path / "m.onnx"
    onnx.save(qdq_models.qdq_separable_block(ndim, channels=64, kernel=5, spatial=spatial), path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps <= 1 + 1e-4 and out.exact_pct >= 99.0, report.table()


def _kernel_level(model: onnx.ModelProto, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    target = get_target("host")
    mod = import_model(model, path)
    with TVMTarget(target.tvm_dict()):
        passes = [*int8_passes(target), *kernel_relax_passes(target), relax.transform.LegalizeOps(),
                  relax.transform.FoldConstant()]
        return tvm.transform.Sequential(passes)(mod)


def _primfunc_names(mod) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if not isinstance(f, relax.Function)]


@pytest.mark.parametrize("c_in, implicit", [(32, True), (16, True), (8, False), (5, False)])
def test_int8_conv_becomes_a_packed_matmul_reading_its_input_or_im2col_and_packed_matmul(c_in, implicit, tmp_path):
    """A conv whose input channels fill whole 16-byte vectors is one packed matmul kernel reading the conv's
    channels-last input [N, T, C] itself (its im2col dropped); fewer channels keep the im2col kernel, whose
    [N, T, taps x C] rows the matmul reads."""
    mod = _kernel_level(qdq_models.qdq_conv1d(c_in=c_in, c_out=48, act_dtype="uint8"), tmp_path)
    names = _primfunc_names(mod)
    assert any(n.startswith("im2col") for n in names) != implicit, names
    (lhs,) = [binding.value.args[1].fields[0] for block in mod["main"].body.blocks for binding in block.bindings
              if isinstance(binding.value, relax.Call) and binding.value.op == tvm.ir.Op.get("relax.call_tir")
              and binding.value.args[0].name_hint.startswith("int8_matmul_packed")]
    assert int(lhs.ty.shape.values[-1]) == (c_in if implicit else -(-3 * c_in // 4) * 4), lhs.ty
    assert not any("conv1d" in n for n in names), names


IMPLICIT_CASES = {
    # 48 channels: a 16-byte vector is a third of a tap; 2 column tiles of 48; 117 rows (not whole 6-row tiles)
    "conv2d-c48-two-column-tiles": ("host", lambda: qdq_models.qdq_conv2d(c_in=48, c_out=96, h=13, w=9, stride=1,
                                                                          act_dtype="uint8"), {}),
    # symbolic rows (T/2 x 5), stride 2, zero-point padding on every side
    "conv2d-c16-stride2-symbolic": ("host", lambda: qdq_models.qdq_conv2d(c_in=16, c_out=32, h="T", w=10,
                                                                          act_dtype="uint8"), {"T": 23}),
    "conv1d-c32-stride2-s8": ("host", lambda: qdq_models.qdq_conv1d(c_in=32, c_out=48, kernel=5, stride=2,
                                                                    act_dtype="int8"), {"T": 41}),
    # a grouped conv: each group's 16 channels (a slice of the input) gathered by its own matmul
    "grouped1d-g4-c16": ("host", lambda: qdq_models.qdq_conv1d(c_in=64, c_out=32, kernel=5, groups=4,
                                                               act_dtype="uint8"), {"T": 29}),
    "conv2d-rpi4": ("rpi4", lambda: qdq_models.qdq_conv2d(c_in=16, c_out=32, h="T", w=10, act_dtype="int8"),
                    {"T": 23}),
    "conv2d-rpi5": ("rpi5", lambda: qdq_models.qdq_conv2d(c_in=48, c_out=32, h="T", w=7, stride=1,
                                                          act_dtype="int8"), {"T": 11}),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.arm) if IMPLICIT_CASES[n][0] != "host" else n
                                  for n in IMPLICIT_CASES])
def test_conv_rows_are_gathered_inside_the_matmul_kernel(name, tmp_path):
    """An implicit im2col: no im2col kernel and no [rows, taps x C] buffer; the matmul kernel gathers a register
    tile's rows (each tap a contiguous copy of C channels, zero-point padded at the borders) into a stack buffer,
    inside its parallel loop over row tiles and before the tile's dot products, once for all its column tiles.
    The outputs equal ONNX Runtime's (x86 natively, the Pis under qemu)."""
    from nativeq.compile.schedules.conv_as_matmul import IM2COL_CHANNELS
    from nativeq.compile.schedules.pack_weights import ROWS_PAD_BLOCK, REDUCTION_BLOCK

    target_name, build, dims = IMPLICIT_CASES[name]
    model = build()
    rules, scheduled = kernel_rules.scheduled(model, tmp_path, target_name)
    assert not any("im2col" in n for n in rules), rules
    matmuls = [n for n in rules if "int8_matmul_packed" in n]
    assert matmuls and all(rules[n] == "int8-matmul" for n in matmuls), rules
    for kernel in matmuls:
        text = scheduled[kernel].script()
        assert IM2COL_CHANNELS in text, text
        assert f'{ROWS_PAD_BLOCK}_local = T.sblock_alloc_buffer' in text, text  # on the stack
        parallel = text.index("T.parallel(")
        assert parallel < text.index(f'T.sblock("{ROWS_PAD_BLOCK}")') < text.index(f'T.sblock("{REDUCTION_BLOCK}_update')
        assert text.count(f'T.sblock("{ROWS_PAD_BLOCK}")') == 1
        # the parallel loop is over row tiles only: the column tiles run inside it, after the rows are built
        column_loop = re.search(r"for i2_0 in range\(", text)
        assert column_loop is None or text.index(f'T.sblock("{ROWS_PAD_BLOCK}")') < column_loop.start(), text
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target=target_name, use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps == 0 and out.exact_pct == 100.0, report.table()


def test_depthwise_conv_becomes_the_depthwise_kernel(tmp_path):
    model = qdq_models.qdq_conv1d(c_in=32, c_out=32, groups=32, kernel=15, act_dtype="uint8")
    names = _primfunc_names(_kernel_level(model, tmp_path))
    assert any(n.startswith("int8_depthwise") for n in names), names
    assert not any("conv1d" in n or n.startswith("im2col") for n in names), names


def _static_model_matches_onnxruntime_exactly(model: onnx.ModelProto, tmp_path) -> None:
    path = tmp_path / "static.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    out = verify_artifact(tmp_path / "art", path, VerifyConfig(runs=2)).outputs[0]
    assert out.max_steps == 0 and out.exact_pct == 100.0


def test_static_length_depthwise_interleaves_its_taps_in_a_kernel_of_its_own(tmp_path):
    """A static-length (exported without dynamic axes) depthwise conv of 15 taps, which AVX-512 VNNI multiplies 4 taps
    per `vpdpbusd` lane from its input interleaved into words of 4 neighbouring taps: the interleave stays a kernel of
    its own, apart from the quantize + transpose that produce its input (fused into it, every word recomputed that
    chain for each of its 4 taps: a static-length Conformer's conv module took 0.17 ms, 0.045 ms apart). The block
    still matches ONNX Runtime exactly."""
    model = qdq_models.qdq_separable_block(1, channels=64, kernel=15, spatial=(70,), residual=False)
    rules = kernel_rules.schedule_rules(model, tmp_path, target="x86-avx512-vnni")
    interleaves = [name for name in rules if "interleave_taps" in name]
    assert interleaves and all(name.startswith("interleave_taps") for name in interleaves), sorted(rules)
    _static_model_matches_onnxruntime_exactly(model, tmp_path)


@pytest.mark.parametrize("ndim", [1, 2])
def test_separable_block_has_no_transpose_between_convs(ndim, tmp_path):
    """The depthwise result feeds the 1x1 conv channels-last: the only transposes left are the graph's
    input and output ones (the ONNX model is channels first), the depthwise kernel reads one padded
    channels-last copy of its input (a kernel of its own in 1-D, a stage of the depthwise kernel in 2-D) and
    the 1x1 conv reads its input without im2col."""
    spatial = ("T",) if ndim == 1 else (25, 5)
    mod = _kernel_level(qdq_models.qdq_separable_block(ndim, channels=32, kernel=3, spatial=spatial), tmp_path)
    main = mod["main"].script()
    # one to channels-last after the input quantize, one back for the residual add with the input
    assert main.count("R.call_tir(transpose") == 2, main
    names = _primfunc_names(mod)
    assert not any(n.startswith("im2col") for n in names), names
    assert main.count("R.call_tir(pad") == (1 if ndim == 1 else 0), main
    assert any(n.startswith("int8_depthwise") for n in names) and any(n.startswith("int8_matmul_packed") for n in names)


@pytest.mark.parametrize("target_name, act_dtype, spatial, dims", [
    ("host", "uint8", (25, 5), {}),
    ("host", "uint8", ("T", 12), {"T": 23}),
    pytest.param("rpi5", "int8", ("T", 12), {"T": 23}, marks=pytest.mark.arm),
])
def test_2d_depthwise_pads_each_row_of_outputs_inputs_inside_its_kernel(target_name, act_dtype, spatial, dims,
                                                                        tmp_path):
    """A 2-D depthwise conv copies the zero-point padded input rows one row of outputs reads inside its own
    kernel, per parallel task and into a buffer of the task's (kernel rows x padded width x C), not in a kernel
    before it: DS-CNN / MobileNet blocks launch one kernel less per layer. The outputs equal ORT's."""
    from nativeq.compile.schedules.depthwise import DEPTHWISE_PAD

    model = qdq_models.qdq_separable_block(2, channels=32, kernel=3, spatial=spatial, act_dtype=act_dtype,
                                           residual=False)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rules, scheduled = kernel_rules.scheduled(model, tmp_path, target_name)
    main = scheduled["main"].script()
    assert "R.call_tir(pad" not in main and "fused_pad" not in main and "_pad," not in main, main
    (name,) = [n for n in rules if "depthwise" in n]
    assert rules[name] == "depthwise", rules
    text = scheduled[name].script()
    assert f'{DEPTHWISE_PAD}_local = T.sblock_alloc_buffer' in text, text
    # the rows loop (parallel over a symbolic T; a static DS-CNN-sized kernel runs on the calling thread) encloses
    # the copy, then the taps: TVM places and sizes the buffer per row (3 kernel rows of the padded width)
    rows = re.search(r"for n_i0_fused in (T.parallel|range)\((T_1|T.int64\(25\))\)", text)
    assert rows is not None and (rows.group(1) == "T.parallel") == isinstance(spatial[0], str), text
    assert rows.start() < text.index(f'T.sblock("{DEPTHWISE_PAD}")') < text.index('T.sblock("nativeq_int8_depthwise_update")')
    art = tmp_path / "art"
    compile_model(path, art, CompileConfig(target=target_name, use_tuning=False))
    report = verify_artifact(art, path, VerifyConfig(dims=dims, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps == 0 and out.exact_pct == 100.0, report.table()


@pytest.mark.parametrize("ndim, spatial, dims", [(2, (25, 5), {}), (1, ("T",), {"T": 37})])
def test_global_average_pool_reads_the_channels_last_value(ndim, spatial, dims, tmp_path):
    """GlobalAveragePool ([N, C, 1, ...], keepdims) after channels-last convs averages the channels-last value
    and reshapes: no transpose of the whole activation back to channels first (DS-CNN's head), and the result
    equals ONNX Runtime's (the pooled value dequantized: 0 difference)."""
    model = qdq_models.qdq_separable_block(ndim, channels=32, kernel=3, spatial=spatial, residual=False, pooled=True)
    main = _kernel_level(model, tmp_path)["main"].script()
    assert main.count("R.call_tir(transpose") == 1, main  # the input's, to channels-last
    path = tmp_path / "pooled.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims=dims, runs=2))
    assert report.passed and report.outputs[0].max_abs == 0.0, report.table()


def test_long_depthwise_kernels_multiply_four_taps_per_vnni_lane(tmp_path):
    """On AVX-512 VNNI a depthwise conv of 8+ taps along its last axis reads its input as 32-bit words of 4
    neighbouring taps (one `interleave_taps` kernel) and multiplies them with `vpdpbusd`; exactness: the
    `quad-taps-*` cases above."""
    import re
    import subprocess

    if get_target("host").int8 != "avx512-vnni":
        pytest.skip("host is not AVX-512 VNNI")
    path = tmp_path / "k33.onnx"
    onnx.save(qdq_models.qdq_separable_block(1, channels=64, kernel=33), path)
    names = _primfunc_names(_kernel_level(onnx.load(path), tmp_path))
    assert any(n.startswith("interleave_taps") for n in names) and not any(n.startswith("pad") for n in names), names
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False, debug=True))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "art" / "model.so")],
                          capture_output=True, text=True, check=True).stdout
    depthwise = re.search(r"<[^>]*int8_depthwise[^>]*_compute_>:\n(.*?)\n\n", text, re.S).group(1)
    assert "vpdpbusd" in depthwise and "vpmaddwd" not in depthwise, depthwise[:2000]


@pytest.mark.parametrize("target_name", ["host", pytest.param("rpi5", marks=pytest.mark.arm)])
def test_a_grouped_conv_runs_one_int8_matmul_per_group(target_name, tmp_path):
    """A grouped conv (wav2vec2 / HuBERT's positional conv: 16 groups) was left to TVM's generic conv loop nest (2-2.5x
    ONNX Runtime's time); each group now runs the packed int8 matmul on its slice of the channels, and nothing
    contracts on the generic path. The Pi 5 build equals ONNX Runtime under qemu too."""
    model = qdq_models.qdq_conv1d(c_in=64, c_out=64, kernel=31, groups=16, act_dtype="int8")
    # fed by the model's own [N, T, C] -> [N, C, T] transpose, which the channels-last layout cancels (wav2vec2's)
    graph = model.graph
    graph.node.insert(0, helper.make_node("Transpose", ["features"], ["x"], name="to_channels_first", perm=[0, 2, 1]))
    graph.input[0].CopyFrom(helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1, "T", 64]))
    onnx.checker.check_model(model, full_check=True)
    rules = schedule_rules(model, tmp_path, target=target_name)
    assert sum(rule == "int8-matmul" for rule in rules.values()) >= 1, rules
    assert not any("conv1d" in name for name in rules), rules
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    result = compile_model(path, tmp_path / "art", CompileConfig(target=target_name, use_tuning=False))
    # `compile --explain` / `profile` name the conv for the groups' matmul kernel (not the node before it)
    (grouped,) = [k for k in result.manifest["kernels"] if k["kind"] == "contraction"]
    assert [n["name"] for n in grouped["onnx_nodes"]][:1] == ["conv_Conv"], grouped["onnx_nodes"]
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 45}, runs=2))
    out = report.outputs[0]
    assert report.passed and out.max_steps == 0 and out.exact_pct == 100.0, report.table()


def test_a_static_length_grouped_conv_stacks_its_groups_in_a_kernel_of_its_own(tmp_path):
    """With static shapes FuseOps fused the move of the stacked groups next to their channels and the requantize after
    it into the stack, which then picked among the 16 groups per element (a static-length HuBERT-style positional
    conv: 0.44 ms; the stack and the rest apart: 0.07 ms). The stack stays a kernel of its own; the output matches
    ONNX Runtime exactly."""
    model = qdq_models.qdq_conv1d(c_in=64, c_out=64, kernel=31, groups=16, t=45, act_dtype="uint8")
    rules = kernel_rules.schedule_rules(model, tmp_path, target="x86-avx512-vnni")
    stacks = [name for name in rules if "stack_groups" in name or "concatenate" in name]
    assert stacks and all(name.startswith("stack_groups") for name in stacks), sorted(rules)
    _static_model_matches_onnxruntime_exactly(model, tmp_path)


def test_a_float_grouped_conv_runs_float_matmuls(tmp_path):
    """A grouped conv a model keeps in float (what `quantize_dynamic` leaves): one float matmul per group, within
    float rounding of ONNX Runtime."""
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 32, kernel_size=9, padding=4, groups=4)
    path = tmp_path / "f.onnx"
    with torch.no_grad():
        torch.onnx.export(conv.eval(), (torch.randn(1, 32, 20),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {2: "T"}}, opset_version=17, dynamo=False)
    rules = schedule_rules(onnx.load(path), tmp_path)
    assert "float-matmul" in rules.values() and not any("conv1d" in name for name in rules), rules
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 50}, runs=2))
    assert report.passed, report.table()


def test_depthwise_and_separable_kernels_get_their_schedules(tmp_path):
    """No contraction kernel of a separable block is left to the generic rule."""
    rules = schedule_rules(qdq_models.qdq_separable_block(1, channels=64, kernel=9), tmp_path)
    assert any("depthwise" in k and v == "depthwise" for k, v in rules.items()), rules
    assert any("int8_matmul_packed" in k and v == "int8-matmul" for k, v in rules.items()), rules


@pytest.mark.parametrize("target_name, act_dtype", [("host", "uint8"), ("rpi5", "int8")])
def test_depthwise_kernel_reads_a_padded_copy_without_clamping(target_name, act_dtype, tmp_path):
    """A padded depthwise conv over a symbolic axis computes its last register block past the end (then crops);
    the padded input copy also holds the rows that block reads (3 x stride past the conv's own), so the kernel
    reads no clamped row index (`min`): on x86 a clamp cost 5 scalar instructions next to every 16-lane
    multiply-add of the tap loop (QuartzNet's k = 33-63 depthwise convs). The outputs still equal ORT's."""
    model = qdq_models.qdq_conv1d(c_in=32, c_out=32, groups=32, kernel=15, act_dtype=act_dtype)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    target = get_target(target_name)
    mod = import_model(model, path)
    with TVMTarget(target.tvm_dict()):
        passes = [*int8_passes(target), *kernel_relax_passes(target), relax.transform.LegalizeOps()]
        mod = tvm.transform.Sequential(passes)(mod)
    (kernel,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("int8_depthwise")]
    text = kernel.script()
    assert "nativeq_int8_depthwise" in text and "T.min(" not in text, text
    if target_name == "host":
        compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
        report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 70}, runs=2))
        assert report.passed and report.outputs[0].max_steps == 0, report.table()


@pytest.mark.parametrize("width", [40, 9])
def test_conv2d_over_symbolic_time_with_wide_rows_is_tensorized(width, tmp_path):
    """A 2-D conv over [T, width] with T symbolic: its GEMM has T x width rows (padded to whole register tiles,
    cropped back). With width sharing a divisor with the tile (40, 9), TVM's first region-cover analysis cannot
    prove that the padded rows cover the crop and used to refuse the whole schedule (generic path); the matmul is
    now tensorized, and the result equals ONNX Runtime's."""
    model = qdq_models.qdq_conv2d(c_in=16, c_out=16, h="T", w=width, stride=1, act_dtype="uint8")
    rules = schedule_rules(model, tmp_path)
    assert not any(v == "generic" for k, v in rules.items() if "matmul" in k), rules
    assert any(v == "int8-matmul" for v in rules.values()), rules
    path = tmp_path / "wide.onnx"
    onnx.save(model, path)
    compile_model(path, tmp_path / "art", CompileConfig(target="host", use_tuning=False))
    report = verify_artifact(tmp_path / "art", path, VerifyConfig(dims={"T": 13}, runs=2))
    assert report.passed and report.outputs[0].max_abs == 0.0, report.table()
