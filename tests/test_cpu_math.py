"""The numba kernels' float32 exp, softplus and sigmoid against float64 NumPy, over their whole range."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from ssamba.ops.cpu_math import SERIAL, exp, sigmoid, softplus

# Error model, relative: the polynomial's own error (Cephes' expf, about 2 ulp: 4e-7 covers it, 3.4 float32 ulp at
# worst-placed values) plus the range reduction's r = x - n ln2, which is exact with an FMA but rounded once where
# the target has none (numerics.sh's baseline profile): half an ulp of n ln2 ~ |x|, so 6e-8 |x|. That is the size
# of the input's own rounding, exp's conditioning being |x|. softplus and sigmoid add a few roundings each.
REL = 4e-7
REL_PER_X = 6e-8


@numba.njit(**dict(SERIAL, cache=False))  # the kernels' own compiler flags (contraction, reassociation)
def _apply(which, x, out):
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = exp(x[i])
        elif which == 1:
            out[i] = softplus(x[i])
        else:
            out[i] = sigmoid(x[i])


def _run(which: int, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _apply(which, x, out)
    return out


def test_exp_is_accurate_across_the_normal_range():
    x = np.linspace(-87.3, 88.0, 200_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    got = _run(0, x).astype(np.float64)
    assert np.all(np.abs(got - want) / want < REL + REL_PER_X * np.abs(x))


def test_exp_at_both_ends_of_its_range():
    # exactly 0 below -87.68 (2**-127's bit pattern is 0.0)
    assert np.all(_run(0, np.array([-87.7, -88.0, -100.0, -1e30, -np.inf], np.float32)) == 0.0)
    # between -87.68 and the smallest normal's log the result is subnormal: the error model plus a subnormal's step
    x = np.linspace(-87.6, -87.34, 101, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    got = _run(0, x).astype(np.float64)
    assert np.all(np.abs(got - want) <= (REL + REL_PER_X * np.abs(x)) * want + 2.0**-149)
    top = _run(0, np.array([88.0, 89.0, 1e30], np.float32))  # clamped at 88: finite, exp(88) for anything above
    assert np.all(top == top[0]) and abs(top[0] / np.exp(88.0) - 1) < REL + REL_PER_X * 88


def test_exp_at_zero_is_one():
    assert _run(0, np.zeros(3, np.float32))[0] == 1.0


@pytest.mark.parametrize("which,reference", [
    (1, lambda x: np.logaddexp(0.0, x)),
    (2, lambda x: np.exp(-np.logaddexp(0.0, -x))),  # 1 / (1 + exp(-x)) without exp's overflow
])  # fmt: skip
def test_softplus_and_sigmoid_against_float64(which, reference):
    x = np.concatenate([np.linspace(-100.0, 100.0, 100_001), [-1e30, 1e30]]).astype(np.float32)
    want = reference(x.astype(np.float64))
    got = _run(which, x).astype(np.float64)
    # results below 1e-30 are judged absolutely: exp underflows to 0 where the true value is subnormal, and exp's
    # clamp at 88 makes sigmoid bottom out at 1 / (1 + exp(88)) = 6e-39 instead of reaching 0
    scale = np.maximum(np.abs(want), 1e-30)
    assert np.all(np.abs(got - want) / scale < 4 * REL + REL_PER_X * np.minimum(np.abs(x), 88.0))
