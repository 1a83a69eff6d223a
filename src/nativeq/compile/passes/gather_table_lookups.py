"""TIR pass: a vector of table lookups becomes one AVX-512 gather (`vpgatherdd` / `vgatherdps`).

Pipeline position: the TIR lowering (`compile/pipeline.py` `tir_pipeline`), after TVM's VectorizeLoop and
`LocalTilesOnStack`, for functions compiled for a target with AVX-512.

A table lookup (`passes/lut_elementwise.py`: GELU, SiLU, sigmoid as 256 entries, fused into the epilogue of
the kernel before it) vectorizes to a load with a vector of indices, which LLVM emits lane by lane: extract
the index, load the entry, insert it (3 instructions per lane; half the time of an FFN's matmul kernel). Here
a 16-lane lookup is one gather: in a table of 256 4-byte entries (float32 / int32) with scale 4; in an 8-bit
table of `TABLE_ENTRIES + GATHER_SLACK` entries as a 32-bit gather with scale 1, lane i loading the 4 bytes at
table + index[i], whose first (little-endian: lowest) byte is the entry, which the truncating cast keeps (the
slack keeps the last entry's 4 bytes inside the table). The same entries: exact by construction.
"""

from __future__ import annotations

from nativeq.compile._tvm import target_has_features, tirx, tvm
from nativeq.compile.passes.lut_elementwise import GATHER_SLACK, TABLE_ENTRIES
from nativeq.compile.tir_rewrite import rewrite_stmt

LANES = 16
# table dtype -> (gather intrinsic, scale: bytes between entries), for the tables `lut_elementwise.py` makes
_GATHERS = {"uint8": ("llvm.x86.avx512.mask.gather.dpi.512", 1), "int8": ("llvm.x86.avx512.mask.gather.dpi.512", 1),
            "int32": ("llvm.x86.avx512.mask.gather.dpi.512", 4), "float32": ("llvm.x86.avx512.mask.gather.dps.512", 4)}


def _lanes(expr) -> int:
    return tvm.runtime.DataType(str(expr.ty.dtype)).lanes


def _is_table(buffer) -> bool:
    """A lookup table: 256 4-byte entries, or 256 8-bit entries and the slack a 4-byte read past the last needs."""
    shape, dtype = buffer.shape, str(buffer.dtype)
    if dtype not in _GATHERS or len(shape) != 1 or not isinstance(shape[0], tirx.IntImm):
        return False
    return int(shape[0]) == TABLE_ENTRIES + (GATHER_SLACK if dtype in ("uint8", "int8") else 0)


def _gathered(value):
    """`value` as a gather when it is a 16-lane load from a lookup table, else None."""
    if not (isinstance(value, tvm.ir.TensorLoad) and _is_table(value.source) and len(value.indices) == 1):
        return None
    index = value.indices[0]
    if _lanes(index) != LANES or isinstance(index, tirx.Ramp):
        return None
    table = value.source
    dtype = str(table.dtype)
    name, scale = _GATHERS[dtype]
    element = "float32" if dtype == "float32" else "int32"
    gather = tirx.call_llvm_pure_intrin(
        f"{element}x{LANES}", name, tirx.Broadcast(tirx.const(0, element), LANES),
        tirx.address_of(tirx.BufferLoad(table, [tirx.const(0, "int32")])), index.astype(f"int32x{LANES}"),
        tirx.Broadcast(tirx.const(True, "bool"), LANES), tirx.const(scale, "int32"))
    return gather if element == dtype else gather.astype(f"{dtype}x{LANES}")


def _rewrite(stmt):
    if isinstance(stmt, tirx.BufferStore):
        value = stmt.value
        cast = isinstance(value, tirx.Cast)
        gathered = _gathered(value.value if cast else value)
        if gathered is not None:
            new_value = gathered.astype(str(value.ty.dtype)) if cast else gathered
            return tirx.BufferStore(stmt.buffer, new_value, stmt.indices)
    return stmt


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="nativeq.GatherTableLookups")
def GatherTableLookups(func, _mod, _ctx):  # noqa: N802  (a pass, named like TVM's)
    target = func.attrs.get("target") if func.attrs is not None else None
    if target is None or str(target.kind.name) != "llvm" or not target_has_features("avx512f", target):
        return func
    return func.with_body(rewrite_stmt(func.body, _rewrite))
