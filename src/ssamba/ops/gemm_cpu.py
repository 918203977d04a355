"""Matrix products for the CPU fast paths, through oneDNN.

torch's float32 ``torch.mm`` on CPU calls MKL's sgemm. MKL chooses its code path by the CPU's vendor, and on AMD
processors it runs its AVX2 kernels even where the CPU has AVX-512. oneDNN, which torch also ships, chooses by the
instruction set. On one core of the AMD EPYC (Zen 5) both models' projection shapes ran at 170-230 GFLOP/s through
oneDNN against 89-101 through MKL (`ssamba bench gemm`; benchmarks/RESULTS.md, session 11). Where MKL takes its
AVX-512 path (Intel CPUs) the two should be alike; that is not measured yet, and `ssamba bench gemm` shows it on
any CPU.

The two libraries block the sums differently, so their results differ by float32 rounding. Only the fused mixer
calls this (:mod:`ssamba.ops.mamba_inner_cpu`, :mod:`ssamba.ops.mamba_infer_cpu`): the reference path keeps
torch's own products, and with them the official numbers' bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ONEDNN", "mm"]

# torch.ops.mkldnn._linear_pointwise is the op torch's own compiler (inductor) emits for a Linear on CPU: X W^T + b
# through oneDNN for float32 inputs of any strides. It exists where torch was built with oneDNN (x86-64 and most
# aarch64 wheels); elsewhere every product falls back to torch.mm.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D CPU tensors of any strides: float32 through oneDNN, other dtypes (and everything under
    ``torch.autocast``, whose reduced-precision products torch already sends to oneDNN) through ``torch.mm``."""
    if ONEDNN and a.dtype == b.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)
