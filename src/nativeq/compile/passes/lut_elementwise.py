"""LutElementwise: an elementwise chain that starts at one 8-bit tensor becomes a 256-entry table lookup.

Where it sits: among the int8 passes, after LowerQDQToInteger and FoldBiasIntoAccumulator, before
FoldQuantizeDequantize, the kernel layout passes, LegalizeOps and FoldConstant.

A QDQ graph re-quantizes around every float op, so an activation often leaves an integer kernel as
an 8-bit tensor `x` and then runs a chain of elementwise ops whose other operands are scalar
constants, e.g. GELU as ONNX Runtime's `quantize_static` writes it:

    y = Q(DQ(x) * DQ(Q(1 + DQ(Q(erf(DQ(x) / sqrt2))))) * 0.5)        # 12 ops, 5 divisions, erf

Every element of `y` is then a function of one 8-bit value, so the whole chain has only 256 possible
results. The pass evaluates the same chain of Relax ops on the constant tensor [0, 1, ..., 255] (or
[-128, ..., 127]), which FoldConstant later folds into a 256-entry table with the same legalized
kernels (`legalize_like_ort`), and replaces `y` by `table[x]`:

    table = chain(arange(256))                  # a compile-time constant after FoldConstant
    y     = call_tir(nativeq_lut, x, table)     # fused into x's producer (see MarkLutElementwise)

Bit-exact by construction: the table holds the chain's own results for every possible input. Only
chains worth a gather are rewritten (a transcendental, or at least three divisions/quantizes).
"""

from __future__ import annotations

import numpy as np

from nativeq.compile._tvm import relax, te, tvm
from nativeq.compile.passes import rewrite_functions, use_counts
from nativeq.compile.passes.qdq_sites import op_name, static_scalar

LUT_BLOCK = "nativeq_lut"
TABLE_ENTRIES = 256
GATHER_SLACK = 3  # bytes after an 8-bit table's entries
LUT_ATTR = "nativeq.lut"
LUT_OFFSET_ATTR = "nativeq.lut_offset"  # the lookup's index offset (-table start), for passes that re-emit it
_ELEMWISE = 0  # TVM OpPatternKind.kElemWise
_ELEMENTWISE = {
    "relax.quantize", "relax.dequantize", "relax.astype", "relax.add", "relax.subtract", "relax.multiply",
    "relax.divide", "relax.maximum", "relax.minimum", "relax.power", "relax.negative", "relax.abs",
    "relax.clip", "relax.floor", "relax.ceil", "relax.round", "relax.sqrt", "relax.rsqrt", "relax.exp",
    "relax.log", "relax.erf", "relax.sigmoid", "relax.tanh", "relax.nn.relu", "relax.nn.gelu",
    "relax.nn.gelu_tanh", "relax.nn.silu",
}
_TRANSCENDENTAL = {"relax.power", "relax.exp", "relax.log", "relax.erf", "relax.sigmoid", "relax.tanh",
                   "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu"}
_DIVIDING = {"relax.quantize", "relax.divide", "relax.sqrt", "relax.rsqrt"}
_ROOT_DTYPES = {"uint8": np.arange(0, 256, dtype=np.uint8), "int8": np.arange(-128, 128, dtype=np.int8)}


def worth_a_table(ops: list[str]) -> bool:
    """Whether a chain of these ops costs more than one gather per element."""
    return any(op in _TRANSCENDENTAL for op in ops) or sum(op in _DIVIDING for op in ops) >= 3


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _ndim(expr) -> int:
    return int(expr.ty.ndim)


class _Chains:
    """For each Relax var: the 8-bit root var it is an elementwise function of, and the chain's ops."""

    def __init__(self, func):
        self.var2val = relax.analysis.get_var2val(func)
        self.root: dict = {}  # var -> root var
        self.ops: dict = {}  # var -> {binding var: op name} of the chain's DAG from the root to var
        for var, value in self.var2val.items():  # bindings in program order
            self._visit(var, value)

    def _visit(self, var, value):
        if not isinstance(value, relax.Call) or op_name(value) not in _ELEMENTWISE:
            return
        roots, ops = [], {}
        for arg in value.args:
            if isinstance(arg, relax.Var) and arg in self.root:
                roots.append(self.root[arg])
                ops.update(self.ops[arg])
            # a one-element tensor known at compile time (e.g. a dequantized constant, which FoldConstant
            # folds later) broadcasts without changing the chain's shape
            elif _dtype(arg) is not None and static_scalar(arg, self.var2val) is not None:
                if _ndim(arg) > _ndim(value):
                    return
            elif isinstance(arg, relax.Var) and _dtype(arg) in _ROOT_DTYPES:
                roots.append(arg)
            elif isinstance(arg, (relax.Var, relax.Call, relax.Tuple)) or _dtype(arg) is not None:
                return
        if not roots or any(not r.same_as(roots[0]) for r in roots) or _ndim(roots[0]) != _ndim(value):
            return
        self.root[var] = roots[0]
        self.ops[var] = {**ops, var: op_name(value)}

    def op_names(self, var) -> list[str]:
        return list(self.ops[var].values())


def lut_lookup_te(x, table, offset: int):
    """y[i] = table[x[i] + offset]: the table lookup, elementwise over x."""
    return te.compute(x.shape, lambda *i: table[x(*i).astype("int32") + offset], name=LUT_BLOCK)


def call_lut(builder, x, table, offset: int):
    """`builder.call_te` of `lut_lookup_te`, marked (with its offset) as nativeq's table lookup.

    An 8-bit table gets `GATHER_SLACK` zero entries after its 256: a 32-bit gather
    (passes/gather_table_lookups.py) reads 4 bytes at an entry, which the slack keeps inside the table."""
    if _dtype(table) in ("uint8", "int8") and int(table.ty.shape.values[0]) == TABLE_ENTRIES:
        table = builder.emit(relax.op.concat([table, relax.const(np.zeros(GATHER_SLACK, _dtype(table)))], axis=0))
    return builder.call_te(lut_lookup_te, x, table, offset=offset, primfunc_name_hint=LUT_BLOCK,
                           primfunc_attrs={LUT_ATTR: 1, LUT_OFFSET_ATTR: offset})


def lut_call_operands(call, mod) -> tuple | None:
    """(x, table, offset) of a `call_tir` of a table lookup made by `call_lut` in `mod`, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
        return None
    callee, args = call.args[0], call.args[1]
    if not isinstance(callee, tvm.ir.GlobalVar) or not isinstance(args, relax.Tuple) or len(args.fields) < 2:
        return None
    func = mod[callee] if callee in mod.get_global_vars() else None
    attrs = getattr(func, "attrs", None)
    if attrs is None or LUT_OFFSET_ATTR not in attrs:
        return None
    return args.fields[0], args.fields[1], int(attrs[LUT_OFFSET_ATTR])


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def prepare(self, func):
        self.chains = _Chains(func)
        self.internal_uses = self._internal_uses()
        self.uses = use_counts(func)
        self.tables: dict = {}

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def _internal_uses(self) -> dict:
        """How often each chain var is an operand of a binding in the same chain."""
        counts: dict = {}
        for var, value in self.chains.var2val.items():
            if var not in self.chains.root:
                continue
            for arg in value.args:
                if isinstance(arg, relax.Var) and arg in self.chains.root and self.chains.root[arg].same_as(self.chains.root[var]):
                    counts[arg] = counts.get(arg, 0) + 1
        return counts

    def _is_exit(self, var) -> bool:
        """A chain value something outside its chain reads, and worth a table."""
        return (var in self.chains.root and self.uses.get(var, 0) > self.internal_uses.get(var, 0)
                and worth_a_table(self.chains.op_names(var)))

    def _table(self, var, root_values):
        """The chain up to `var`, re-emitted on the constant `root_values` (memoized per var)."""
        if var in self.tables:
            return self.tables[var]
        value = self.chains.var2val[var]
        args = []
        for arg in value.args:
            if isinstance(arg, relax.Var) and arg.same_as(self.chains.root[var]):
                args.append(root_values)
            elif isinstance(arg, relax.Var) and arg in self.chains.root:
                args.append(self._table(arg, root_values))
            else:
                args.append(self.visit_expr(arg))
        if op_name(value) in ("relax.quantize", "relax.dequantize"):
            # per-tensor parameters (one element): the axis of the original tensor means nothing on the table
            build = relax.op.quantize if op_name(value) == "relax.quantize" else relax.op.dequantize
            call = build(args[0], args[1], args[2], axis=-1, out_dtype=str(value.attrs.out_dtype))
        else:
            call = relax.Call(value.op, args, value.attrs, value.ty_args)
        self.tables[var] = self.builder_.emit(call)
        return self.tables[var]

    def visit_var_binding_(self, binding):
        var = binding.var
        if not self._is_exit(var):
            return super().visit_var_binding_(binding)
        root = self.chains.root[var]
        start = _ROOT_DTYPES[_dtype(root)]
        table = self._table(var, relax.const(start, _dtype(root)))
        if _ndim(table) != 1:  # a constant of shape (1, 1) broadcasts the 256 entries up to (1, 256)
            table = self.builder_.emit(relax.op.reshape(table, [len(start)]))
        lookup = call_lut(self.builder_, self.visit_expr(root), table, -int(start[0]))
        emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        new_var = emit(lookup, name_hint=str(var.name))
        self.set_var_remap(var, new_var)
        self.rewritten += 1


@tvm.transform.module_pass(opt_level=0, name="nativeq.LutElementwise")
class LutElementwise:
    """Replace elementwise chains of 8-bit tensors (with scalar constant operands) by 256-entry table lookups."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).transform()


@tvm.transform.module_pass(opt_level=0, name="nativeq.MarkLutElementwise")
class MarkLutElementwise:
    """Mark the table lookups elementwise for FuseOps (pipeline: right after AnnotateTIROpPattern).

    AnnotateTIROpPattern sees the data-dependent `table[x[i]]` load and calls the lookup injective,
    and FuseOps fuses only elementwise consumers into an integer kernel (kOutEWiseFusable): the
    lookup would run as a kernel of its own. It is elementwise in `x` (the table is a 256-entry
    constant), so it is fused into the producer of `x`, as the chain it replaced was.
    """

    def transform_module(self, mod, _ctx):
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and LUT_ATTR in func.attrs:
                mod[gvar] = func.with_attr("op_pattern", _ELEMWISE)
        return mod
