"""The ``cuda`` selective-scan backend: ``mamba_ssm``'s fused CUDA kernel when that optional package is installed.

``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` has exactly our signature and semantics (ours were
modelled on it), so this backend is a thin adapter. ``mamba_ssm`` is an optional extra (``pip install
ssamba[cuda]``): without it, or on CPU tensors, the backend reports itself unavailable and ``auto`` falls back to
the next backend that can run (the reference works on any device). The import is guarded because mamba_ssm
needs its compiled CUDA extension, which a CPU machine does not have.
"""

from __future__ import annotations

from torch import Tensor

from ssamba.ops.selective_scan import register_backend

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except (ImportError, OSError):  # not installed, or installed without a loadable CUDA extension
    selective_scan_fn = None


def is_available(u: Tensor) -> bool:
    """CUDA tensors, with mamba_ssm importable."""
    return selective_scan_fn is not None and u.is_cuda


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """``mamba_ssm.selective_scan_fn``; arguments and results as ``selective_scan_reference``."""
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


register_backend("cuda", selective_scan_cuda, is_available, auto_priority=0)
