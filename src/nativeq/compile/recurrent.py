"""ONNX `LSTM`, `GRU` and `RNN` -> Relax: an input projection plus one TIR recurrence per direction.

Pipeline position: converters of the ONNX import (`onnx_import._CONVERTER_FIXES`); TVM 0.27's
importer has none for these ops. ONNX Runtime's `quantize_static` leaves them in float inside
QDQ models, so they only ever see float32 tensors.

Lowering, per direction `d`:

1. the input projection `X·W[d]ᵀ` for every time step at once, as a TIR PrimFunc (blocks of 4
   rows in parallel, their X rows interleaved k-major, 4 x 16 accumulator tiles kept in registers,
   `W[d]ᵀ` packed in panels of 16 gate columns contiguous over k; 8 rows on AVX-512, rebuilt for the
   target by `schedules/recurrent_projection.py`);
   a Relax matmul would get the default
   CPU schedules, which run a float matmul with a symbolic row count as one strided serial dot
   product per output (10x slower);
2. one `relax.call_tir` to a TIR PrimFunc (built here, added with `bb.add_func`) that runs the
   recurrence: a serial loop over time, the batch elements one after the other inside (an LSTM's
   take each panel of `R[d]ᵀ` in turn; they are independent), `H·R[d]ᵀ` with `R[d]ᵀ` packed in
   panels of gate columns, each contiguous over all of k and accumulated in registers
   (`_state_times_rt_panels`; `R[d]ᵀ` row by row, 4 rows per pass over the gates, when the hidden
   size is not a multiple of 16), then the biases, peepholes and activations in contiguous
   per-gate loops. Each time step runs in parallel over slices of the hidden units (`_PARTS`): a
   thread streams only its slice's columns of `R[d]ᵀ` (which alone exceeds L1 and, for a 256-unit
   LSTM, a core's L2) and writes its units of the next state to a second buffer, so the sums are
   those of one thread. Sigmoid and Tanh are MLAS's polynomials (ORT's LSTM/GRU/RNN call
   MlasComputeLogistic/MlasComputeTanh), which vectorize where libm's expf did not, and sums
   follow ORT's order, so outputs are within a few ulps of ORT's. Time `T` and batch `B` are
   symbolic; the input and hidden sizes are static. Both PrimFuncs are marked
   `tirx.is_scheduled` so nativeq's default schedules and dlight leave them alone.

ONNX semantics implemented (onnx.ai operator docs; ONNX Runtime is the reference):

- Inputs `X, W, R, B, sequence_lens, initial_h` (+ `initial_c, P` for LSTM), all optional
  inputs may be absent; outputs `Y [T, D, B, H]`, `Y_h [D, B, H]` (+ `Y_c` for LSTM), any
  subset requested. `layout=1` (opset 14): `X [B, T, I]`, `Y [B, T, D, H]`,
  `initial_h/initial_c/Y_h/Y_c [B, D, H]`.
- `direction` forward / reverse / bidirectional (D = 2: forward is `Y[:, 0]`).
- LSTM (gates i, o, f, c in W/R/B; peepholes P in order i, o, f):
  `i = f(Xi + Hi + Pi⊙C_{t-1})`, `f = f(Xf + Hf + Pf⊙C_{t-1})` (or `1 - i` with
  `input_forget=1`), `c = g(Xc + Hc)`, `C_t = f⊙C_{t-1} + i⊙c`, `o = f(Xo + Ho + Po⊙C_t)`,
  `H_t = o⊙h(C_t)`, where `Xg = X_t·Wgᵀ + Wbg` and `Hg = H_{t-1}·Rgᵀ + Rbg`.
- GRU (gates z, r, h): `z = f(Xz + Hz)`, `r = f(Xr + Hr)`,
  `h~ = g(Xh + (r⊙H_{t-1})·Rhᵀ + Rbh)` (`linear_before_reset=0`) or
  `h~ = g(Xh + r⊙(H_{t-1}·Rhᵀ + Rbh))` (`linear_before_reset=1`, what torch exports),
  `H_t = (1 - z)⊙h~ + z⊙H_{t-1}`.
- RNN: `H_t = f(X_t·Wᵀ + H_{t-1}·Rᵀ + Wb + Rb)`.
- `clip`: every gate pre-activation is clipped to `[-clip, clip]` before its activation.
- `sequence_lens`: batch element `b` runs `sequence_lens[b]` steps (reverse direction: from
  step `sequence_lens[b] - 1` down to 0); `Y` is zero at later steps and `Y_h`/`Y_c` hold the
  last computed state (zeros for a length of 0, as ORT does; the spec does not say).
- `activations`: Sigmoid, Tanh and Relu in any position (defaults: Sigmoid/Tanh/Tanh for LSTM,
  Sigmoid/Tanh for GRU, Tanh for RNN).

Refused with a one-line `NativeqError` naming node, op and attribute: other activation
functions, `activation_alpha`/`activation_beta`, attributes of older opsets
(`output_sequence`), non-float32 inputs, a non-static input or hidden size. Attribute refusals
happen before import (`check_node`, called by the importer's supported-ops check).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from nativeq.compile._tvm import T, onnx_frontend, relax, tirx
from nativeq.compile.passes.legalize_like_ort import mlas_logistic_value, mlas_tanh_value
from nativeq.errors import NativeqError

# Per op: number of gates, default activations (per direction), attributes understood.
_COMMON_ATTRS = {"activations", "activation_alpha", "activation_beta", "clip", "direction", "hidden_size", "layout"}
_OP_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_OP_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_OP_ATTRS = {
    "LSTM": _COMMON_ATTRS | {"input_forget"},
    "GRU": _COMMON_ATTRS | {"linear_before_reset"},
    "RNN": _COMMON_ATTRS,
}
# Sigmoid and Tanh as MLAS evaluates them (ORT's recurrent kernels call MlasComputeLogistic/Tanh):
# polynomials, so the gate loops vectorize, and results within an ulp or two of ORT's.
_ACTIVATIONS = {
    "sigmoid": mlas_logistic_value,
    "tanh": mlas_tanh_value,
    "relu": lambda x: T.max(x, T.float32(0)),
}
_DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}


class _RecurrentOp(onnx_frontend.OnnxOpConverter):
    """Converter shared by LSTM, GRU and RNN: `op` names which one."""

    op = ""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _convert(bb, cls.op, inputs, attr)


class LSTM(_RecurrentOp):
    """ONNX LSTM (opsets 1-22; see the module docstring)."""

    op = "LSTM"


class GRU(_RecurrentOp):
    """ONNX GRU (opsets 1-22; see the module docstring)."""

    op = "GRU"


class RNN(_RecurrentOp):
    """ONNX RNN (opsets 1-22; see the module docstring)."""

    op = "RNN"


CONVERTERS = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}


# ---------------------------------------------------------------------------------------------
# Relax side: attributes, input projection, one call_tir per direction, output layout


def check_node(node) -> None:
    """Refuse an LSTM/GRU/RNN `onnx.NodeProto` whose attributes this lowering does not implement.

    Run before import (`onnx_import._Importer._check_for_unsupported_ops`): a refusal raised
    inside TVM's importer is preceded by its own print of the node's inputs.
    """
    _Attributes(node.op_type, node.name, {a.name: helper.get_attribute_value(a) for a in node.attribute})


class _Attributes:
    """A node's attributes, checked and with ONNX defaults filled in."""

    def __init__(self, op: str, node_name: str, attr: dict):
        self.op = op
        self.node = node_name or "<unnamed>"
        for name in attr:
            if name != "tvm_custom" and name not in _OP_ATTRS[op]:
                self.refuse(name, "is not supported")
        for name in ("activation_alpha", "activation_beta"):
            if attr.get(name):
                self.refuse(name, "is not supported (only parameter-free activations are)")
        direction = _text(attr.get("direction", b"forward"))
        if direction not in _DIRECTIONS:
            self.refuse("direction", f"'{direction}' is not one of forward, reverse, bidirectional")
        self.reverse_flags = _DIRECTIONS[direction]
        self.num_gates = _OP_GATES[op]
        self.layout = int(attr.get("layout", 0))
        if self.layout not in (0, 1):
            self.refuse("layout", f"{self.layout} is not 0 or 1")
        clip = attr.get("clip")
        self.clip = None if clip is None else float(clip)
        self.input_forget = bool(attr.get("input_forget", 0))
        self.linear_before_reset = bool(attr.get("linear_before_reset", 0))
        self.hidden_size = attr.get("hidden_size")

        names = attr.get("activations")
        names = [_text(n) for n in names] if names else list(_OP_DEFAULT_ACTIVATIONS[op]) * len(self.reverse_flags)
        per_direction = len(_OP_DEFAULT_ACTIVATIONS[op])
        if len(names) != per_direction * len(self.reverse_flags):
            self.refuse("activations", f"has {len(names)} entries, expected {per_direction} per direction")
        unknown = [n for n in names if n.lower() not in _ACTIVATIONS]
        if unknown:
            self.refuse("activations", f"{unknown[0]} is not supported (only Sigmoid, Tanh, Relu)")
        self.activations = [tuple(n.lower() for n in names[d * per_direction:(d + 1) * per_direction])
                            for d in range(len(self.reverse_flags))]

    def refuse(self, what: str, why: str):
        raise NativeqError(f"node '{self.node}' ({self.op}): {what} {why}")


class _Spec(_Attributes):
    """Attributes plus what the Relax inputs fix statically: the hidden size (float32 only)."""

    def __init__(self, op: str, attr: dict, inputs):
        super().__init__(op, attr.get("tvm_custom", {}).get("name"), attr)
        x, w, r = inputs[0], inputs[1], inputs[2]
        for name, value in (("X", x), ("W", w), ("R", r)):
            if value is None or not isinstance(getattr(value, "ty", None), relax.TensorType) or value.ty.shape is None:
                self.refuse(f"input {name}", "has no known shape")
            if str(value.ty.dtype) != "float32":
                self.refuse(f"input {name}", f"has dtype {value.ty.dtype} (only float32 is supported)")
        if x.ty.ndim != 3:
            self.refuse("input X", f"has {x.ty.ndim} dimensions, expected 3")
        w_dims, r_dims = _static_dims(w), _static_dims(r)
        if w_dims is None or r_dims is None or len(w_dims) != 3 or len(r_dims) != 3:
            self.refuse("input W/R", "needs static 3-D shapes")
        self.hidden = r_dims[2]
        if self.hidden_size is not None and int(self.hidden_size) != self.hidden:
            self.refuse("hidden_size", f"{self.hidden_size} disagrees with R's shape {r_dims}")
        if w_dims[0] != len(self.reverse_flags) or w_dims[1] != self.num_gates * self.hidden:
            self.refuse("input W", f"shape {w_dims} does not fit direction and hidden_size {self.hidden}")


def _convert(bb, op: str, inputs, attr):
    """Relax expression for one LSTM/GRU/RNN node: a tuple of its outputs (Y, Y_h[, Y_c])."""
    inputs = list(inputs) + [None] * (8 - len(inputs))
    spec = _Spec(op, attr, inputs)
    x, w, r, bias, lens, initial_h, initial_c, peephole = inputs[:8]
    hidden, gates = spec.hidden, spec.num_gates * spec.hidden
    if spec.layout == 1:  # [B, T, I] -> [T, B, I]; states [B, D, H] -> [D, B, H]
        x = bb.normalize(relax.op.permute_dims(x, [1, 0, 2]))
        initial_h = None if initial_h is None else bb.normalize(relax.op.permute_dims(initial_h, [1, 0, 2]))
        initial_c = None if initial_c is None else bb.normalize(relax.op.permute_dims(initial_c, [1, 0, 2]))
    steps, batch, _ = x.ty.shape.values
    input_size = _static_dims(w)[2]
    if lens is not None:
        lens = bb.normalize(relax.op.astype(lens, "int32"))

    ys, y_hs, y_cs = [], [], []
    for d, reverse in enumerate(spec.reverse_flags):
        w_d, r_d = _take(bb, w, d), _take(bb, r, d)
        if bias is None:
            w_bias = r_bias = bb.normalize(relax.const(np.zeros(gates, "float32")))
        else:
            bias_d = _take(bb, bias, d)
            w_bias = _slice(bb, bias_d, 0, gates)
            r_bias = _slice(bb, bias_d, gates, 2 * gates)
        state_shape = relax.ShapeExpr([batch, hidden])
        h0 = _take(bb, initial_h, d) if initial_h is not None else bb.normalize(relax.op.zeros(state_shape, "float32"))
        # Bias added after the dot products; GRU with linear_before_reset=1 adds Rbh inside r⊙(...) instead.
        if op == "GRU" and spec.linear_before_reset:
            gate_bias = relax.op.add(w_bias, relax.op.concat(
                [_slice(bb, r_bias, 0, 2 * hidden), relax.const(np.zeros(hidden, "float32"))]))
        else:
            gate_bias = relax.op.add(w_bias, r_bias)
        projection = bb.add_func(_projection_kernel(input_size, gates), f"{op.lower()}_projection_i{input_size}_g{gates}")
        projected = bb.emit(relax.call_tir(projection, [x, _projection_panels(bb, w_d, input_size, gates)],
                                           relax.TensorType([steps, batch, gates], "float32")))
        r_transposed = bb.normalize(relax.op.permute_dims(r_d))  # [H, G·H]: row k scales H_{t-1}[k]
        panel = _panel_width(spec)
        if panel is not None:  # [G·H / panel, H, panel]: a panel of columns, contiguous over all of k
            r_transposed = bb.normalize(relax.op.permute_dims(
                relax.op.reshape(r_transposed, [hidden, gates // panel, panel]), [1, 0, 2]))
        lens_arg = lens if lens is not None else bb.normalize(relax.const(np.zeros(1, "int32")))

        kernel_args = [projected, r_transposed, bb.normalize(gate_bias)]
        if op == "LSTM":
            p_d = _take(bb, peephole, d) if peephole is not None else relax.const(np.zeros(3 * hidden, "float32"))
            c0 = _take(bb, initial_c, d) if initial_c is not None else relax.op.zeros(state_shape, "float32")
            kernel_args += [p_d, h0, bb.normalize(c0)]
        elif op == "GRU":
            kernel_args += [_slice(bb, r_bias, 2 * hidden, 3 * hidden), h0]
        else:
            kernel_args += [h0]
        kernel_args.append(lens_arg)

        kernel = _KERNEL_BUILDERS[op](spec, spec.activations[d], reverse, has_lens=lens is not None)
        name = f"{op.lower()}_{'reverse' if reverse else 'forward'}_h{hidden}"
        gvar = bb.add_func(kernel, name)
        out_types = [relax.TensorType([steps, batch, hidden], "float32"), relax.TensorType([batch, hidden], "float32")]
        if op == "LSTM":
            out_types.append(relax.TensorType([batch, hidden], "float32"))
        result = bb.emit(relax.call_tir(gvar, kernel_args, out_types))
        ys.append(relax.op.expand_dims(relax.TupleGetItem(result, 0), 1))
        y_hs.append(relax.op.expand_dims(relax.TupleGetItem(result, 1), 0))
        if op == "LSTM":
            y_cs.append(relax.op.expand_dims(relax.TupleGetItem(result, 2), 0))

    outputs = [bb.normalize(relax.op.concat(ys, axis=1)), bb.normalize(relax.op.concat(y_hs, axis=0))]
    if op == "LSTM":
        outputs.append(bb.normalize(relax.op.concat(y_cs, axis=0)))
    if spec.layout == 1:  # Y [T, D, B, H] -> [B, T, D, H]; states [D, B, H] -> [B, D, H]
        outputs = [bb.normalize(relax.op.permute_dims(outputs[0], [2, 0, 1, 3]))] + [
            bb.normalize(relax.op.permute_dims(state, [1, 0, 2])) for state in outputs[1:]]
    return relax.Tuple(outputs)


def _projection_panels(bb, w_d, input_size: int, gates: int):
    """W[d] [G·H, I] as the projection reads it: Wᵀ in panels of `_PROJECTION_COLUMNS` gate columns, each
    contiguous over all of k ([ceil(G·H / 16), I, 16], the last panel zero-padded). A k-step of a panel is one
    64-byte line and the next k-step the next line, so the kernel's unrolled k-steps load their weights in
    pairs (NEON `ldp`, whose offset reach is 1 KB; a row of the unpacked Wᵀ is 4 KB away)."""
    panels = -(-gates // _PROJECTION_COLUMNS)
    w_padded = w_d
    if panels * _PROJECTION_COLUMNS != gates:
        zeros = relax.const(np.zeros((panels * _PROJECTION_COLUMNS - gates, input_size), "float32"))
        w_padded = relax.op.concat([w_d, zeros], axis=0)
    return bb.normalize(relax.op.permute_dims(
        relax.op.reshape(w_padded, [panels, _PROJECTION_COLUMNS, input_size]), [0, 2, 1]))


def _take(bb, tensor, index: int):
    """`tensor[index]` along axis 0 (the direction axis of W, R, B, P and the states)."""
    return bb.normalize(relax.op.squeeze(relax.op.strided_slice(tensor, [0], [index], [index + 1]), [0]))


def _slice(bb, vector, begin: int, end: int):
    return bb.normalize(relax.op.strided_slice(vector, [0], [begin], [end]))


def _static_dims(expr) -> list[int] | None:
    dims = expr.ty.shape.values if expr.ty.shape is not None else None
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d.value) for d in dims]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# TIR side: the input projection, and the recurrence of one direction
#
# Every kernel is written so that its innermost loops run over contiguous float32 vectors (LLVM
# vectorizes them): dot products as axpy over the gate columns, activations as MLAS's polynomials
# (`mlas_logistic_value`, `mlas_tanh_value`) instead of libm's expf/tanhf, which LLVM cannot
# vectorize. Sums follow ORT's order (rnn/uni_directional_lstm.cc, deep_cpu_gru.cc): a gate's
# pre-activation is ((H_{t-1}·Rᵀ + X_t·Wᵀ) [+ P⊙C]) + (Wb + Rb), each dot product accumulated with
# one FMA per term from the first term on, as MLAS's SGEMM kernels do.


# Rows of Rᵀ accumulated per pass over the gates (the FMA chain below is written for 4).
_RT_ROWS = 4
# A time step's H·Rᵀ and gate updates run in parallel over this many slices of the hidden units (each
# thread streams its columns of Rᵀ; H_{t-1} is double-buffered so no slice reads a unit another one
# already updated). Only when every gate comes from H_{t-1} alone (LSTM, RNN, GRU with
# linear_before_reset): a GRU without it needs all of r before its candidate's products.
_PARTS = 4
# ...but a time step of fewer multiply-adds than this (H_{t-1}·Rᵀ: gates x hidden x hidden) runs on the calling
# thread: a parallel launch and join costs ~3-4 us, more than such a step's work (a 64-unit LSTM's is ~16k
# multiply-adds: Silero VAD's spent 3.2 us a step, ORT 1.8 us).
_MIN_PARALLEL_STEP_MACS = 1 << 17
# The projection's register tile: rows x columns, accumulated over all of k. Each weight vector loaded
# serves 4 rows (a row at a time re-read all of Wᵀ from L2 per row, L2-bound at ~23 GMAC/s); 4 x 16 floats
# are 4 AVX-512 / 8 AVX2 / 16 NEON registers, so the tile fits every target's register file.
_PROJECTION_ROWS = 4
_PROJECTION_COLUMNS = 16


def _fma(a, b, c):
    """a * b + c with one rounding."""
    return tirx.call_intrin("float32", "tirx.fma", a, b, c)


@T.macro
def _state_times_rt(gates, state_h, rt, b_lo, b_hi, hidden, blocks, lo, hi):
    """gates[b, q*H + g] = sum over k of H_{t-1}[b, k] * Rᵀ[k, q*H + g] for the batch elements b_lo <= b < b_hi,
    the gate blocks q < `blocks` and the hidden units lo <= g < hi, by FMAs in k order (ORT's order).

    Rows of Rᵀ stream in order (it is too large for L1; column blocks over all of k were 1.5x
    slower), `_RT_ROWS` rows per pass over `gates`, so `gates` is loaded and stored once per
    `_RT_ROWS` FMAs instead of once per FMA; each pass serves every batch element."""
    for q in T.serial(blocks):
        for b in T.serial(b_lo, b_hi):
            for g in T.serial(lo, hi):
                gates[b, q * hidden + g] = state_h[b, 0] * rt[0, q * hidden + g]
    for k_block in T.serial((hidden - 1) // _RT_ROWS):
        for q in T.serial(blocks):
            for b in T.serial(b_lo, b_hi):
                for g in T.serial(lo, hi):
                    gates[b, q * hidden + g] = _fma(
                        state_h[b, 1 + k_block * _RT_ROWS + 3], rt[1 + k_block * _RT_ROWS + 3, q * hidden + g],
                        _fma(state_h[b, 1 + k_block * _RT_ROWS + 2], rt[1 + k_block * _RT_ROWS + 2, q * hidden + g],
                             _fma(state_h[b, 1 + k_block * _RT_ROWS + 1], rt[1 + k_block * _RT_ROWS + 1, q * hidden + g],
                                  _fma(state_h[b, 1 + k_block * _RT_ROWS], rt[1 + k_block * _RT_ROWS, q * hidden + g],
                                       gates[b, q * hidden + g]))))
    for k in T.serial(1 + (hidden - 1) // _RT_ROWS * _RT_ROWS, hidden):
        for q in T.serial(blocks):
            for b in T.serial(b_lo, b_hi):
                for g in T.serial(lo, hi):
                    gates[b, q * hidden + g] = _fma(state_h[b, k], rt[k, q * hidden + g], gates[b, q * hidden + g])


@T.macro
def _state_times_rt_panels(gates, state_h, rt, b_lo, b_hi, hidden, blocks, lo, hi):
    """`_state_times_rt` on Rᵀ packed in panels (`rt[p, k, c]` = Rᵀ[k, p * panel + c], `_panel_width`): a
    panel of gate columns is accumulated in registers over all of k, by FMAs in k order (the same sums),
    reading each panel contiguously; H_{t-1}[k] is loaded once per panel instead of once per 4 columns. The
    batch elements take the panel one after another while it is in L1 (one after another over all of Rᵀ, each
    streamed it from L2 again: SQUIM's dual-path LSTMs, over 30-70 chunks at a time, 60 ms against 35 ms now)."""
    for q in T.serial(blocks):
        for p in T.serial((hi - lo) // rt.shape[2]):
            panel = (q * hidden + lo) // rt.shape[2] + p
            for b in T.serial(b_lo, b_hi):
                acc = T.alloc_buffer((rt.shape[2],), "float32", scope="local")
                for c in T.vectorized(rt.shape[2]):
                    acc[c] = state_h[b, 0] * rt[panel, 0, c]
                for k_block in T.serial((hidden - 1) // _RT_ROWS):
                    for u in T.unroll(_RT_ROWS):
                        for c in T.vectorized(rt.shape[2]):
                            acc[c] = _fma(state_h[b, 1 + k_block * _RT_ROWS + u],
                                          rt[panel, 1 + k_block * _RT_ROWS + u, c], acc[c])
                for k in T.serial(1 + (hidden - 1) // _RT_ROWS * _RT_ROWS, hidden):
                    for c in T.vectorized(rt.shape[2]):
                        acc[c] = _fma(state_h[b, k], rt[panel, k, c], acc[c])
                for c in T.vectorized(rt.shape[2]):
                    gates[b, q * hidden + lo + p * rt.shape[2] + c] = acc[c]


# Gate columns per panel of the packed Rᵀ (`_state_times_rt_panels`): 64 floats are 4 AVX-512 / 8 AVX2 / 16 NEON
# accumulator registers; one broadcast of H_{t-1}[k] serves them all.
_PANEL = 64


def _panel_width(spec) -> int | None:
    """Columns per panel of the packed Rᵀ, or None to keep Rᵀ row-major: every slice of hidden units a time step's
    threads take (`_part_bounds`) must be whole panels, and a GRU without linear_before_reset reads Rᵀ's candidate
    columns after its reset gate, outside the panels' loop."""
    if spec.op == "GRU" and not spec.linear_before_reset:
        return None
    _, units, _ = _step_split(spec)
    for panel in (_PANEL, 32, 16):
        if spec.hidden % panel == 0 and units % panel == 0:
            return panel
    return None


def _rt_layout(spec, gate_width: int):
    """(the shape of Rᵀ as the recurrence reads it, the macro computing H_{t-1}·Rᵀ on it)."""
    panel = _panel_width(spec)
    if panel is None:
        return (spec.hidden, gate_width), _state_times_rt
    return (gate_width // panel, spec.hidden, panel), _state_times_rt_panels


def _part_bounds(hidden: int, gates: int) -> tuple[int, int]:
    """(parts, units per part) of a time step split over threads: `_PARTS` slices of the hidden units, each a
    whole number of 16-float vectors (fewer parts when the hidden size is small; one below
    `_MIN_PARALLEL_STEP_MACS`)."""
    if gates * hidden * hidden < _MIN_PARALLEL_STEP_MACS:
        return 1, hidden
    per_part = -(-hidden // _PARTS)
    units = max(16, -(-per_part // 16) * 16)
    return -(-hidden // units), units


def _step_split(spec):
    """(parts, units per part, the TVMScript loop kind over the parts) of `spec`'s time step (`_part_bounds`)."""
    parts, units = _part_bounds(spec.hidden, _OP_GATES[spec.op])
    return parts, units, T.parallel if parts > 1 else T.serial


def _clipper(clip: float | None):
    """Gate pre-activation clip as a TIR expression builder (identity when `clip` is absent)."""
    if clip is None:
        return lambda value: value
    return lambda value: T.max(T.min(value, T.float32(clip)), T.float32(-clip))


# The attribute that names a projection PrimFunc's sizes ([input size, gate width]): `projection_for_target`
# rebuilds it with the target's register tile.
PROJECTION_ATTR = "nativeq.recurrent_projection"


def projection_rows(vector_bits: int) -> int:
    """Rows of the projection's register tile on a target with `vector_bits`-wide registers: each output is one FMA
    chain in k order (ORT's sums), so independent chains come from rows x 16 columns only. 4 rows are 16 NEON / 8 AVX2
    registers; on AVX-512 they are 4 chains, half of what two FMA units with a latency of 4 need: 8 rows there."""
    return 2 * _PROJECTION_ROWS if vector_bits >= 512 else _PROJECTION_ROWS


def projection_for_target(func, vector_bits: int):
    """A projection PrimFunc (`PROJECTION_ATTR`) rebuilt with the register tile of `projection_rows(vector_bits)`
    (the same sums, in the same order), or `func` itself when that is the tile it has."""
    input_size, gate_width = (int(v) for v in func.attrs[PROJECTION_ATTR])
    rows = projection_rows(vector_bits)
    if rows == _PROJECTION_ROWS:
        return func
    rebuilt = _projection_kernel(input_size, gate_width, rows)
    for key, value in func.attrs.items():
        rebuilt = rebuilt.with_attr(key, value)
    return rebuilt


def _projection_kernel(input_size: int, gate_width: int, rows_per_tile: int = _PROJECTION_ROWS):
    """PrimFunc(X[T,B,I], Wᵀ panels[P,I,16]) -> X·Wᵀ [T,B,G]: every time step at once, row blocks in parallel.

    Why not a Relax matmul: the default CPU schedules give a float matmul with a symbolic row count
    dlight's reduction rule, a serial dot product per output over a strided weight column (3 ms of
    the 3.4 ms of a T=200, 64 -> 256 LSTM projection). Here a tile of `rows_per_tile` rows (`projection_rows`) x
    `_PROJECTION_COLUMNS` columns (one panel of `_projection_panels`) is accumulated in registers over
    all of k (one FMA per term, in k order), each weight vector loaded once for the tile's rows; the
    last row block repeats its last row and stores only the real ones, the last panel of a gate width
    that is not a multiple of 16 stores only its real columns.
    """
    columns = _PROJECTION_COLUMNS
    chunks, tail = divmod(gate_width, columns)
    panels = chunks + (tail > 0)

    @T.macro
    def accumulate(acc, x_tile, wt, panel):
        for r in T.unroll(rows_per_tile):
            for g in T.vectorized(columns):
                acc[r, g] = x_tile[0, r] * wt[panel, 0, g]
        for k_block in T.serial((input_size - 1) // _RT_ROWS):
            for u in T.unroll(_RT_ROWS):
                # the k-step's rows as one vector, read by lane (NEON: one load, `fmla` by element; x86 folds
                # the lanes back into broadcast loads)
                x_k = T.alloc_buffer((rows_per_tile,), "float32", scope="local")
                for r in T.vectorized(rows_per_tile):
                    x_k[r] = x_tile[1 + k_block * _RT_ROWS + u, r]
                for r in T.unroll(rows_per_tile):
                    for g in T.vectorized(columns):
                        acc[r, g] = _fma(x_k[r], wt[panel, 1 + k_block * _RT_ROWS + u, g], acc[r, g])
        for k in T.serial(1 + (input_size - 1) // _RT_ROWS * _RT_ROWS, input_size):
            for r in T.unroll(rows_per_tile):
                for g in T.vectorized(columns):
                    acc[r, g] = _fma(x_tile[k, r], wt[panel, k, g], acc[r, g])

    @T.prim_func(private=True, s_tir=True)
    def projection(x_handle: T.handle, wt_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, PROJECTION_ATTR: [input_size, gate_width]})
        steps = T.int64()
        batch = T.int64()
        x = T.match_buffer(x_handle, (steps, batch, input_size), "float32")
        wt = T.match_buffer(wt_handle, (panels, input_size, columns), "float32")
        out = T.match_buffer(out_handle, (steps, batch, gate_width), "float32")
        for tile in T.parallel((steps * batch + rows_per_tile - 1) // rows_per_tile):
            # the tile's rows of X interleaved, k-major: one k's values of all rows are adjacent (one vector load on
            # NEON, broadcast by lane; one broadcast load each on x86) and need no address of their own
            x_tile = T.alloc_buffer((input_size, rows_per_tile), "float32", scope="local")
            for k in T.serial(input_size):
                for r in T.unroll(rows_per_tile):
                    row = T.min(tile * rows_per_tile + r, steps * batch - 1)
                    x_tile[k, r] = x[row // batch, row % batch, k]
            for chunk in T.serial(chunks):
                acc = T.alloc_buffer((rows_per_tile, columns), "float32", scope="local")
                accumulate(acc, x_tile, wt, chunk)
                for r in T.serial(rows_per_tile):
                    if tile * rows_per_tile + r < steps * batch:
                        for g in T.vectorized(columns):
                            row = tile * rows_per_tile + r
                            out[row // batch, row % batch, chunk * columns + g] = acc[r, g]
            if tail > 0:
                acc = T.alloc_buffer((rows_per_tile, columns), "float32", scope="local")
                accumulate(acc, x_tile, wt, chunks)
                for r in T.serial(rows_per_tile):
                    if tile * rows_per_tile + r < steps * batch:
                        for g in T.serial(tail):
                            row = tile * rows_per_tile + r
                            out[row // batch, row % batch, chunks * columns + g] = acc[r, g]

    return projection


def _lstm_kernel(spec: _Spec, activations, reverse: bool, has_lens: bool):
    """PrimFunc(X·Wᵀ[T,B,4H], Rᵀ[H,4H], Wb+Rb[4H], P[3H], h0[B,H], c0[B,H], lens) -> (Y[T,B,H], Y_h[B,H], Y_c[B,H])."""
    hidden, gate_width = spec.hidden, 4 * spec.hidden
    parts, units, step_loop = _step_split(spec)
    rt_shape, times_rt = _rt_layout(spec, gate_width)
    gate_act, cell_act, hidden_act = (_ACTIVATIONS[name] for name in activations)
    clip = _clipper(spec.clip)
    input_forget = spec.input_forget

    @T.prim_func(private=True, s_tir=True)
    def lstm(projected_handle: T.handle, rt_handle: T.handle, bias_handle: T.handle, p_handle: T.handle,
             h0_handle: T.handle, c0_handle: T.handle, lens_handle: T.handle, y_handle: T.handle,
             yh_handle: T.handle, yc_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        steps = T.int64()
        batch = T.int64()
        num_lens = T.int64()
        projected = T.match_buffer(projected_handle, (steps, batch, gate_width), "float32")
        rt = T.match_buffer(rt_handle, rt_shape, "float32")
        bias = T.match_buffer(bias_handle, (gate_width,), "float32")
        peephole = T.match_buffer(p_handle, (3 * hidden,), "float32")
        h0 = T.match_buffer(h0_handle, (batch, hidden), "float32")
        c0 = T.match_buffer(c0_handle, (batch, hidden), "float32")
        lens = T.match_buffer(lens_handle, (num_lens,), "int32")
        y = T.match_buffer(y_handle, (steps, batch, hidden), "float32")
        state_h = T.match_buffer(yh_handle, (batch, hidden), "float32")
        state_c = T.match_buffer(yc_handle, (batch, hidden), "float32")
        gates = T.alloc_buffer((batch, gate_width), "float32")
        next_h = T.alloc_buffer((batch, hidden), "float32")
        for b in T.serial(batch):
            if has_lens:
                length = T.Cast("int64", lens[b])
            else:
                length = steps
            for j in T.serial(hidden):  # a batch element of length 0 ends in zero states, as in ORT
                state_h[b, j] = T.if_then_else(length > 0, h0[b, j], T.float32(0))
                state_c[b, j] = T.if_then_else(length > 0, c0[b, j], T.float32(0))
        # time steps outermost, every batch element in each: a batch shares each panel of Rᵀ (the products of an
        # element past its length are computed and not used: its states stay as they were)
        step_at = T.alloc_buffer((batch,), "int64")  # the step of X each batch element is at, -1 past its length
        for t in T.serial(steps):
            for b in T.serial(batch):
                if has_lens:
                    length = T.Cast("int64", lens[b])
                else:
                    length = steps
                if reverse:
                    step_at[b] = T.if_then_else(t < length, length - 1 - t, T.int64(-1))
                else:
                    step_at[b] = T.if_then_else(t < length, t, T.int64(-1))
            for part in step_loop(parts):
                lo = part * units
                hi = T.min(lo + units, hidden)
                # NOTE: one sequence is its own case: with the batch loop gone, LLVM keeps a panel's accumulators in
                # registers and pairs its loads (over a batch loop of one, it moved the first row's loads out to the
                # stack and loaded one vector per FMA: a Pi 4's 256-unit LSTM 1.18x the instructions)
                if batch == 1:
                    times_rt(gates, state_h, rt, 0, 1, hidden, 4, lo, hi)
                else:
                    times_rt(gates, state_h, rt, 0, batch, hidden, 4, lo, hi)
                for b in T.serial(batch):
                    if step_at[b] >= 0:
                        for q in T.serial(4):
                            for g in T.serial(lo, hi):
                                gates[b, q * hidden + g] = gates[b, q * hidden + g] + projected[step_at[b], b, q * hidden + g]
                        for j in T.serial(lo, hi):
                            # gate rows: i = [0, H), o = [H, 2H), f = [2H, 3H), c = [3H, 4H)
                            input_gate = gate_act(clip((gates[b, j] + peephole[j] * state_c[b, j]) + bias[j]))
                            if input_forget:
                                forget_gate = T.float32(1) - input_gate
                            else:
                                forget_gate = gate_act(clip((gates[b, 2 * hidden + j]
                                                             + peephole[2 * hidden + j] * state_c[b, j])
                                                            + bias[2 * hidden + j]))
                            cell = state_c[b, j] * forget_gate + input_gate * cell_act(
                                clip(gates[b, 3 * hidden + j] + bias[3 * hidden + j]))
                            output_gate = gate_act(clip((gates[b, hidden + j] + peephole[hidden + j] * cell)
                                                        + bias[hidden + j]))
                            state_c[b, j] = cell
                            next_h[b, j] = hidden_act(cell) * output_gate
            for b in T.serial(batch):
                if step_at[b] >= 0:
                    for j in T.serial(hidden):
                        state_h[b, j] = next_h[b, j]
                        y[step_at[b], b, j] = next_h[b, j]
                else:
                    for j in T.serial(hidden):
                        y[t, b, j] = T.float32(0)

    return lstm


def _gru_kernel(spec: _Spec, activations, reverse: bool, has_lens: bool):
    """PrimFunc(X·Wᵀ[T,B,3H], Rᵀ[H,3H], bias[3H], Rbh[H], h0[B,H], lens) -> (Y[T,B,H], Y_h[B,H]).

    `bias` is Wb + Rb for z and r, and for h Wbh + Rbh (linear_before_reset=0) or Wbh alone
    (linear_before_reset=1, Rbh then goes inside r⊙(...)).
    """
    hidden, gate_width = spec.hidden, 3 * spec.hidden
    gate_act, candidate_act = (_ACTIVATIONS[name] for name in activations)
    clip = _clipper(spec.clip)
    linear_before_reset = spec.linear_before_reset
    parts, units, step_loop = _step_split(spec)
    rt_shape, times_rt = _rt_layout(spec, gate_width)

    @T.prim_func(private=True, s_tir=True)
    def gru(projected_handle: T.handle, rt_handle: T.handle, bias_handle: T.handle, rbh_handle: T.handle,
            h0_handle: T.handle, lens_handle: T.handle, y_handle: T.handle, yh_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        steps = T.int64()
        batch = T.int64()
        num_lens = T.int64()
        projected = T.match_buffer(projected_handle, (steps, batch, gate_width), "float32")
        rt = T.match_buffer(rt_handle, rt_shape, "float32")
        bias = T.match_buffer(bias_handle, (gate_width,), "float32")
        rbh = T.match_buffer(rbh_handle, (hidden,), "float32")
        h0 = T.match_buffer(h0_handle, (batch, hidden), "float32")
        lens = T.match_buffer(lens_handle, (num_lens,), "int32")
        y = T.match_buffer(y_handle, (steps, batch, hidden), "float32")
        state_h = T.match_buffer(yh_handle, (batch, hidden), "float32")
        gates = T.alloc_buffer((batch, gate_width), "float32")
        next_h = T.alloc_buffer((hidden,), "float32")
        reset = T.alloc_buffer((hidden,), "float32")
        reset_h = T.alloc_buffer((hidden,), "float32")
        for b in T.serial(batch):
            if has_lens:
                length = T.Cast("int64", lens[b])
            else:
                length = steps
            for j in T.serial(hidden):  # a batch element of length 0 ends in a zero state, as in ORT
                state_h[b, j] = T.if_then_else(length > 0, h0[b, j], T.float32(0))
            for t in T.serial(steps):
                if t < length:
                    if reverse:
                        step = length - 1 - t
                    else:
                        step = t
                    # gate rows: z = [0, H), r = [H, 2H), h = [2H, 3H)
                    if linear_before_reset:
                        for part in step_loop(parts):
                            lo = part * units
                            hi = T.min(lo + units, hidden)
                            times_rt(gates, state_h, rt, b, b + 1, hidden, 3, lo, hi)
                            for j in T.serial(lo, hi):
                                reset_gate = gate_act(clip((gates[b, hidden + j] + projected[step, b, hidden + j]) + bias[hidden + j]))
                                update = gate_act(clip((gates[b, j] + projected[step, b, j]) + bias[j]))
                                candidate = candidate_act(clip((projected[step, b, 2 * hidden + j] + bias[2 * hidden + j])
                                                               + reset_gate * (gates[b, 2 * hidden + j] + rbh[j])))
                                next_h[j] = (T.float32(1) - update) * candidate + update * state_h[b, j]
                        for j in T.serial(hidden):
                            state_h[b, j] = next_h[j]
                            y[step, b, j] = next_h[j]
                    else:
                        _state_times_rt(gates, state_h, rt, b, b + 1, hidden, 2, 0, hidden)
                        for j in T.serial(hidden):
                            reset[j] = gate_act(clip((gates[b, hidden + j] + projected[step, b, hidden + j]) + bias[hidden + j]))
                        # h rows: (r⊙H_{t-1})·Rhᵀ
                        for k in T.serial(hidden):
                            reset_h[k] = reset[k] * state_h[b, k]
                        for j in T.serial(hidden):
                            gates[b, 2 * hidden + j] = reset_h[0] * rt[0, 2 * hidden + j]
                        for k in T.serial(1, hidden):
                            for j in T.serial(hidden):
                                gates[b, 2 * hidden + j] = _fma(reset_h[k], rt[k, 2 * hidden + j], gates[b, 2 * hidden + j])
                        for j in T.serial(hidden):
                            update = gate_act(clip((gates[b, j] + projected[step, b, j]) + bias[j]))
                            candidate = candidate_act(clip((gates[b, 2 * hidden + j] + projected[step, b, 2 * hidden + j])
                                                           + bias[2 * hidden + j]))
                            state_h[b, j] = (T.float32(1) - update) * candidate + update * state_h[b, j]
                            y[step, b, j] = state_h[b, j]
                else:
                    for j in T.serial(hidden):
                        y[t, b, j] = T.float32(0)

    return gru


def _rnn_kernel(spec: _Spec, activations, reverse: bool, has_lens: bool):
    """PrimFunc(X·Wᵀ[T,B,H], Rᵀ[H,H], Wb+Rb[H], h0[B,H], lens) -> (Y[T,B,H], Y_h[B,H])."""
    hidden = spec.hidden
    parts, units, step_loop = _step_split(spec)
    rt_shape, times_rt = _rt_layout(spec, hidden)
    (act,) = (_ACTIVATIONS[name] for name in activations)
    clip = _clipper(spec.clip)

    @T.prim_func(private=True, s_tir=True)
    def rnn(projected_handle: T.handle, rt_handle: T.handle, bias_handle: T.handle, h0_handle: T.handle,
            lens_handle: T.handle, y_handle: T.handle, yh_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        steps = T.int64()
        batch = T.int64()
        num_lens = T.int64()
        projected = T.match_buffer(projected_handle, (steps, batch, hidden), "float32")
        rt = T.match_buffer(rt_handle, rt_shape, "float32")
        bias = T.match_buffer(bias_handle, (hidden,), "float32")
        h0 = T.match_buffer(h0_handle, (batch, hidden), "float32")
        lens = T.match_buffer(lens_handle, (num_lens,), "int32")
        y = T.match_buffer(y_handle, (steps, batch, hidden), "float32")
        state_h = T.match_buffer(yh_handle, (batch, hidden), "float32")
        gates = T.alloc_buffer((batch, hidden), "float32")
        next_h = T.alloc_buffer((hidden,), "float32")
        for b in T.serial(batch):
            if has_lens:
                length = T.Cast("int64", lens[b])
            else:
                length = steps
            for j in T.serial(hidden):  # a batch element of length 0 ends in a zero state, as in ORT
                state_h[b, j] = T.if_then_else(length > 0, h0[b, j], T.float32(0))
            for t in T.serial(steps):
                if t < length:
                    if reverse:
                        step = length - 1 - t
                    else:
                        step = t
                    for part in step_loop(parts):
                        lo = part * units
                        hi = T.min(lo + units, hidden)
                        times_rt(gates, state_h, rt, b, b + 1, hidden, 1, lo, hi)
                        for j in T.serial(lo, hi):
                            next_h[j] = act(clip((gates[b, j] + projected[step, b, j]) + bias[j]))
                    for j in T.serial(hidden):
                        state_h[b, j] = next_h[j]
                        y[step, b, j] = next_h[j]
                else:
                    for j in T.serial(hidden):
                        y[t, b, j] = T.float32(0)

    return rnn


_KERNEL_BUILDERS = {"LSTM": _lstm_kernel, "GRU": _gru_kernel, "RNN": _rnn_kernel}
