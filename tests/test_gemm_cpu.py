"""The fast path's matrix products (oneDNN) against float64, in every operand layout the fused mixer uses."""

from __future__ import annotations

import platform

import pytest
import torch

from ssamba.ops import gemm_cpu
from ssamba.ops.gemm_cpu import mm

# Error model: a float32 dot product of depth K, summed in any order (oneDNN blocks the sum its own way), is within
# gamma_K = K u / (1 - K u) of the exact one, relative to sum |a_i b_i| (Higham, Accuracy and Stability of Numerical
# Algorithms, 3.1), with u = 2^-24, plus the rounding of the result itself.
U = 2.0**-24


def _layouts(m: int, k: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()  # the same values, column-major
    return [(a, b), (a_t, b), (a, b_t), (a_t, b_t)]


@pytest.mark.parametrize("shape", [(96, 24, 130), (12, 130, 7), (130, 7, 96), (1, 64, 1)])
def test_products_are_within_the_float32_error_bound_in_every_layout(shape):
    m, k, n = shape
    for a, b in _layouts(m, k, n):
        got = mm(a, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        exact = a.double() @ b.double()
        bound = (k * U / (1 - k * U)) * (a.double().abs() @ b.double().abs()) + U * exact.abs()
        assert torch.all((got.double() - exact).abs() <= bound)


def test_float64_and_autocast_take_torch_mm():
    a, b = torch.randn(20, 30, dtype=torch.float64), torch.randn(30, 10, dtype=torch.float64)
    assert torch.equal(mm(a, b), torch.mm(a, b))
    a32, b32 = a.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = mm(a32, b32), torch.mm(a32, b32)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="torch's x86-64 wheels have oneDNN")
def test_onednn_is_found_on_x86():
    # a torch release that renames the private op would silently send every product back to MKL's slower path
    assert gemm_cpu.ONEDNN
