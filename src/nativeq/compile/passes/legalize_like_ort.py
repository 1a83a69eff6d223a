"""Legalization rules for float islands (LayerNorm, Softmax, Sigmoid, Tanh, Erf, Sin, Cos) that reproduce ONNX Runtime's CPU kernels bit for bit.

Pipeline position: the `customize_legalize_map` of the pipeline's `LegalizeOps` (see
compile/pipeline.py), so it applies to every target and to `--no-int8` builds alike.

Why: in a QDQ model every float island ends in a QuantizeLinear. A float result one ulp
away from ORT's flips a rounding at a .5 boundary by one step, and the step propagates
through every later layer: a 4-block Conformer drifted 3-5 steps from ORT on real speech
from single flips after its LayerNorms (TOPI's layer_norm, or even a correctly rounded
one, differs from ORT in ~50% of elements by an ulp).

LayerNormalization, float32, one normalized row of n elements (onnxruntime 1.32 on x86:
MLAS's AVX2 kernel for n >= 8, the scalar Welford loop of layer_norm_impl.cc below that;
worked out against the installed onnxruntime and pinned by tests/test_legalize_like_ort.py):

    n >= 8:  mean = f32(sum(x) in float64 / n);  d = x - mean
             8 lane accumulators acc[l] = fma(d[8c+l], d[8c+l], acc[l]) over whole chunks c,
             s = ((acc0+acc4)+(acc2+acc6)) + ((acc1+acc5)+(acc3+acc7)), then
             s = s + d[i]*d[i] for the tail i >= 8*(n//8), in order
             inv = 1 / sqrt(s / n + eps);        y = fma(d * inv, scale, bias)
    n < 8:   Welford: delta = x[i] - mean; mean += delta / (i+1); m2 += delta * (x[i] - mean)
             std = sqrt(m2 / n + eps);           y = (x - mean) / std * scale + bias

`fma` is TIR's `tirx.fma` (one rounding; `llvm.fmuladd` fuses on every nativeq target).
Inside a fused kernel LLVM may contract a separate multiply and add into an FMA; where ORT
rounds twice, the product is fenced (`_rounded`, `llvm.arithmetic.fence`), and a product of
two computed tensors (ONNX Mul, e.g. rotary's `k * cos`) is legalized as `rounded_multiply`.

Sin, Cos, float32: Eigen's psincos_float without FMA on packets of 4 and libm on the n % 4
tail, as ORT's Eigen-based kernels (constants in nativeq/_ort_formulas.py); bit-identical
below |x| = 18838 (cos) / 25966 (sin), libm above (Eigen's huge-argument reduction is not
reproduced). A row whose length is not known at compile time gets a float64
two-pass LayerNorm rounded once (correctly rounded, within an ulp of ORT).
"""

from __future__ import annotations

from nativeq import _ort_formulas as ort
from nativeq.compile._tvm import te, tirx, topi

_LANES = ort.LAYER_NORM_LANES


def _fma(dtype, a, b, c):
    """a * b + c with one rounding."""
    return tirx.call_intrin(dtype, "tirx.fma", a, b, c)


def _horner(dtype, v, coefficients):
    """c0*v^n + ... + cn by Horner's rule, every step one FMA (as MLAS's FMA3 kernels evaluate it)."""
    acc = tirx.const(coefficients[0], dtype)
    for coefficient in coefficients[1:]:
        acc = _fma(dtype, acc, v, tirx.const(coefficient, dtype))
    return acc


def _rounded(dtype, value):
    """`value` rounded on its own: LLVM may not fuse it into a neighbouring add (an FMA)."""
    return tirx.call_llvm_pure_intrin(dtype, "llvm.arithmetic.fence", value)


LAYER_NORM_SUM_LANES_BLOCK = "ln_sum_lanes"  # the row's float64 sum in lanes (the schedule vectorizes them)
LAYER_NORM_LANES_BLOCK = "ln_lanes"  # MLAS's 8 lane accumulators of the squared deviations
LAYER_NORM_BLOCK = "layer_norm"


def _lane_tree(a):
    """MLAS's fixed pairwise sum of 8 lanes."""
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


def _ort_layer_norm(x, gamma, beta, axes, epsilon):
    ndim = len(x.shape)
    axes = sorted(int(a) % ndim for a in axes)
    outer_dims = [d for d in range(ndim) if d not in axes]
    outer_shape = [x.shape[d] for d in outer_dims]
    row_dims = [x.shape[a] for a in axes]
    static = all(isinstance(n, (int, tirx.IntImm)) for n in row_dims)
    n = 1
    for extent in row_dims:
        n = n * (int(extent) if static else extent)
    f32 = x.dtype

    def element(outer, k):
        """x at outer index `outer` and flat (row-major) position `k` within the row."""
        inner = []
        for extent in reversed(row_dims):
            inner.insert(0, k % extent)
            k = k // extent
        index, outer, inner = [], list(outer), list(inner)
        for d in range(ndim):
            index.append(inner.pop(0) if d in axes else outer.pop(0))
        return x(*index)

    def param(p, index):
        # scale/bias cover the trailing normalized dims (size-1 dims broadcast)
        inner = [index[d] for d in axes][len(axes) - len(p.shape):]
        return p(*[0 if int(size) == 1 else i for size, i in zip(p.shape, inner)])

    def split(index):
        outer = [index[d] for d in outer_dims]
        flat = 0
        for d, extent in zip(axes, row_dims):
            flat = flat * extent + index[d]
        return outer, flat

    def f(value):
        return tirx.const(value, f32)

    if not static:
        return _layer_norm_float64(x, gamma, beta, axes, epsilon, outer_shape, n, element, param, split)
    if n < _LANES:
        return _layer_norm_welford(x, gamma, beta, epsilon, outer_shape, n, element, param, split, f)

    # NOTE: a sum of n float32 values in float64 is exact, so the same in any order, unless the row's magnitudes span
    # more than 29 - log2(n) binades: summed in lanes, which the schedule (`schedules/layer_norm.py`) vectorizes.
    def lane_sum(*index):
        outer, lane = index[:-1], index[-1]
        chunk = te.reduce_axis((0, n // _LANES), name="chunk")
        return te.sum(element(outer, chunk * _LANES + lane).astype("float64"), axis=chunk)

    sum_lanes = te.compute([*outer_shape, _LANES], lane_sum, name=LAYER_NORM_SUM_LANES_BLOCK)

    def row_sum(*outer):
        s = _lane_tree([sum_lanes(*outer, lane) for lane in range(_LANES)])
        for i in range(n // _LANES * _LANES, n):
            s = s + element(outer, i).astype("float64")
        return s

    total = te.compute(outer_shape, row_sum, name="ln_sum")
    mean = te.compute(outer_shape, lambda *o: (total(*o) / tirx.const(n, "float64")).astype(f32), name="ln_mean")

    def lane_sum_of_squares(*index):
        outer, lane = index[:-1], index[-1]
        acc = f(0.0)
        for chunk in range(n // _LANES):
            d = element(outer, chunk * _LANES + lane) - mean(*outer)
            acc = _fma(f32, d, d, acc)
        return acc

    lanes = te.compute([*outer_shape, _LANES], lane_sum_of_squares, name=LAYER_NORM_LANES_BLOCK)

    def inv_std(*outer):
        s = _lane_tree([lanes(*outer, lane) for lane in range(_LANES)])
        for i in range(n // _LANES * _LANES, n):
            d = element(outer, i) - mean(*outer)
            s = s + _rounded(f32, d * d)
        return f(1.0) / te.sqrt(s / f(float(n)) + f(float(epsilon)))

    inv = te.compute(outer_shape, inv_std, name="ln_inv_std")

    def normalize(*index):
        outer, _ = split(index)
        d = x(*index) - mean(*outer)
        return _fma(f32, d * inv(*outer), param(gamma, index), param(beta, index))

    return te.compute(x.shape, normalize, name=LAYER_NORM_BLOCK)


def _layer_norm_welford(x, gamma, beta, epsilon, outer_shape, n, element, param, split, f):
    def stats(*outer):
        mean, m2 = f(0.0), f(0.0)
        for i in range(n):
            value = element(outer, i)
            delta = value - mean
            mean = mean + delta / f(float(i + 1))
            m2 = m2 + _rounded(x.dtype, delta * (value - mean))
        return mean, te.sqrt(m2 / f(float(n)) + f(float(epsilon)))

    mean = te.compute(outer_shape, lambda *o: stats(*o)[0], name="ln_mean")
    std = te.compute(outer_shape, lambda *o: stats(*o)[1], name="ln_std")

    def normalize(*index):
        outer, _ = split(index)
        scaled = _rounded(x.dtype, (x(*index) - mean(*outer)) / std(*outer) * param(gamma, index))
        return scaled + param(beta, index)

    return te.compute(x.shape, normalize, name="layer_norm")


def _layer_norm_float64(x, gamma, beta, axes, epsilon, outer_shape, n, element, param, split):
    def wide(value):
        return value.astype("float64")

    count = tirx.Cast("float64", n)

    def row_sum(*outer):
        k = te.reduce_axis((0, n), name="k")
        return te.sum(wide(element(outer, k)), axis=k)

    total = te.compute(outer_shape, row_sum, name="ln_sum")
    mean = te.compute(outer_shape, lambda *o: total(*o) / count, name="ln_mean")

    def row_sum_of_squares(*outer):
        k = te.reduce_axis((0, n), name="k")
        centered = wide(element(outer, k)) - mean(*outer)
        return te.sum(centered * centered, axis=k)

    total_sq = te.compute(outer_shape, row_sum_of_squares, name="ln_sum_sq")
    eps = tirx.const(float(epsilon), "float64")
    inv = te.compute(outer_shape, lambda *o: 1.0 / te.sqrt(total_sq(*o) / count + eps), name="ln_inv_std")

    def normalize(*index):
        outer, _ = split(index)
        y = (wide(x(*index)) - mean(*outer)) * inv(*outer) * wide(param(gamma, index))
        return (y + wide(param(beta, index))).astype(x.dtype)

    return te.compute(x.shape, normalize, name="layer_norm")


def _legalize_layer_norm(bb, call):
    x, gamma, beta = call.args
    if x.ty.dtype != "float32":  # TVM's own rule
        return bb.call_te(topi.nn.layer_norm, x, gamma, beta, axis=call.attrs.axes, epsilon=call.attrs.epsilon)
    return bb.call_te(_ort_layer_norm, x, gamma, beta, list(call.attrs.axes), float(call.attrs.epsilon),
                      primfunc_name_hint="layer_norm")


def rounded_multiply(lhs, rhs):
    """lhs * rhs with numpy broadcasting, every product rounded on its own.

    ORT runs each ONNX op as its own kernel, so `a * b + c` rounds the product before the add.
    In a fused TVM kernel LLVM may contract the two into one FMA (one rounding) and land an ulp
    away: in a rotary Conformer, `k * cos + rotate(k) * sin` then flipped a QuantizeLinear by a
    step that grew to 3 steps at the logits. Used by scalars_as_tensors' multiply rule.
    """
    ndim = max(len(lhs.shape), len(rhs.shape))

    def is_one(extent):
        return isinstance(extent, tirx.IntImm) and int(extent) == 1

    def dims(t):
        return [None] * (ndim - len(t.shape)) + list(t.shape)

    shape = [b if a is None or (is_one(a) and b is not None) else a for a, b in zip(dims(lhs), dims(rhs))]

    def read(t, index):
        offset = ndim - len(t.shape)
        return t(*[0 if is_one(extent) else index[offset + k]
                   for k, extent in enumerate(t.shape)])

    def product(*index):
        # NOTE: fma(a, b, +0) rounds the exact product once, as the product alone does; LLVM cannot contract it
        # into an add after it, nor fold it back into a product (that needs no-signed-zeros), and unlike a fence
        # it keeps a loop over a run-time length vectorized (a fenced GroupNorm affine over C x T ran scalar:
        # 16 instructions per element on the Pi). Only a product of -0 comes out +0, which no quantize tells apart.
        zero = tirx.const(0.0, lhs.dtype)
        return _fma(lhs.dtype, read(lhs, index), read(rhs, index), zero)

    return te.compute(shape, product, name="multiply")


# MLAS's logistic, evaluated as its FMA3 kernel does (constants and rule in nativeq/_ort_formulas.py).


def mlas_logistic_value(value):
    """MLAS's logistic of one float TIR expression (also used by compile/recurrent.py's gates)."""
    dtype = str(value.ty)

    def c(constant):
        return tirx.const(constant, dtype)

    v = tirx.min(c(ort.LOGISTIC_CLAMP), tirx.max(c(-ort.LOGISTIC_CLAMP), value))
    v2 = v * v
    p = _horner(dtype, v2, ort.LOGISTIC_ALPHA) * v
    q = _horner(dtype, v2, ort.LOGISTIC_BETA)
    return tirx.min(c(1.0), tirx.max(c(0.0), p / q + c(0.5)))


def mlas_tanh_value(value):
    """MLAS's tanh of one float TIR expression (onnxruntime/core/mlas/lib/tanh.cpp, FMA3 kernel):
    no libm call, so a loop of it vectorizes. Used by compile/recurrent.py's gates."""
    dtype = str(value.ty)
    v = tirx.min(tirx.const(ort.TANH_CLAMP, dtype), tirx.max(tirx.const(-ort.TANH_CLAMP, dtype), value))
    v2 = v * v
    return (_horner(dtype, v2, ort.TANH_ALPHA) * v) / _horner(dtype, v2, ort.TANH_BETA)


def _mlas_logistic(x):
    return te.compute(x.shape, lambda *index: mlas_logistic_value(x(*index)), name="sigmoid")


def _mlas_tanh(x):
    return te.compute(x.shape, lambda *index: mlas_tanh_value(x(*index)), name="tanh")



# ORT's Sin/Cos: Eigen's psincos_float without FMA on packets of 4, libm for the n % 4 tail
# (constants and rule in nativeq/_ort_formulas.py).


def _eigen_sincos(x, sine: bool):
    dtype = x.dtype
    name = "sin" if sine else "cos"
    libm = tirx.sin if sine else tirx.cos

    def c(value):
        return tirx.const(value, dtype)

    def multiply_add(a, b, addend):  # Eigen's pmadd without FMA: two roundings
        return _rounded(dtype, _rounded(dtype, a * b) + addend)

    def eigen(value):
        magnitude = tirx.abs(value)
        y_round = _rounded(dtype, magnitude * c(ort.SINCOS_TWO_OVER_PI) + c(ort.SINCOS_ROUNDING_MAGIC))
        octant = tirx.reinterpret("int32", y_round)
        y = _rounded(dtype, y_round - c(ort.SINCOS_ROUNDING_MAGIC))
        reduced = magnitude
        for piece in ort.SINCOS_REDUCTION:
            reduced = multiply_add(y, c(piece), reduced)
        x2 = _rounded(dtype, reduced * reduced)

        def horner(coefficients):
            acc = c(coefficients[0])
            for coefficient in coefficients[1:]:
                acc = multiply_add(acc, x2, c(coefficient))
            return acc

        cos_poly = horner(ort.SINCOS_COS_POLY)
        sin_poly = multiply_add(_rounded(dtype, horner(ort.SINCOS_SIN_POLY) * x2), reduced, reduced)
        even = (octant & 1) == 0
        if sine:
            result = tirx.if_then_else(even, sin_poly, cos_poly)
            sign = tirx.reinterpret("int32", value) ^ (octant << 30)
        else:
            result = tirx.if_then_else(even, cos_poly, sin_poly)
            sign = (octant + 1) << 30
        return tirx.reinterpret(dtype, tirx.reinterpret("int32", result) ^ (sign & tirx.const(-(2**31), "int32")))

    total = 1
    for extent in x.shape:
        total = total * extent
    packed = total // ort.SINCOS_PACKET * ort.SINCOS_PACKET

    def element(*index):
        flat = tirx.const(0, "int64")
        for i, extent in zip(index, x.shape):
            flat = flat * extent + i
        value = x(*index)
        in_packet = tirx.all(flat < packed, tirx.abs(value) < c(ort.SINCOS_HUGE[name]))
        return tirx.if_then_else(in_packet, eigen(value), libm(value))

    return te.compute(x.shape, element, name=name)


def _eigen_sin(x):
    return _eigen_sincos(x, sine=True)


def _eigen_cos(x):
    return _eigen_sincos(x, sine=False)


# MLAS's erf (onnxruntime/core/mlas/lib/erf.cpp and its FMA3 kernel), every multiply-add an FMA:
# |x| <= 0.921875: x * (1 + x^2 * poly(x^2)); above: 1 - exp(-|x| * (1 + poly(|x|))) with MLAS's own
# exp (round to a power of two by adding 1.5*2^23, Cody-Waite reduction, degree-6 polynomial).
# NOTE: both branches are computed and selected (`Select`, as the SIMD kernel does): TVM scalarizes a
# vector loop holding an if_then_else, e.g. a GELU's erf once inlined into its consumers.


def _mlas_erf(x):
    dtype = x.dtype

    def c(value):
        return tirx.const(value, dtype)

    def erf(*index):
        value = x(*index)
        magnitude = tirx.min(c(ort.ERF_CLAMP), tirx.abs(value))
        small = _fma(dtype, _horner(dtype, magnitude * magnitude, ort.ERF_SMALL), magnitude, magnitude)
        is_big = magnitude > c(ort.ERF_SPLIT)
        big_input = tirx.Select(is_big, magnitude, c(0.0))
        big_poly = _fma(dtype, _horner(dtype, big_input, ort.ERF_BIG), big_input, big_input)
        exponent_arg = tirx.max(c(ort.EXP_LOWER), -big_poly)
        rounded = _fma(dtype, c(ort.EXP_LOG2E), exponent_arg, c(ort.EXP_ROUNDING_BIAS)) - c(ort.EXP_ROUNDING_BIAS)
        reduced = _fma(dtype, rounded, c(ort.EXP_LN2_LOW), _fma(dtype, rounded, c(ort.EXP_LN2_HIGH), exponent_arg))
        power = tirx.reinterpret(dtype, (rounded.astype("int32") + 127) * (1 << 23))
        big = c(1.0) - _horner(dtype, reduced, ort.ERF_EXP) * power
        result = tirx.Select(is_big, big, small)
        return tirx.Select(value < c(0.0), -result, result)

    return te.compute(x.shape, erf, name="erf")



# MLAS's softmax over one row of n (onnxruntime/core/mlas/lib/compute.cpp and its AVX-512F
# kernel): e = exp(x - max) with MLAS's exp (every multiply-add an FMA); the e's summed in 16
# lane accumulators, chunk after chunk (a partial last chunk adds zeros), the lanes reduced as
# halves 16 -> 8 then adjacent pairs 8 -> 4 -> 2 -> 1; softmax = e * (1 / sum).
_SOFTMAX_LANES = ort.SOFTMAX_LANES
_OUT_EWISE_FUSABLE = 4  # TVM OpPatternKind.kOutEWiseFusable
SOFTMAX_LANES_BLOCK = "mlas_softmax_lanes"  # its reduction must stay serial per lane (see default_schedule)
SOFTMAX_MAX_LANES_BLOCK = "mlas_softmax_max_lanes"
SOFTMAX_MAX_TAIL_BLOCK = "mlas_softmax_max_tail"
SOFTMAX_SUM_TAIL_BLOCK = "mlas_softmax_sum_tail"
SOFTMAX_INVERSE_BLOCK = "softmax_inverse_sum"
SOFTMAX_EXP_BLOCK = "mlas_softmax_exp"


def _mlas_sum_exp_element(value, dtype):
    """exp(value) for value <= 0, as MLAS's MlasComputeSumExpVector computes it."""

    def c(v):
        return tirx.const(v, dtype)

    value = tirx.max(c(ort.EXP_LOWER), value)
    biased = _fma(dtype, value, c(ort.EXP_LOG2E), c(ort.EXP_ROUNDING_BIAS))
    m = biased - c(ort.EXP_ROUNDING_BIAS)
    value = _fma(dtype, m, c(ort.EXP_LN2_LOW), _fma(dtype, m, c(ort.EXP_LN2_HIGH), value))
    scale = tirx.reinterpret(dtype, tirx.reinterpret("int32", biased) * (1 << 23) + 0x3F800000)
    return _horner(dtype, value, ort.EXP_POLY) * scale


def mlas_lane_sum(lanes):
    """MLAS's reduction of its 16 softmax lane sums (expressions): halves 16 -> 8, then adjacent pairs 8 -> 4 -> 2 -> 1."""
    a = [lanes[i] + lanes[i + 8] for i in range(8)]
    while len(a) > 1:
        a = [a[2 * i] + a[2 * i + 1] for i in range(len(a) // 2)]
    return a[0]


def _mlas_softmax(x, axis, log: bool = False, dequantize: tuple | None = None):
    """Softmax along `axis` as MLAS computes it; with `log`, log-softmax: (x - max) - log(sum), MLAS's
    `Input + NegativeMaximum - Logarithm` with the same maximum and sum of exps.

    dequantize: (scale, zero point) when `x` holds integers: the softmax of dequantize(x), each element
    read as relax.dequantize computes it, float(x - z) * s. The row's maximum is taken over the integers
    and then dequantized: for s > 0 the dequantized value is monotone in x, so it is the same maximum.
    """
    ndim = len(x.shape)
    axis = axis % ndim
    n = x.shape[axis]
    outer_shape = [d for i, d in enumerate(x.shape) if i != axis]
    dtype = "float32" if dequantize is not None else x.dtype

    def stored_at(outer, k):
        outer = list(outer)
        return x(*outer[:axis], k, *outer[axis:])

    if dequantize is None:
        def value_of(stored):
            return stored
    else:
        scale, zero_point = dequantize
        if not scale > 0:
            raise ValueError(f"softmax of a dequantized tensor needs a positive scale, got {scale}")

        def value_of(stored):
            # NOTE: float(q - z) * s as one FMA with +0: the same rounding as the product (the exact product
            # plus +0 rounds once, and q - z = 0 gives +0 either way) that LLVM can neither contract with
            # the `- max` after it (a fence would, but keeps the loop scalar) nor fold back into a product
            # (fma(x, y, +0) -> x * y needs no-signed-zeros)
            return _fma(dtype, (stored.astype("int32") - zero_point).astype(dtype), tirx.const(scale, dtype),
                        tirx.const(0.0, dtype))

    def read(*index):
        return value_of(x(*index))

    # Whole chunks of 16 are read as vectors; the partial last chunk (n % 16 elements) is added per lane
    # after them, as MLAS's masked last iteration does (its missing lanes add 0 / take no maximum). A
    # clamped read in the vector loop itself would make every vector a gather.
    chunks = n // _SOFTMAX_LANES
    tail = n - chunks * _SOFTMAX_LANES

    def tail_lanes(value, combine, name):
        """The partial last chunk as 16 lanes (clamped reads, a gather once per row), `combine(value, inside)` giving
        the value a lane contributes. NOTE: no Select around the read: TVM simplifies a Select's value under its
        condition, which drops the clamp (a read past the row, past the buffer on the last one)."""
        def element(*index):
            outer, lane = index[:-1], index[-1]
            k = chunks * _SOFTMAX_LANES + lane
            return combine(value(outer, tirx.min(k, n - 1)), lane < tail)

        return te.compute([*outer_shape, _SOFTMAX_LANES], element, name=name)

    def lane_max(*index):
        outer, lane = index[:-1], index[-1]
        c = te.reduce_axis((0, chunks), name="chunk")
        return te.max(stored_at(outer, c * _SOFTMAX_LANES + lane), axis=c)

    # NOTE: max is exact in any order, so it runs in 16 lanes like the sum (a serial max over the row
    # was a quarter of the softmax time); the lanes block's schedule (softmax.py) vectorizes both.
    lane_maxima = te.compute([*outer_shape, _SOFTMAX_LANES], lane_max, name=SOFTMAX_MAX_LANES_BLOCK)
    # a lane past the row's end reads its last element again, which leaves the maximum as it is
    tail_maxima = tail_lanes(stored_at, lambda value, inside: value, SOFTMAX_MAX_TAIL_BLOCK)

    def row_max(*outer):
        a = [tirx.max(lane_maxima(*outer, lane), tail_maxima(*outer, lane)) for lane in range(_SOFTMAX_LANES)]
        while len(a) > 1:
            a = [tirx.max(a[2 * i], a[2 * i + 1]) for i in range(len(a) // 2)]
        return value_of(a[0])

    maximum = te.compute(outer_shape, row_max, name="softmax_max")

    def exp_element(*index):
        outer = [i for d, i in enumerate(index) if d != axis]
        return _mlas_sum_exp_element(read(*index) - maximum(*outer), dtype)

    # NOTE: each exp computed once, kept for the row (MLAS stores them in the output and scales it in place):
    # the lane sums and the normalization read them.
    exps = te.compute(x.shape, exp_element, name=SOFTMAX_EXP_BLOCK)

    def exp_at(outer, k):
        outer = list(outer)
        return exps(*outer[:axis], k, *outer[axis:])

    def lane_sum(*index):
        outer, lane = index[:-1], index[-1]
        c = te.reduce_axis((0, chunks), name="chunk")
        return te.sum(exp_at(outer, c * _SOFTMAX_LANES + lane), axis=c)

    lanes = te.compute([*outer_shape, _SOFTMAX_LANES], lane_sum, name=SOFTMAX_LANES_BLOCK)
    # a lane past the row's end adds +0 (its exp, finite and >= 0, times 0), as MLAS's masked lanes do
    tail_sums = tail_lanes(exp_at, lambda value, inside: value * inside.astype(dtype), SOFTMAX_SUM_TAIL_BLOCK)

    def inverse_sum(*outer):
        total = mlas_lane_sum([lanes(*outer, lane) + tail_sums(*outer, lane) for lane in range(_SOFTMAX_LANES)])
        return tirx.log(total) if log else tirx.const(1.0, dtype) / total

    # NOTE: log-softmax keeps the block's name: the softmax schedule computes the row's blocks up to it per row
    inverse = te.compute(outer_shape, inverse_sum, name=SOFTMAX_INVERSE_BLOCK)

    def normalize(*index):
        outer = [i for d, i in enumerate(index) if d != axis]
        if log:
            return (read(*index) - maximum(*outer)) - inverse(*outer)
        return exp_at(outer, index[axis]) * inverse(*outer)

    return te.compute(x.shape, normalize, name="log_softmax" if log else "softmax")


def _softmax_rule(log: bool):
    """Legalization of float32 softmax (log-softmax) by `_mlas_softmax`; other dtypes keep TVM's own rule."""
    tvm_compute = topi.nn.log_softmax if log else topi.nn.softmax

    def legalize(bb, call):
        x = call.args[0]
        if x.ty.dtype != "float32":
            return bb.call_te(tvm_compute, x, call.attrs.axis)
        return call_mlas_softmax(bb, x, int(call.attrs.axis), log)

    return legalize


def call_mlas_softmax(bb, x, axis: int, log: bool, dequantize: tuple | None = None):
    """`bb.call_te` of `_mlas_softmax` (with `dequantize`: of the integers `x`, passes/softmax_reads_integers.py).

    A softmax along another axis than the last (an attentive pooling's weights over time, [N, T, C] along T) runs
    between two transposes, as ONNX Runtime runs it: its rows are then contiguous, and the schedule
    (schedules/softmax.py), which takes the last loop for the row, computes each row's maximum and sum once (along
    T in place, it recomputed them for every element: 176 ms of a 2 s speech-quality estimator, quadratic in T)."""
    ndim = len(x.ty.shape.values)
    axis = axis % ndim
    if axis != ndim - 1:
        to_last = [d for d in range(ndim) if d != axis] + [axis]
        rows = bb.emit(bb.call_te(topi.transpose, x, to_last, primfunc_name_hint="transpose"))
        out = bb.emit(call_mlas_softmax(bb, rows, ndim - 1, log, dequantize))
        return bb.call_te(topi.transpose, out, [to_last.index(d) for d in range(ndim)], primfunc_name_hint="transpose")
    # NOTE: marked out-elementwise-fusable (TVM's pattern analysis calls the per-lane tail reads opaque):
    # the requantize after a softmax fuses into its last loop.
    return bb.call_te(_mlas_softmax, x, axis, log, dequantize, primfunc_name_hint="log_softmax" if log else "softmax",
                      primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE})


def _unary_rule(mlas_compute, tvm_compute, name: str):
    """Legalization of a float32 elementwise op by `mlas_compute`; other dtypes keep TVM's own rule."""

    def legalize(bb, call):
        x = call.args[0]
        if x.ty.dtype != "float32":
            return bb.call_te(tvm_compute, x)
        return bb.call_te(mlas_compute, x, primfunc_name_hint=name)

    return legalize


def legalize_like_ort() -> dict:
    """`LegalizeOps(customize_legalize_map=...)` entries: op name -> legalization function."""
    return {
        "relax.nn.layer_norm": _legalize_layer_norm,
        "relax.nn.softmax": _softmax_rule(log=False),
        "relax.nn.log_softmax": _softmax_rule(log=True),
        "relax.sigmoid": _unary_rule(_mlas_logistic, topi.sigmoid, "sigmoid"),
        "relax.erf": _unary_rule(_mlas_erf, topi.erf, "erf"),
        "relax.tanh": _unary_rule(_mlas_tanh, topi.tanh, "tanh"),
        "relax.sin": _unary_rule(_eigen_sin, topi.sin, "sin"),
        "relax.cos": _unary_rule(_eigen_cos, topi.cos, "cos"),
        "relax.round": _unary_rule(_round_half_to_even, topi.round, "round"),
    }


def _round_half_to_even(x):
    """ONNX Round (ties to even) as `tirx.round`, which LLVM targets lower to `llvm.nearbyint` like TOPI's
    `nearbyint`: the same value, but TVM's vectorizer keeps `round` a vector where it scalarizes `nearbyint`
    (16 x vroundss per vector in a requantize epilogue)."""
    return te.compute(x.shape, lambda *index: te.round(x(*index)), name="round")
