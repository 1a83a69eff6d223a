"""RemoveIdentityReshapes: before/expected IR, symbolic sizes included, and real reshapes left alone."""

import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from nativeq.compile.passes.remove_identity_reshapes import RemoveIdentityReshapes


@I.ir_module
class Before:
    @R.function
    def main(wave: R.Tensor(("S",), "float32"), x: R.Tensor((1, 128, "S // 5 - 1"), "uint8")):
        S = T.int64()
        with R.dataflow():
            same = R.reshape(x, R.shape([1, 128, (S - 5) // 5]))  # GroupNorm's [N, C, -1]: the same length
            y = R.dequantize(same, R.const(0.5, "float32"), R.const(3, "uint8"), axis=1, out_dtype="float32")
            again = R.reshape(y, R.shape([1, 128, S // 5 - 1]))
            moved = R.reshape(again, R.shape([1, 64, (S // 5 - 1) * 2]))  # a real reshape stays
            R.output(moved)
        return moved


@I.ir_module
class Expected:
    @R.function
    def main(wave: R.Tensor(("S",), "float32"), x: R.Tensor((1, 128, "S // 5 - 1"), "uint8")):
        S = T.int64()
        with R.dataflow():
            y = R.dequantize(x, R.const(0.5, "float32"), R.const(3, "uint8"), axis=1, out_dtype="float32")
            moved = R.reshape(y, R.shape([1, 64, (S // 5 - 1) * 2]))
            R.output(moved)
        return moved


def test_identity_reshapes_are_removed_and_real_ones_kept():
    remove = RemoveIdentityReshapes()
    after = remove(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    assert remove.removed == 2
