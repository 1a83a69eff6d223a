"""passes/rewrite_dataflow_reshape.py: reshape kernels become views as TVM's pass makes them; a kernel TVM's reshape
analysis aborts on (a scheduled transpose with a symbolic size) stays a kernel instead of ending the compile."""

import pytest
import tvm.s_tir as s_tir
from tvm import te

from nativeq.compile._tvm import relax, tirx, topi, tvm
from nativeq.compile.passes.rewrite_dataflow_reshape import RewriteDataflowReshape, is_reshape_kernel


def _int64(value: int):
    return tirx.IntImm("int64", value)


def _module(kernel_of, in_shape, symbolic) -> tvm.IRModule:
    """main(x[in_shape], lengths[symbolic]) -> one call_tir of the TE kernel `kernel_of(x)` inside a dataflow block
    (the second input only defines the symbolic size), its result passed through an add so that it is a dataflow
    var."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(in_shape, "uint8"))
    lengths = relax.Var("lengths", relax.TensorType([symbolic], "uint8"))
    with bb.function("main", [x, lengths]):
        with bb.dataflow():
            moved = bb.emit_te(kernel_of, x, primfunc_name_hint="kernel")
            out = bb.emit_output(relax.op.add(moved, moved))
        bb.emit_func_output(out)
    return bb.get()


def _fused_transpose_schedule(mod: tvm.IRModule) -> tvm.IRModule:
    """The elementwise schedule of a transpose [1, n, 4, 36] -> [1, 4, 36, n]: its three static axes fused, parallel."""
    gvar = mod.get_global_var("kernel")
    sch = s_tir.Schedule(mod[gvar])
    loops = sch.get_loops(sch.get_sblock("T_transpose"))
    sch.parallel(sch.fuse(*loops[:3]))
    mod[gvar] = sch.mod["main"].with_attr("global_symbol", "kernel")
    return mod


def test_a_reshape_kernel_becomes_the_view_tvm_makes():
    # NOTE: TVM's analysis finds reshapes of static shapes only (symbolic ones stay R.reshape from the start:
    # passes/symbolic_reshapes_as_views.py)
    mod = _module(lambda x: topi.reshape(x, (_int64(1), _int64(50), _int64(144))),
                  [_int64(1), _int64(50), _int64(4), _int64(36)], tirx.Var("T", "int64"))
    ours = RewriteDataflowReshape()
    rewritten = ours(mod)
    assert ours.rewritten == 1
    tvm.ir.assert_structural_equal(rewritten["main"], relax.transform.RewriteDataflowReshape()(mod)["main"])
    assert "R.reshape(x" in rewritten["main"].script()


def test_a_kernel_the_reshape_analysis_aborts_on_stays_a_kernel():
    length = tirx.Var("S", "int64")
    size = length * 2 + 1  # 2S + 1 relative positions
    mod = _fused_transpose_schedule(_module(lambda x: topi.transpose(x, (0, 2, 3, 1)),
                                            [_int64(1), size, _int64(4), _int64(36)], length))
    with pytest.raises(tvm.error.InternalError, match="CanProveDivisible"):
        relax.transform.RewriteDataflowReshape()(mod)
    assert not is_reshape_kernel(mod["kernel"])
    ours = RewriteDataflowReshape()
    tvm.ir.assert_structural_equal(ours(mod)["main"], mod["main"])
    assert ours.rewritten == 0
