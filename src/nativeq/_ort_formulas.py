"""Constants of ONNX Runtime's CPU float kernels (MLAS, onnxruntime 1.32 on x86), shared by both halves.

`compile/passes/legalize_like_ort.py` builds them into TIR; `qat/float_islands.py` evaluates
them in PyTorch. Pure Python: importable beside torch and beside tvm alike.
"""

from __future__ import annotations

LAYER_NORM_LANES = 8  # MLAS's AVX2 LayerNorm: 8 float32 lane accumulators
SOFTMAX_LANES = 16  # MLAS's AVX-512F softmax sum: 16 lane accumulators

# MLAS's logistic (onnxruntime/core/mlas/lib/logistic.cpp, the constants Eigen uses): clamp to
# [-18, 18]; p = x * poly(x^2, alpha), q = poly(x^2, beta), every step an FMA; clamp(p / q + 0.5, 0, 1).
LOGISTIC_CLAMP = 18.0
LOGISTIC_ALPHA = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                  2.48287947061529e-01)
LOGISTIC_BETA = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
                 1.16817656904453e-01, 9.93151921023180e-01)

# MLAS's tanh (onnxruntime/core/mlas/lib/tanh.cpp, Eigen's constants; what ORT's LSTM/GRU/RNN call
# through MlasComputeTanh): clamp to [-9, 9]; p = x * poly(x^2, alpha), q = poly(x^2, beta), every
# step an FMA in the FMA3 kernel; tanh = p / q.
TANH_CLAMP = 9.0
TANH_ALPHA = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
              1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_BETA = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)

# MLAS's erf (onnxruntime/core/mlas/lib/erf.cpp and its FMA3 kernel).
ERF_SPLIT = 0.921875
ERF_CLAMP = 3.925
ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
           1.28717512e-1)
ERF_EXP = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)

# MLAS's exp inside MlasComputeSumExpVector (softmax): round to a power of two by adding 1.5*2^23,
# Cody-Waite reduction by ln2 in two parts, degree-6 polynomial.
# NOTE: MLAS applies the last coefficient (1.0) twice: p*v + 1, then (p*v + 1)*v + 1.
EXP_LOWER = -88.3762626647949
EXP_LOG2E = 1.44269504088896341
EXP_ROUNDING_BIAS = 12582912.0  # 1.5 * 2^23
EXP_LN2_HIGH = -6.93145752e-1
EXP_LN2_LOW = -1.42860677e-6
EXP_POLY = tuple(float.fromhex(v) for v in ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5", "0x1.555450p-3",
                                            "0x1.fffff6p-2", "0x1.000000p+0", "0x1.000000p+0"))

# ORT's Sin/Cos (onnxruntime/core/providers/cpu/math/element_wise_ops.cc) are Eigen array ops:
# Eigen 3.4's psincos_float on packets of 4 (SSE, built without FMA: every multiply-add below is
# a multiply and an add, each rounded), and libm's sinf/cosf for the last n % 4 elements of the
# tensor. Octant: y = |x| * 2/pi rounded by adding and subtracting 1.5 * 2^23; x reduced by y
# times four pieces of pi/2; cos(x) and sin(x) polynomials in x^2, picked and signed by the
# octant's two low bits. |x| at or above the thresholds takes Eigen's huge-argument reduction
# (not reproduced: nativeq falls back to libm there).
SINCOS_TWO_OVER_PI = 0.636619746685028076171875
SINCOS_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2^23
SINCOS_REDUCTION = (-1.5703125, -0.000483989715576171875, 1.62865035235881805419921875e-07,
                    5.5644315544167710640977020375430583953857421875e-11)
SINCOS_HUGE = {"sin": 25966.0, "cos": 18838.0}
SINCOS_COS_POLY = (2.4372266125283204019069671630859375e-05, -0.00138865201734006404876708984375,
                   0.041666619479656219482421875, -0.5, 1.0)
SINCOS_SIN_POLY = (-0.0001959234114083702898469196984621021329076029360294342041015625,
                   0.0083326873655616851693794799871284340042620897293090820312500000,
                   -0.1666666203982298255503735617821803316473960876464843750000000000)
SINCOS_PACKET = 4
