"""TIR pass: keep small static `local` buffers (register tiles) on the stack, where LLVM promotes them to registers.

Pipeline position: the last pass of the TIR lowering (`compile/pipeline.py` `tir_pipeline`), after
TVM's s_tir lowering turned block allocations into `AllocBuffer` statements and before the host
finalization's `LowerTVMBuiltin`.

TVM 0.27's `LowerTVMBuiltin` turns every `local` allocation inside a parallel loop into a
`TVMBackendAllocWorkspace` call. LLVM cannot tell such a pointer from the kernel's other buffers, so
an int8 matmul's accumulator tile, though its addresses are constant, is stored back to memory after
every dot-product instruction and the activation broadcast reloaded after each store: the VNNI
micro-kernel ran store-bound at ~86 GMAC/s on one core. Marked `disable_lower_builtin`, the
allocation stays an `alloca` that does not escape, LLVM's SROA turns the tile into registers, and the
same kernel runs at ~200 GMAC/s (QuartzNet at T=1000, one thread: 4.03 -> 2.27 ms). Only
fixed-size buffers up to `MAX_STACK_BYTES` are kept: a worker thread's stack is megabytes, a tile is
at most a few kilobytes.
"""

from __future__ import annotations

from nativeq.compile._tvm import tirx, tvm
from nativeq.compile.tir_rewrite import rewrite_stmt

MAX_STACK_BYTES = 16384
_KEEP = "disable_lower_builtin"  # TVM's kDisableLowerTVMBuiltin


def _constant_bytes(buffer) -> int | None:
    elements = 1
    for dim in buffer.shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        elements *= int(dim)
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return elements * ((dtype.bits * dtype.lanes + 7) // 8)


def _keep_on_stack(stmt):
    """`stmt` itself, or marked to stay an alloca when it is a small static local `AllocBuffer`."""
    if isinstance(stmt, tirx.AllocBuffer) and str(stmt.buffer.scope()) == "local":
        size = _constant_bytes(stmt.buffer)
        if size is not None and size <= MAX_STACK_BYTES and _KEEP not in stmt.annotations:
            return tirx.AllocBuffer(stmt.buffer, {**dict(stmt.annotations), _KEEP: tirx.IntImm("bool", 1)})
    return stmt


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="nativeq.LocalTilesOnStack")
def LocalTilesOnStack(func, _mod, _ctx):  # noqa: N802  (a pass, named like TVM's)
    return func.with_body(rewrite_stmt(func.body, _keep_on_stack))
