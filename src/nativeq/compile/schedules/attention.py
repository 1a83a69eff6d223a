"""FloatAttentionInRowBlocks: float attention, softmax(Q·Kᵀ)·V, as one kernel over blocks of query rows.

Where it sits: first of `kernel_relax_passes(target)` (schedules/__init__.py), after the int8 passes
(an 8-bit Q·Kᵀ has become an integer matmul by then and is not matched) and before the float
matmuls are packed for the target's multiply-add intrinsic.

A model quantized with `quantize_dynamic` (and any float model) keeps attention in float:

    s = R.matmul(q, kt)                 # [heads, T, T], optionally times / divided by a constant
    p = R.nn.softmax(s, axis=-1)
    o = R.matmul(p, v)                  # [heads, T, dv]

Three kernels wrote and read the heads x T x T scores through memory three times: 16 MB per
layer at T = 1000 for 4 heads, 55% of a dynamic Conformer's time there, at the speed of memory.
Here one kernel takes `rows` query rows of one head at a time (in parallel over heads x row
blocks): their scores (rows x T floats, in L1/L2) by FMAs in k order, the softmax of each row as
MLAS computes it (`legalize_like_ort._mlas_softmax`: the same exp, the same 16 lane sums in chunk
order and pairwise lane reduction, e * (1 / sum)), then P·V by FMAs in j order into a register tile
of rows x dv. Every value is computed in the order and with the roundings of the three kernels it
replaces, so the result is bit-identical to them.

Only float32 chains where q [..., Tq, dk], kt [..., dk, Tk] and v [..., Tk, dv] share their batch dims
(no broadcasting), dk and dv are known at compile time, the softmax is over the last axis, and the
scores and probabilities have no other reader.
"""

from __future__ import annotations

from dataclasses import dataclass

from nativeq import _ort_formulas as ort
from nativeq.compile._tvm import Analyzer, T, relax, tirx, tvm
from nativeq.compile.kernels import MACS_ATTR, RULE_ATTR
from nativeq.compile.passes import rewrite_functions, use_counts
from nativeq.compile.passes.legalize_like_ort import _fma as fma
from nativeq.compile.passes.legalize_like_ort import _mlas_sum_exp_element, mlas_lane_sum
from nativeq.compile.passes.qdq_sites import op_name, resolve, static_scalar

ATTENTION_KERNEL = "float_attention"
ATTENTION_RULE = "float-attention"
_CHUNK = ort.SOFTMAX_LANES  # score columns per chunk: MLAS's 16 softmax lane accumulators
_VECTOR_REGISTERS = {4: 32, 8: 16, 16: 32}  # float lanes per vector -> vector registers (NEON, AVX2, AVX-512)


@dataclass(frozen=True)
class TilePlan:
    """The register tiles of the attention kernel on one target.

    rows: query rows per block (each Kᵀ / V vector loaded serves them all); score_columns: score columns
    accumulated per pass over k (rows x score_columns floats in registers); panel: V vectors per pass of P·V
    (rows x panel vectors in registers; dv is covered in passes of `panel` vectors over the block's P)."""

    lanes: int
    rows: int
    score_columns: int
    panel: int


def tile_plan(lanes: int) -> TilePlan:
    """AVX-512 (16 lanes, 32 registers): 8 rows x 32 score columns, P·V 8 rows x 3 vectors; AVX2 (8 lanes, 16
    registers): 4 x 16, 4 x 3; NEON (4 lanes, 32 registers): 8 x 8, 8 x 3. Each tile leaves registers for the
    vectors it loads."""
    registers = _VECTOR_REGISTERS.get(lanes, 16)
    rows = 8 if registers >= 32 else 4
    score_columns = max(8, min(32, (registers // 2 // rows) * lanes))
    panel = (registers - 4) // rows
    return TilePlan(lanes=lanes, rows=rows, score_columns=score_columns, panel=panel)


def attention_kernel(dk: int, dv: int, plan: TilePlan, scale: float | None = None, divide: bool = False):
    """PrimFunc(q[B, H, Tq, dk], kt[B, H, dk, Tk], v[B, H, Tk, dv]) -> o[B, H, Tq, dv] = softmax(q·kt (* or / scale))·v.

    The last row block repeats its last row and stores only the real ones. A block's scores are padded to
    whole passes of `plan.score_columns` and whole chunks of 16 with copies of each row's last column
    (computed from a clamped copy of Kᵀ's last columns): that leaves the row maximum as it is, and the
    padded lanes add +0 to the sums, as MLAS's masked last chunk does.
    """
    rows, lanes, columns = plan.rows, plan.lanes, plan.score_columns
    chunk = _CHUNK
    padded = max(columns, chunk)  # a row's scores are padded to a multiple of both
    assert padded % columns == 0 and padded % chunk == 0, plan
    panel_width = plan.panel * lanes
    full_panels, last_width = divmod(dv, panel_width)

    def scaled(value):
        if scale is None:
            return value
        return value / T.float32(scale) if divide else value * T.float32(scale)

    @T.macro
    def score_pass(s, q_tile, kt_columns, b, h, column_of, first):
        acc = T.alloc_buffer((rows, columns), "float32", scope="local")
        for r in T.unroll(rows):
            for j in T.vectorized(columns):
                acc[r, j] = T.float32(0)
        for k in T.serial(dk):
            # the rows' q values at k as one vector, read by lane (NEON: one load and `fmla` by element; x86 folds
            # the lanes back into broadcast loads)
            q_k = T.alloc_buffer((rows,), "float32", scope="local")
            for r in T.vectorized(rows):
                q_k[r] = q_tile[k, r]
            for r in T.unroll(rows):
                for j in T.vectorized(columns):
                    acc[r, j] = fma("float32", q_k[r], kt_columns[b, h, k, column_of + j], acc[r, j])
        for r in T.unroll(rows):
            for j in T.vectorized(columns):
                s[r, first + j] = scaled(acc[r, j])

    @T.macro
    def times_v(o, s, v, b, h, row0, tq, tk, start, width):
        acc = T.alloc_buffer((rows, width), "float32", scope="local")
        for r in T.unroll(rows):
            for d in T.vectorized(width):
                acc[r, d] = T.float32(0)
        tail = width // lanes * lanes  # a last vector of fewer lanes
        for j in T.serial(tk):
            for r in T.unroll(rows):
                for dc in T.unroll(width // lanes):
                    for d in T.vectorized(lanes):
                        acc[r, dc * lanes + d] = fma("float32", s[r, j], v[b, h, j, start + dc * lanes + d],
                                                     acc[r, dc * lanes + d])
                if width % lanes > 0:
                    for d in T.vectorized(width % lanes):
                        acc[r, tail + d] = fma("float32", s[r, j], v[b, h, j, start + tail + d], acc[r, tail + d])
        for r in T.serial(rows):
            if row0 + r < tq:
                for d in T.vectorized(width):
                    o[b, h, row0 + r, start + d] = acc[r, d]

    @T.prim_func(private=True, s_tir=True)
    def attention(q_handle: T.handle, kt_handle: T.handle, v_handle: T.handle, o_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, RULE_ATTR: ATTENTION_RULE})
        batch = T.int64()
        heads = T.int64()
        tq = T.int64()
        tk = T.int64()
        q = T.match_buffer(q_handle, (batch, heads, tq, dk), "float32")
        kt = T.match_buffer(kt_handle, (batch, heads, dk, tk), "float32")
        v = T.match_buffer(v_handle, (batch, heads, tk, dv), "float32")
        o = T.match_buffer(o_handle, (batch, heads, tq, dv), "float32")
        for task in T.parallel(batch * heads * ((tq + rows - 1) // rows)):
            b = task // ((tq + rows - 1) // rows) // heads
            h = task // ((tq + rows - 1) // rows) % heads
            row0 = task % ((tq + rows - 1) // rows) * rows
            q_tile = T.alloc_buffer((dk, rows), "float32", scope="local")  # k-major: a k's rows adjacent
            for r in T.unroll(rows):
                for k in T.serial(dk):
                    q_tile[k, r] = q[b, h, T.min(row0 + r, tq - 1), k]
            # the block's scores, padded to a whole number of `padded` columns; then, in place, their exps, then P
            s = T.alloc_buffer((rows, (tk + padded - 1) // padded * padded), "float32")
            for c in T.serial(tk // padded * padded // columns):
                score_pass(s, q_tile, kt, b, h, c * columns, c * columns)
            if tk % padded > 0:
                kt_last = T.alloc_buffer((1, 1, dk, padded), "float32", scope="local")
                for k in T.serial(dk):
                    for j in T.serial(padded):
                        kt_last[0, 0, k, j] = kt[b, h, k, T.min(tk // padded * padded + j, tk - 1)]
                for c in T.unroll(padded // columns):
                    score_pass(s, q_tile, kt_last, 0, 0, c * columns, tk // padded * padded + c * columns)
            for r in T.serial(rows):
                maxima = T.alloc_buffer((chunk,), "float32", scope="local")
                for j in T.vectorized(chunk):
                    maxima[j] = s[r, j]
                for c in T.serial(1, (tk + padded - 1) // padded * padded // chunk):
                    for j in T.vectorized(chunk):
                        maxima[j] = T.max(maxima[j], s[r, c * chunk + j])
                top = T.alloc_buffer((1,), "float32", scope="local")
                top[0] = maxima[0]
                for j in T.serial(1, chunk):
                    top[0] = T.max(top[0], maxima[j])
                sums = T.alloc_buffer((chunk,), "float32", scope="local")
                for j in T.vectorized(chunk):
                    sums[j] = T.float32(0)
                for c in T.serial(tk // chunk):
                    for j in T.vectorized(chunk):
                        s[r, c * chunk + j] = _mlas_sum_exp_element(s[r, c * chunk + j] - top[0], "float32")
                        sums[j] = sums[j] + s[r, c * chunk + j]
                if tk % chunk > 0:  # MLAS's masked last chunk
                    for j in T.vectorized(chunk):
                        s[r, tk // chunk * chunk + j] = _mlas_sum_exp_element(s[r, tk // chunk * chunk + j] - top[0],
                                                                              "float32")
                        sums[j] = sums[j] + s[r, tk // chunk * chunk + j] * T.Cast("float32", T.Cast("int64", j) < tk % chunk)
                inverse = T.alloc_buffer((1,), "float32", scope="local")
                inverse[0] = T.float32(1) / mlas_lane_sum(sums)
                for c in T.serial((tk + chunk - 1) // chunk):
                    for j in T.vectorized(chunk):
                        s[r, c * chunk + j] = s[r, c * chunk + j] * inverse[0]
            for p in T.serial(full_panels):
                times_v(o, s, v, b, h, row0, tq, tk, p * panel_width, panel_width)
            if last_width > 0:
                times_v(o, s, v, b, h, row0, tq, tk, full_panels * panel_width, last_width)

    return attention


_SCALE_OPS = {"relax.multiply": False, "relax.divide": True}  # op -> divide


def _static_dim(dim) -> int | None:
    return int(dim) if isinstance(dim, tirx.IntImm) else None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, plan: TilePlan):
        super().__init__(mod)
        self.plan = plan
        self.rewritten = 0

    def prepare(self, func):
        self.var2val = relax.analysis.get_var2val(func)
        self.uses = use_counts(func)

    def transform(self):
        return rewrite_functions(self, self.prepare, remove_unused=True)

    def _only_reader(self, var) -> bool:
        return isinstance(var, relax.Var) and self.uses.get(var, 0) == 1

    def _scores(self, s):
        """(q, kt, scale, divide) if `s` is matmul(q, kt), optionally times / divided by a scalar constant, read
        only by the softmax; else None."""
        value = resolve(s, self.var2val)
        scale, divide = None, False
        if op_name(value) in _SCALE_OPS:
            divide = _SCALE_OPS[op_name(value)]
            product, constant = value.args
            if not divide and static_scalar(product, self.var2val) is not None:
                product, constant = constant, product
            constant = static_scalar(constant, self.var2val)
            if constant is None or str(constant.dtype) != "float32" or not self._only_reader(product):
                return None
            scale, value = float(constant), resolve(product, self.var2val)
        if op_name(value) != "relax.matmul":
            return None
        return value.args[0], value.args[1], scale, divide

    def _match(self, call):
        """(q, kt, v, scale, divide) if `call` (a matmul) is the P·V of a float attention this kernel computes."""
        if op_name(call) != "relax.matmul" or not self._only_reader(call.args[0]):
            return None
        softmax = resolve(call.args[0], self.var2val)
        if op_name(softmax) != "relax.nn.softmax" or not self._only_reader(softmax.args[0]):
            return None
        scores = self._scores(softmax.args[0])
        if scores is None:
            return None
        q, kt, scale, divide = scores
        v = call.args[1]
        tensors = (q, kt, v, softmax, call)
        if any(str(t.ty.dtype) != "float32" or t.ty.ndim < 3 or t.ty.ndim != q.ty.ndim for t in tensors):
            return None
        if any(not isinstance(getattr(t.ty, "shape", None), relax.ShapeExpr) for t in tensors):
            return None
        if int(softmax.attrs.axis) % q.ty.ndim != q.ty.ndim - 1:
            return None
        q_shape, kt_shape, v_shape = (list(t.ty.shape.values) for t in (q, kt, v))
        analyzer = Analyzer()
        same = analyzer.can_prove_equal
        if not all(same(a, b) and same(a, c) for a, b, c in zip(q_shape[:-2], kt_shape[:-2], v_shape[:-2])):
            return None  # broadcast batch dims
        dk, dv = _static_dim(q_shape[-1]), _static_dim(v_shape[-1])
        if dk is None or dv is None or not same(kt_shape[-2], q_shape[-1]) or not same(kt_shape[-1], v_shape[-2]):
            return None
        return q, kt, v, scale, divide

    def visit_var_binding_(self, binding):
        matched = self._match(binding.value)
        if matched is None:
            return super().visit_var_binding_(binding)
        q, kt, v, scale, divide = (self.visit_expr(x) if isinstance(x, relax.Expr) else x for x in matched)
        bb = self.builder_
        q_shape, kt_shape, v_shape = (list(t.ty.shape.values) for t in (q, kt, v))
        batch = q_shape[:-2]
        # the kernel's [B, H] batch dims: the model's two (exporters' [batch, heads, T, d]), else views folding them
        if len(batch) == 2:
            kernel_batch = batch
        else:
            leading = 1
            for dim in batch[:-1]:
                leading = leading * dim
            kernel_batch = [leading, batch[-1]]
        dk, dv = int(q_shape[-1]), int(v_shape[-1])

        def as_kernel_batch(x, shape):
            if len(batch) == 2:
                return x
            return bb.emit(relax.op.reshape(x, relax.ShapeExpr([*kernel_batch, *shape])))

        macs = kernel_batch[0] * kernel_batch[1] * q_shape[-2] * kt_shape[-1] * (dk + dv)
        kernel = attention_kernel(dk, dv, self.plan, scale, divide).with_attr(MACS_ATTR, macs)
        gvar = bb.add_func(kernel, ATTENTION_KERNEL)
        args = [as_kernel_batch(q, q_shape[-2:]), as_kernel_batch(kt, kt_shape[-2:]), as_kernel_batch(v, v_shape[-2:])]
        result = relax.call_tir(gvar, args, relax.TensorType([*kernel_batch, q_shape[-2], dv], "float32"))
        if len(batch) != 2:
            result = relax.op.reshape(bb.emit(result), relax.ShapeExpr([*batch, q_shape[-2], dv]))
        self.rewritten += 1
        # NOTE: bound to the P·V's own variable: the kernel report's provenance (compile/provenance.py) then gives the
        # kernel the nodes of the Q·Kᵀ and softmax bindings it replaces, which reach the P·V through their users
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(result)))


@tvm.transform.module_pass(opt_level=0, name="nativeq.FloatAttentionInRowBlocks")
class FloatAttentionInRowBlocks:
    """Compute each float softmax(Q·Kᵀ)·V as one kernel over blocks of query rows (see the module docstring)."""

    def __init__(self, fma_intrin):
        self.plan = tile_plan(fma_intrin.lanes)

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod, self.plan).transform()
