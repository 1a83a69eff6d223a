"""The kernel report of a compile: every fused kernel, its schedule, and its share of the arithmetic.

`compile_model` inserts two `CaptureModule` passes into the pipeline it builds with: one right after
FuseTIR (every kernel as lowered, before any schedule) and one after the last schedule pass (the
kernels as built, the Relax `main` that calls them). `kernel_table` then gives one record per
PrimFunc::

    {"name": "fused_int8_matmul_packed_...", "kind": "contraction", "schedule": "int8 tensorized",
     "rule": "int8-matmul", "macs": 393216, "calls": 1, "share": 0.93}

- kind: "contraction" when a reduction block multiply-accumulates the product of two buffer loads
  (matmul, conv, depthwise: read from the TIR, not the kernel name); "reduction" for any other
  reduction (softmax, norms, means); "elementwise" otherwise.
- schedule: "tuned" when the tuning database scheduled it, else the default rule that did
  (`schedules/default_schedule.py`) in user words (`SCHEDULE_WORDS`).
- macs: multiply-accumulates of one call: the iteration space of its contraction blocks, as the
  kernel executes it (nativeq's int8 kernels pad rows to whole register tiles and N/K to the dot
  tile, and count the padding). Symbolic sizes are bound to `dims` by name (default 64, batch 1).
- calls: how many `call_tir`s of the Relax functions name it; share = macs x calls over the
  model's total (0 when the model has no contraction).
- weight_bytes (added by `compile_model`, `sizes.py`): the bytes of the distinct constants its
  calls read, as the library stores them (after weight packing).
- onnx_nodes (added by `compile_model`, `provenance.py`): the ONNX nodes its calls compute,
  [{"op": "MatMul", "name": "/blocks.0/ff/MatMul"}, ...], compute nodes first.
"""

from __future__ import annotations

from nativeq.compile._tvm import Analyzer, Schedule, relax, structural_equal, tirx, tvm
from nativeq.compile.tir_rewrite import LOAD, loaded_buffer

CONTRACTION, REDUCTION, ELEMENTWISE = "contraction", "reduction", "elementwise"
SCHEDULE_WORDS = {
    "int8-matmul": "int8 tensorized",
    "float-matmul": "float32 tensorized",
    "depthwise": "int8 depthwise",
    "float-depthwise": "float32 depthwise",
    "int8-pack": "int8 pack",
    "float-pack": "float32 pack",
    "im2col": "im2col",
    "softmax": "softmax",
    "layer-norm": "layer norm",
    "float-attention": "float32 attention",
    "reduction": "reduction",
    "generic": "generic",
    "none": "unscheduled",
}
GENERIC_PATH = ("generic", "unscheduled")  # schedules on which a contraction is slow
DEFAULT_SIZE = 64  # a symbolic size the report is not given a value for
# ... larger ones, tried in turn when a contraction has no work at the smaller (a waveform of 64 samples is
# shorter than its first conv's kernel)
LARGER_SIZES = (1024, 16384)
BATCH_SIZE = 1  # ... when its name says batch
_BATCH_NAMES = ("batch", "batch_size", "n", "b", "bs")
_CALL_OPS = ("relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad")
_REDUCE = 2  # IterVar kCommReduce
# PrimFunc attributes a hand-written kernel the report cannot analyse states itself (e.g. schedules/attention.py):
RULE_ATTR = "nativeq.rule"  # the schedule, as `DefaultCpuSchedule.applied` names rules
MACS_ATTR = "nativeq.macs"  # multiply-accumulates of one call, over the model's symbolic sizes


@tvm.transform.module_pass(opt_level=0, name="nativeq.CaptureModule")
class CaptureModule:
    """Pass-through module pass that keeps the functions it sees, by name (`functions`)."""

    def __init__(self):
        self.functions: dict | None = None

    def transform_module(self, mod, _ctx):
        # NOTE: a copy of the mapping: later passes assign into the same IRModule object in place
        self.functions = {gvar.name_hint: func for gvar, func in mod.functions_items()}
        return mod


def report_dims(names, given: dict[str, int] | None = None, default: int = DEFAULT_SIZE) -> dict[str, int]:
    """The value of each symbolic size name for the report: `given`, else 1 for batch names, else `default`."""
    given = given or {}
    return {n: int(given.get(n, BATCH_SIZE if n.lower() in _BATCH_NAMES else default)) for n in sorted(set(names))}


def size_names(functions: dict) -> list[str]:
    """The names of the model's symbolic sizes the PrimFuncs of `functions` take."""
    from nativeq.tuning.template import size_vars

    # NOTE: a hand-written kernel's own size names (`RULE_ATTR`) are not the model's; its MACs are stated in the model's
    return sorted({name for f in functions.values() if isinstance(f, tirx.PrimFunc) and _attr(f, RULE_ATTR) is None
                   for name in size_vars(f)})


def kernel_table(lowered: dict, built: dict | None, tuned: dict, rules: dict, dims: dict[str, int]) -> list[dict]:
    """One record per PrimFunc (see the module docstring), sorted by share, then name.

    lowered: {name: function} right after FuseTIR (the kernels' arithmetic is read there);
    built: {name: function} after the schedule passes (which PrimFuncs are built, and the Relax
        functions whose call_tir are counted); None: use `lowered`;
    tuned: the kernels the tuning database scheduled (`ApplyTuningDatabase.applied`);
    rules: PrimFunc name -> default rule (`DefaultCpuSchedule.applied`).
    """
    built = built if built is not None else lowered
    calls = count_calls(built)
    records = []
    for name, func in built.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        source = lowered.get(name, func)
        kind, macs = analyze(source if isinstance(source, tirx.PrimFunc) else func, dims)
        rule = "tuned" if name in tuned else rules.get(name) or _attr(func, RULE_ATTR)
        records.append({"name": name, "kind": kind, "schedule": schedule_word(rule, kind), "rule": rule,
                        "macs": macs, "calls": calls.get(name, 0), "share": 0.0})
    total = sum(r["macs"] * r["calls"] for r in records)
    for r in records:
        r["share"] = r["macs"] * r["calls"] / total if total else 0.0
    records.sort(key=lambda r: (-r["share"], r["name"]))
    return records


def schedule_word(rule: str | None, kind: str) -> str:
    """The schedule of a kernel in user words, from the rule that scheduled it ("tuned": the database)."""
    if rule == "tuned":
        return "tuned"
    if rule is None:
        return "unscheduled"
    if rule == "generic" and kind == ELEMENTWISE:
        return "vectorized elementwise"
    return SCHEDULE_WORDS.get(rule, rule)


def called_kernel(expr) -> str | None:
    """The name of the PrimFunc `expr` calls (a call_tir, call_tir_inplace, call_tir_with_grad), else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in _CALL_OPS and expr.args \
            and isinstance(expr.args[0], tvm.ir.GlobalVar):
        return expr.args[0].name_hint
    return None


def count_calls(functions: dict) -> dict[str, int]:
    """How many call_tir of the Relax functions in `functions` name each PrimFunc."""
    counts: dict[str, int] = {}

    def visit(expr):
        if (name := called_kernel(expr)) is not None:
            counts[name] = counts.get(name, 0) + 1

    for func in functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return counts


def _attr(func, name: str):
    return func.attrs[name] if func.attrs is not None and name in func.attrs else None


def analyze(func, dims: dict[str, int]) -> tuple[str, int]:
    """(kind, multiply-accumulates of one call) of a PrimFunc, symbolic sizes bound to `dims` by name.

    A hand-written kernel that states its multiply-accumulates (`MACS_ATTR`, e.g. the attention kernel of
    schedules/attention.py) is a contraction of that many."""
    if (macs := _attr(func, MACS_ATTR)) is not None:
        return CONTRACTION, _bound(macs, dims)
    blocks = _blocks(func)
    kind, macs = ELEMENTWISE, 0
    for block in blocks:
        if not any(int(iv.iter_type) == _REDUCE for iv in block.iter_vars):
            continue
        if kind == ELEMENTWISE:
            kind = REDUCTION
        products = _multiply_accumulates(block)
        if products:
            kind = CONTRACTION
            macs += products * _iterations(block, dims)
    return kind, macs


def _blocks(func) -> list:
    """Every block of `func` (its statements), nested ones included; [] if TVM cannot schedule it."""
    try:
        sch = Schedule(func)
        pending, found = [sch.get_sblock("root")], []
        while pending:
            for child in sch.get_child_blocks(pending.pop()):
                found.append(sch.get(child))
                pending.append(child)
        return found
    except Exception:  # noqa: BLE001  (a function without a root block, or one TVM's schedule rejects)
        return []


def _strip_casts(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _is_operand(expr) -> bool:
    """A buffer load, possibly cast or shifted by a zero point (`a[i] - zp`)."""
    expr = _strip_casts(expr)
    if isinstance(expr, LOAD):
        return True
    if isinstance(expr, (tirx.Sub, tirx.Add)):
        return any(isinstance(_strip_casts(side), LOAD) for side in (expr.a, expr.b))
    return False


def _is_product(expr) -> bool:
    """`a * b` of two buffer loads that differ (x * x, a sum of squares, is a norm)."""
    expr = _strip_casts(expr)
    return (isinstance(expr, tirx.Mul) and _is_operand(expr.a) and _is_operand(expr.b)
            and not structural_equal(expr.a, expr.b))


def _multiply_accumulates(block) -> int:
    """Products a block accumulates per iteration: 1 for `C[i] = C[i] + a * b` with a and b buffer loads,
    2 for `C[i] = C[i] + (a * b + c * d)` (a depthwise conv's pair of taps summed in int16), else 0."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return 0
    for acc, term in ((store.value.a, store.value.b), (store.value.b, store.value.a)):
        if not (isinstance(acc, LOAD) and loaded_buffer(acc).same_as(store.buffer)):
            continue
        term = _strip_casts(term)
        if _is_product(term):
            return 1
        if isinstance(term, tirx.Add) and _is_product(term.a) and _is_product(term.b):
            return 2
    return 0


def _bound(expr, dims: dict[str, int]) -> int:
    """`expr` with its symbolic sizes bound to `dims` by name (0 if it stays unknown; at least 0)."""
    if isinstance(expr, int):
        return max(expr, 0)
    analyzer = Analyzer()
    for var in tirx.analysis.undefined_vars(expr, []):
        value = dims.get(var.name, BATCH_SIZE if var.name.lower() in _BATCH_NAMES else DEFAULT_SIZE)
        analyzer.bind(var, tirx.IntImm(var.ty.dtype, int(value)))
    expr = analyzer.simplify(expr)
    return max(int(expr), 0) if isinstance(expr, tirx.IntImm) else 0


def _iterations(block, dims: dict[str, int]) -> int:
    """The product of a block's iteration extents, symbolic sizes bound to `dims` (0 if one stays unknown)."""
    total = 1
    for iv in block.iter_vars:
        extent = _bound(iv.dom.extent, dims)
        if extent == 0:
            return 0
        total *= extent
    return total


def report_lines(kernels: list[dict], explain: bool, dims: dict[str, int] | None = None) -> list[str]:
    """The summary lines of the kernel report: one count line, or (explain) the table and its warnings."""
    contractions = [k for k in kernels if k["kind"] == CONTRACTION]
    slow = [k for k in contractions if k["schedule"] in GENERIC_PATH]
    if not explain:
        return [f"  kernels: {len(kernels)} ({len(contractions)} contraction, {len(slow)} on the generic path)"]
    from nativeq._text import aligned_table, nodes_text
    from nativeq.runtime.manifest import kernel_onnx_nodes

    at = f" at {', '.join(f'{k}={v}' for k, v in dims.items())}" if dims else ""
    rows = [(k["name"], k["kind"], k["schedule"], f"{100 * k['share']:.1f}" if k["kind"] == CONTRACTION else "-",
             str(k["calls"]), nodes_text(kernel_onnx_nodes(k))) for k in kernels]
    lines = [f"kernels: {len(kernels)} ({len(contractions)} contraction, {len(slow)} on the generic path); "
             f"MACs share{at}",
             aligned_table(("kernel", "kind", "schedule", "MACs %", "calls", "ONNX nodes"), rows)]
    for k in slow:
        nodes = kernel_onnx_nodes(k, compute_only=True)
        computes = f" (ONNX {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})" if nodes else ""
        lines.append(f"WARNING: contraction kernel {k['name']}{computes} ({100 * k['share']:.1f}% of MACs) is on the "
                     f"generic path: expect it to be slow")
    return lines
