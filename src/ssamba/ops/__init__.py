"""Numerical kernels with pure-PyTorch references (selective scan, causal depthwise conv1d)."""

from ssamba.ops import conv_cpu as _conv_cpu  # noqa: F401  (registers the numba "cpu" causal-conv1d backend)
from ssamba.ops import scan_cpu as _scan_cpu  # noqa: F401  (registers the numba "cpu" backend)
from ssamba.ops import scan_cuda as _scan_cuda  # noqa: F401  (registers the mamba_ssm "cuda" backend)
from ssamba.ops import scan_triton as _scan_triton  # noqa: F401  (registers the "triton" backend)
from ssamba.ops.selective_scan import (
    available_backends,
    causal_conv1d,
    causal_conv1d_reference,
    register_backend,
    resolve_backend,
    selective_scan,
    selective_scan_reference,
    use_backend,
)

__all__ = [
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_reference",
    "register_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
    "use_backend",
]
