"""LocalTilesOnStack: small static `local` buffers stay stack allocations (registers after LLVM), large or
symbolic ones keep TVM's workspace allocation; the kernel computes the same values either way."""

import numpy as np
import pytest

from nativeq.compile._tvm import T, tvm
from nativeq.compile.passes.local_tiles_on_stack import MAX_STACK_BYTES, LocalTilesOnStack
from nativeq.compile.pipeline import tir_pipeline


def _tile_kernel(tile: int):
    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((64, tile), "float32"), b: T.Buffer((64, tile), "float32")):
        T.func_attr({"global_symbol": "kernel", "tirx.noalias": True})
        for i in T.parallel(64):
            acc = T.alloc_buffer((tile,), "float32", scope="local")
            for j in range(tile):
                acc[j] = a[i, j] * T.float32(2)
            for j in range(tile):
                b[i, j] = acc[j] + T.float32(1)

    return tvm.IRModule({"kernel": kernel})


def _lowered(mod, with_pass: bool):
    """`mod` through TVM's s_tir lowering (with or without the pass) and the host finalization, as tirx.build runs them."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lowering, finalize_host, _ = default_s_tir_pipeline()
    target = tvm.target.Target({"kind": "llvm"})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    mod = lowering(mod)
    if with_pass:
        mod = LocalTilesOnStack(mod)
    return finalize_host()(mod)


@pytest.mark.parametrize("tile, stays_on_stack", [(64, True), (MAX_STACK_BYTES // 4, True), (MAX_STACK_BYTES // 4 + 1, False)])
def test_small_local_tiles_stay_on_the_stack(tile, stays_on_stack):
    before = _lowered(_tile_kernel(tile), with_pass=False).script()
    after = _lowered(_tile_kernel(tile), with_pass=True).script()
    assert "TVMBackendAllocWorkspace" in before  # what TVM 0.27 does to a local tile in a parallel loop
    assert ("TVMBackendAllocWorkspace" not in after) == stays_on_stack


def test_kernel_values_are_unchanged():
    mod = _tile_kernel(48)
    a = np.random.default_rng(0).standard_normal((64, 48)).astype("float32")
    results = []
    for pipeline in ("default", tir_pipeline()):
        lib = tvm.tirx.build(mod, target=tvm.target.Target({"kind": "llvm"}), pipeline=pipeline)
        b = tvm.runtime.tensor(np.zeros_like(a))
        lib["kernel"](tvm.runtime.tensor(a), b)
        results.append(b.numpy())
    np.testing.assert_array_equal(results[0], a * 2 + 1)
    np.testing.assert_array_equal(results[1], results[0])
