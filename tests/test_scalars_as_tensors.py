"""scalars_as_tensors: per-tensor scales and zero points become kernel arguments, so identical layers share one kernel.

Before/expected IR at the legalization step, the kernel count of a real two-block encoder after
FuseTIR, and the compiled result against the same pipeline with TVM's immediates (bit-identical).
"""

import numpy as np
import pytest

from nativeq.compile._tvm import T, relax, tirx, tvm
from nativeq.compile.passes.scalars_as_tensors import scalars_as_tensors

from qdq_models import ort_quantized_encoder


@T.prim_func(private=True, s_tir=True)
def _expected_quantize(x: T.Buffer((T.int64(1), T.int64(8), T.int64(16)), "float32"),
                       scale: T.Buffer((T.int64(16),), "float32"), zero_point: T.Buffer((T.int64(16),), "float32"),
                       quantized: T.Buffer((T.int64(1), T.int64(8), T.int64(16)), "int8")):
    T.func_attr({"tirx.noalias": True})
    for i0, i1, i2 in T.grid(T.int64(1), T.int64(8), T.int64(16)):
        with T.sblock("quantized"):
            v_i0, v_i1, v_i2 = T.axis.remap("SSS", [i0, i1, i2])
            T.reads(x[v_i0, v_i1, v_i2], scale[v_i2], zero_point[v_i2])
            T.writes(quantized[v_i0, v_i1, v_i2])
            quantized[v_i0, v_i1, v_i2] = T.Cast("int8", T.max(T.min(
                T.round(x[v_i0, v_i1, v_i2] / scale[v_i2]) + zero_point[v_i2], T.float32(127.0)), T.float32(-128.0)))


def _requantize_module(scale_a: float, scale_b: float, t=8) -> tvm.IRModule:
    """Two per-tensor requantizes of the same shape with different constants."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, t, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.quantize(x, relax.const(scale_a, "float32"), relax.const(3, "int8"), 1, "int8"))
            b = bb.emit(relax.op.quantize(x, relax.const(scale_b, "float32"), relax.const(-2, "int8"), 1, "int8"))
            out = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(out)
    return bb.get()


def _prim_funcs(mod) -> list:
    return [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]


def _legalize(mod, rules) -> tvm.IRModule:
    return relax.transform.LegalizeOps(customize_legalize_map=rules)(mod)


def test_requantize_constants_become_one_kernel_with_vector_arguments():
    shared = _legalize(_requantize_module(0.3, 0.7), scalars_as_tensors())
    baked = _legalize(_requantize_module(0.3, 0.7), None)
    assert len(_prim_funcs(baked)) == 2  # TVM's rule: the constants are immediates, two kernels
    (kernel,) = _prim_funcs(shared)  # ours: one kernel, the constants are arguments
    # expected: TVM's own quantize, reading scale and zero point (float32, added without a conversion)
    # per channel of the last axis
    tvm.ir.assert_structural_equal(kernel, _expected_quantize)
    # and the call sites pass each layer's own values
    calls = [b.value for b in shared["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)
             and b.value.op.name == "relax.call_tir"]
    values = [(c.args[1][1].value.numpy(), c.args[1][2].value.numpy()) for c in calls]
    assert [(s[0], z[0]) for s, z in values] == [(np.float32(0.3), 3), (np.float32(0.7), -2)]
    assert all(s.shape == (16,) and (s == s[0]).all() for s, _ in values)


def _run(mod, x: np.ndarray) -> list[np.ndarray]:
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]


@pytest.mark.parametrize("scales", [(0.5, 0.0625), (0.3, 0.7)], ids=["power-of-two", "arbitrary"])
def test_shared_kernels_compute_what_the_immediates_compute(scales):
    """Power-of-two scales multiply by the exact reciprocal (as LLVM does with an immediate): same bits."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 40, (1, 8, 16)), (np.arange(128) - 64).reshape(1, 8, 16) * 0.25], axis=1)
    x = x.astype(np.float32)
    shared = _legalize(_requantize_module(*scales, t=16), scalars_as_tensors())
    baked = _legalize(_requantize_module(*scales, t=16), None)
    assert len(_prim_funcs(shared)) == 1
    for got, ref in zip(_run(shared, x), _run(baked, x)):
        np.testing.assert_array_equal(got, ref)
        assert len(np.unique(ref)) > 50


def test_a_symbolic_last_axis_keeps_the_immediates():
    x = relax.Var("x", relax.TensorType((1, 16, tirx.Var("T", "int64")), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.normalize(relax.op.quantize(x, relax.const(0.5, "float32"),
                                                           relax.const(0, "int8"), 1, "int8")))
    symbolic = _legalize(bb.get(), scalars_as_tensors())
    baseline = _legalize(bb.get(), None)
    tvm.ir.assert_structural_equal(symbolic, baseline)


def test_binary_op_with_a_scalar_constant():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.multiply(x, relax.const(0.5, "float32")))
            b = bb.emit(relax.op.multiply(relax.const(0.25, "float32"), x))
            out = bb.emit_output(relax.op.add(a, b))
        bb.emit_func_output(out)
    mod = _legalize(bb.get(), scalars_as_tensors())
    kernels = _prim_funcs(mod)
    assert len(kernels) == 3  # x*c, c*x (operand order kept), a+b
    ex = relax.build(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    data = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_array_equal(out, (data * np.float32(0.5)) + (np.float32(0.25) * data))


def _int8_kernels_and_calls(model, monkeypatch=None, share: bool = True):
    """(distinct int8 PrimFuncs after FuseTIR, int8 call sites in main)."""
    from nativeq.compile import pipeline
    from nativeq.compile.api import import_model, make_tvm_target
    from nativeq.targets import get_target

    if not share:
        monkeypatch.setattr(pipeline, "scalars_as_tensors", lambda target=None: {})
    target = get_target("host")
    mod = import_model(model, None)
    with make_tvm_target(target):
        for p in pipeline.compile_passes(target):
            mod = p(mod)
            if p.info.name == "FuseTIR":
                break
    kernels = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and "int8_matmul" in gv.name_hint}
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e.args[0].name_hint) if (
        isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" and "int8_matmul" in e.args[0].name_hint) else None)
    return kernels, calls


def test_the_blocks_of_an_encoder_share_their_int8_kernels(monkeypatch):
    model = ort_quantized_encoder("uint8")
    kernels, calls = _int8_kernels_and_calls(model)
    baked_kernels, baked_calls = _int8_kernels_and_calls(model, monkeypatch, share=False)
    # 14 sites: subsampling conv, head, and per block qkv, Q.Kt, P.V, proj, ff_in, ff_out
    assert len(calls) == len(baked_calls) == 14
    assert len(baked_kernels) == len(baked_calls)  # TVM's immediates: one kernel per layer
    # shared by both blocks: qkv, P.V, proj, ff_in, ff_out; Q.Kt ([B, H, T, T], no static last axis) stays
    # one per block; conv and head are single: 5 + 2 + 2 kernels
    assert sorted(calls.count(k) for k in kernels) == [1, 1, 1, 1, 2, 2, 2, 2, 2]


def test_a_flattened_axis_longer_than_a_channel_axis_keeps_the_immediates():
    """GroupNorm with one group reshapes to [1, 1, C x T]: a scale repeated along that axis would be two vectors of
    C x T floats read per element; past `MAX_VECTOR` the constants stay immediates."""
    from nativeq.compile.passes.scalars_as_tensors import MAX_VECTOR

    def module(length):
        x = relax.Var("x", relax.TensorType((1, 1, length), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            bb.emit_func_output(bb.normalize(relax.op.quantize(x, relax.const(0.5, "float32"),
                                                               relax.const(3, "int8"), 1, "int8")))
        return bb.get()

    long = module(MAX_VECTOR + 8)
    tvm.ir.assert_structural_equal(_legalize(long, scalars_as_tensors()), _legalize(long, None))
    (kernel,) = _prim_funcs(_legalize(module(MAX_VECTOR), scalars_as_tensors()))
    assert kernel.script().count(f'T.Buffer((T.int64({MAX_VECTOR}),), "float32")') == 2  # scale, zero point


def test_aarch64_keeps_the_immediates_and_still_rounds_a_product_of_two_tensors():
    """No memory operands on AArch64: a repeated scale would be one load per use in every loop. The scalars stay
    TVM's immediates there; a product of two computed tensors is still rounded on its own (an FMA with a zero
    addend, which LLVM cannot contract into the add after it), as ORT does."""
    from nativeq.targets import get_target

    rules = scalars_as_tensors(get_target("rpi5"))
    requantize = _requantize_module(0.3, 0.7)
    tvm.ir.assert_structural_equal(_legalize(requantize, rules), _legalize(requantize, None))
    assert len(_prim_funcs(_legalize(requantize, scalars_as_tensors(get_target("x86-avx2"))))) == 1

    bb = relax.BlockBuilder()
    x, y = relax.Var("x", relax.TensorType((4, 32), "float32")), relax.Var("y", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x, y]):
        bb.emit_func_output(bb.normalize(relax.op.add(relax.op.multiply(x, y), x)))
    products = [f.script() for f in _prim_funcs(_legalize(bb.get(), rules)) if "multiply" in f.script()]
    assert len(products) == 1 and "T.fma(x[v_i0, v_i1], y[v_i0, v_i1], T.float32(0.0))" in products[0]
