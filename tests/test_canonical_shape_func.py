"""CanonicalShapeFunc: VMShapeLower's stores in slot order (dependencies kept), so a model compiles to the same bytes."""

import onnx
import qdq_models
from nativeq.compile import CompileConfig, compile_model
from nativeq.compile._tvm import T, tvm
from nativeq.compile.passes.canonical_shape_func import CanonicalShapeFunc


def _module(func):
    return tvm.IRModule({"shape_func": func})


def test_stores_are_ordered_by_slot():
    @T.prim_func(private=True, s_tir=True)
    def before(H: T.Buffer((T.int64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(4)] = T.int64(3) * H[T.int64(0)]
        H[T.int64(2)] = (H[T.int64(0)] - T.int64(1)) // T.int64(2) + T.int64(1)
        H[T.int64(5)] = T.int64(16) * H[T.int64(0)]
        H[T.int64(1)] = T.int64(80) * H[T.int64(0)]

    @T.prim_func(private=True, s_tir=True)
    def expected(H: T.Buffer((T.int64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(1)] = T.int64(80) * H[T.int64(0)]
        H[T.int64(2)] = (H[T.int64(0)] - T.int64(1)) // T.int64(2) + T.int64(1)
        H[T.int64(4)] = T.int64(3) * H[T.int64(0)]
        H[T.int64(5)] = T.int64(16) * H[T.int64(0)]

    tvm.ir.assert_structural_equal(CanonicalShapeFunc()(_module(before)), _module(expected))


def test_a_store_stays_after_the_slots_it_reads():
    @T.prim_func(private=True, s_tir=True)
    def before(H: T.Buffer((T.int64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(5)] = T.int64(2) * H[T.int64(0)]
        H[T.int64(3)] = H[T.int64(0)] + T.int64(1)
        H[T.int64(1)] = H[T.int64(5)] + H[T.int64(3)]

    @T.prim_func(private=True, s_tir=True)
    def expected(H: T.Buffer((T.int64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(3)] = H[T.int64(0)] + T.int64(1)
        H[T.int64(5)] = T.int64(2) * H[T.int64(0)]
        H[T.int64(1)] = H[T.int64(5)] + H[T.int64(3)]

    tvm.ir.assert_structural_equal(CanonicalShapeFunc()(_module(before)), _module(expected))


def test_a_store_reading_the_old_value_of_a_later_slot_keeps_its_run():
    @T.prim_func(private=True, s_tir=True)
    def before(H: T.Buffer((T.int64(4),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(3)] = H[T.int64(2)] + T.int64(1)
        H[T.int64(2)] = H[T.int64(0)] * T.int64(2)

    tvm.ir.assert_structural_equal(CanonicalShapeFunc()(_module(before)), _module(before))


def test_device_kernels_are_left_alone():
    @T.prim_func(private=True, s_tir=True)
    def kernel(H: T.Buffer((T.int64(4),), "int64")):
        H[T.int64(3)] = H[T.int64(0)] + T.int64(1)
        H[T.int64(1)] = H[T.int64(0)] * T.int64(2)

    tvm.ir.assert_structural_equal(CanonicalShapeFunc()(_module(kernel)), _module(kernel))


def test_one_model_compiles_to_the_same_library(tmp_path):
    """Three compiles of a model with several symbolic sizes (slices, pads and reshapes of T): the libraries are
    byte-identical (VMShapeLower's order differed between compiles before, in one process or not)."""
    path = tmp_path / "model.onnx"
    onnx.save(qdq_models.dynamic_shape_arithmetic(), path)
    libraries = []
    for i in range(3):
        compile_model(path, tmp_path / f"art{i}", CompileConfig(target="host", use_tuning=False), progress=False)
        libraries.append((tmp_path / f"art{i}" / "model.so").read_bytes())
    assert libraries[0] == libraries[1] == libraries[2]
