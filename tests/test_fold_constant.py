"""FoldConstant (`passes/fold_constant.py`): TVM's constant folding with each distinct kernel built once. A chain of
computations on constants (a weight's scales: TVM's folder builds one LLVM module per call it folds) folds to the
module TVM's pass gives, with one build per distinct kernel."""

import numpy as np

from nativeq.compile._tvm import relax, tvm
from nativeq.compile.passes.fold_constant import FoldConstant

BUILD = "tirx.build"


def _module():
    from tvm.script import relax as R

    c = np.arange(32, dtype=np.float32).reshape(4, 8) / 7
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            value = relax.const(c)
            for _ in range(3):
                value = bb.emit(relax.op.multiply(value, relax.const(np.float32(2))))
            value = bb.emit(relax.op.divide(value, relax.const(np.float32(3))))
            out = bb.emit_output(relax.op.add(x, value))
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get()), c


def _counting_builds(run):
    build = tvm.get_global_func(BUILD)
    calls = []

    def counting(func, *args):
        calls.append(func)
        return build(func, *args)

    tvm.register_global_func(BUILD, counting, override=True)
    try:
        return run(), len(calls)
    finally:
        tvm.register_global_func(BUILD, build, override=True)


def test_folds_as_tvm_does_with_one_build_per_kernel():
    mod, c = _module()
    with tvm.target.Target("llvm"):
        ours, ours_builds = _counting_builds(lambda: FoldConstant()(mod))
        theirs, their_builds = _counting_builds(lambda: relax.transform.FoldConstant()(mod))
    tvm.ir.assert_structural_equal(ours, theirs)
    assert (ours_builds, their_builds) == (2, 4)  # multiply and divide; TVM's builds every call it folds
    (add,) = [b.value for b in ours["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    (constant,) = [a for a in add.args[1].fields if isinstance(a, tvm.ir.GenericConst)]
    np.testing.assert_array_equal(constant.value.numpy(), c * np.float32(2) * np.float32(2) * np.float32(2) / np.float32(3))


def test_the_build_tvm_calls_is_restored():
    build = tvm.get_global_func(BUILD)
    mod, _ = _module()
    with tvm.target.Target("llvm"):
        FoldConstant()(mod)
    assert tvm.get_global_func(BUILD).same_as(build)
