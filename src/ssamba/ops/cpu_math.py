"""Scalar float math for the numba CPU kernels (``scan_cpu``, ``conv_cpu``) and their compiler settings, in one
place so that every kernel compiles alike and shares the vectorisable float32 exp, softplus and sigmoid.

``exp``, ``softplus`` and ``sigmoid`` are pure-Python stubs with numba overloads chosen by argument type: the
float32 versions are branch-free polynomials that vectorise (a loop that calls libm never does); float64 keeps
libm's accuracy. Call them from ``numba.njit`` code only.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["PARALLEL", "SERIAL", "SOFTPLUS_THRESHOLD", "exp", "sigmoid", "softplus"]

# torch.nn.functional.softplus's default threshold (and mamba_ssm's kernels'): above it softplus(x) = x.
SOFTPLUS_THRESHOLD = 20.0
# Not 'ninf'/'nnan' (exp may saturate to inf-like values in sigmoid) nor 'afn' (libm exp must stay exact for
# float64); 'reassoc' lets the per-step dot products over the state vectorise.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
# error_model="numpy": a float division by zero gives inf instead of raising, so loops have no exception exit
# (a loop with one never vectorises).
# cache=True: numba revalidates a cached kernel against its own source file only, not against the inlined helpers it
# took from other files (mamba_infer_cpu.discretise inside mamba_inner_cpu's backward, this file's exp): after editing a
# helper, delete the caches (`find src -name '*.nbi' -delete`, and .cache/numba-* of scripts/numerics.sh), or a
# stale kernel keeps running here while a fresh clone compiles the new code.
SERIAL = dict(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
PARALLEL = dict(SERIAL, parallel=True)

# ----------------------------------------------------------------------------------------- scalar math
# Each function is a pure-Python stub with a numba overload chosen by argument type: the float32 versions
# are branch-free polynomials that vectorise; float64 keeps libm's accuracy.

_F = np.float32
_EXP_HI = _F(88.0)  # exp(88) < float32 max, and the exponent n stays <= 127
# Clamped below at -88: there n = floor(-88 log2(e) + 1/2) = -127, whose biased exponent is 0, so 2**n has the bit
# pattern of +0.0 and exp(x) is exactly 0 for x <= -87.68 (where the true value is a subnormal below 8.3e-39); above
# that n >= -126 and the result is the usual one, subnormal down to -87.68. No mask is needed for the low end: the
# earlier `e * (x >= lo)` compiled to four extra vector instructions and a multiply, of about thirty in a scan step;
# without it the scan's row step ran 1.7-1.9x as fast (one core of the 2-core AMD EPYC, L = 49 and 513).
_EXP_LO = _F(-88.0)
_LOG2E = _F(1.4426950408889634)
_LN2 = _F(0.6931471805599453)  # one-constant reduction: error <= |n| * 1.9e-9, below 3e-7 relative for |n| <= 126
# Cephes expf minimax coefficients for exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2 / 2.
_EXP_P = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
          _F(1.6666665459e-1), _F(5.0000001201e-1))  # fmt: skip
# log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3] for e in [0, 1]: odd series 2 s (1 + s^2/3 + s^4/5 + ...),
# truncation error (1/9)^8 / 17 < 1e-9 relative after the s^14 term.
_LOG1P_Q = tuple(_F(1.0 / k) for k in (15, 13, 11, 9, 7, 5, 3))
_ZERO, _HALF, _ONE, _TWO = _F(0.0), _F(0.5), _F(1.0), _F(2.0)
_THRESH32 = _F(SOFTPLUS_THRESHOLD)


@intrinsic
def _pow2_f32(typingctx, n):
    """2**n as float32 for an integral float32 n in [-127, 127], by writing the exponent bits (0.0 for -127)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


def exp(x):
    raise NotImplementedError("numba-only helper")


def softplus(x):
    raise NotImplementedError("numba-only helper")


def sigmoid(x):
    raise NotImplementedError("numba-only helper")


# The overloads are inlined into the numba IR of their callers ("always"): left as calls, LLVM sometimes kept
# them out of line, and a loop containing a numba call (which may report an exception) never vectorises.
# They use no conditional expressions, which numba's inliner mishandles; selects are written as 0/1 masks.


@overload(exp, inline="always")
def _exp_impl(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_f32(x):
        xc = min(max(x, _EXP_LO), _EXP_HI)
        n = np.floor(xc * _LOG2E + _HALF)
        r = xc - n * _LN2
        p = _EXP_P[0]
        p = p * r + _EXP_P[1]
        p = p * r + _EXP_P[2]
        p = p * r + _EXP_P[3]
        p = p * r + _EXP_P[4]
        p = p * r + _EXP_P[5]
        return (p * r * r + r + _ONE) * _pow2_f32(n)

    return exp_f32


@overload(softplus, inline="always")
def _softplus_impl(x):
    # max(x, 0) + log1p(exp(-|x|)) never overflows; x above the threshold passes through unchanged, as in
    # torch.nn.functional.softplus (the other term is finite there, so the masked sum is exactly x).
    if x != types.float32:

        def softplus_f64(x):
            above = np.float64(x > SOFTPLUS_THRESHOLD)
            return above * x + (1.0 - above) * (max(x, 0.0) + math.log1p(math.exp(-abs(x))))

        return softplus_f64

    def softplus_f32(x):
        e = exp(-abs(x))
        s = e / (_TWO + e)
        s2 = s * s
        q = _LOG1P_Q[0]
        q = q * s2 + _LOG1P_Q[1]
        q = q * s2 + _LOG1P_Q[2]
        q = q * s2 + _LOG1P_Q[3]
        q = q * s2 + _LOG1P_Q[4]
        q = q * s2 + _LOG1P_Q[5]
        q = q * s2 + _LOG1P_Q[6]
        log1p = _TWO * s * (q * s2 + _ONE)
        above = np.float32(x > _THRESH32)
        return above * x + (_ONE - above) * (max(x, _ZERO) + log1p)

    return softplus_f32


@overload(sigmoid, inline="always")
def _sigmoid_impl(x):
    # exp(-x) saturates instead of overflowing in float32 (its input is clamped) and gives inf, so 0, in float64.
    one = _ONE if x == types.float32 else 1.0

    def sigmoid(x):
        return one / (one + exp(-x))

    return sigmoid
