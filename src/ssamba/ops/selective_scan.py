"""Selective scan (the Mamba-1 S6 recurrence) with a pluggable backend, and a causal depthwise conv1d.

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` / ``selective_scan_ref``
(state-spaces/mamba) for real-valued ``A``.

Shape glossary
    B  batch            D  channels (d_inner)        L  sequence length
    N  state size       G  groups of B/C (D must be a multiple of G)
    W  conv kernel width

Recurrence, per batch item b and channel d (state ``h`` is (N,), starts at 0):
    delta_t = softplus(delta_t + delta_bias)        (bias and softplus optional)
    h_t     = exp(delta_t * A) * h_(t-1) + delta_t * B_t * u_t
    y_t     = <C_t, h_t> + D * u_t
    out_t   = y_t * silu(z_t)                        (gate optional)

Backends: ``reference`` (pure PyTorch, below; bit-identical to the official float32 numbers) and the ones
that register themselves (``cpu``: fused numba kernels, ``ssamba.ops.scan_cpu``; ``cuda``: ``mamba_ssm``'s kernel,
``ssamba.ops.scan_cuda``; ``triton``: Triton kernels, ``ssamba.ops.scan_triton``). A backend is chosen by the
``backend`` argument, else by an enclosing :func:`use_backend`, else by the ``SSAMBA_SCAN_BACKEND``
environment variable, else automatically (``auto``: the fastest available for the input's device: ``cpu`` on CPU
tensors; ``cuda``, else ``triton``, else ``reference`` on CUDA tensors).
Backends register themselves with :func:`register_backend`; every one must match the reference in outputs
and gradients.

The causal depthwise conv1d (+ SiLU) before the scan has the same arrangement: :func:`causal_conv1d_reference`
(``F.conv1d``, the official arithmetic) and :func:`causal_conv1d`, which dispatches to it or to a registered
backend (``cpu``: a fused numba kernel, ``ssamba.ops.conv_cpu``), see :func:`resolve_conv_backend`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_reference",
    "check_scan_inputs",
    "register_backend",
    "register_conv_backend",
    "resolve_backend",
    "resolve_conv_backend",
    "selective_scan",
    "selective_scan_reference",
    "use_backend",
]

ENV_VAR = "SSAMBA_SCAN_BACKEND"


def _expand_groups(m: Tensor, dim: int) -> Tensor:
    """(B, N, L) -> (B, 1, N, L); (B, G, N, L) -> (B, D, N, L) with each group shared by D/G channels."""
    if m.dim() == 3:
        return m.unsqueeze(1)
    if m.dim() == 4:
        groups = m.shape[1]
        if dim % groups:
            raise ValueError(f"channels ({dim}) must be a multiple of the B/C groups ({groups})")
        return m.repeat_interleave(dim // groups, dim=1)
    raise ValueError(f"B and C must be (batch, N, L) or (batch, G, N, L), got shape {tuple(m.shape)}")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, backend: str | None = None) -> None:
    """Shape and device errors raised before a fused kernel runs (they do not bounds-check), for the backends.

    Shapes as :func:`selective_scan_reference`; with ``backend`` given, every tensor must be on ``u``'s device
    (the message names the backend).
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported; SSAMBA and Mamba-1 use real A")
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    nb, nd, seqlen = u.shape
    if tuple(delta.shape) != (nb, nd, seqlen):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != nd:
        raise ValueError(f"A must be (channels={nd}, N), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 4:
            ok = m.shape[0] == nb and m.shape[1] > 0 and nd % m.shape[1] == 0 and m.shape[2:] == (nstate, seqlen)
        else:
            ok = tuple(m.shape) == (nb, nstate, seqlen)
        if not ok:
            raise ValueError(
                f"{name} must be ({nb}, {nstate}, {seqlen}) or ({nb}, G, {nstate}, {seqlen}) with G dividing "
                f"{nd}, got shape {tuple(m.shape)}"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (nd,):
            raise ValueError(f"{name} must be ({nd},), got shape {tuple(v.shape)}")
    if z is not None and tuple(z.shape) != (nb, nd, seqlen):
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if backend is not None:
        for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias)):  # fmt: skip
            if t is not None and t.device != u.device:
                raise ValueError(f"the {backend} selective-scan backend needs every tensor on u's device "
                                 f"({u.device}); {name} is on {t.device}")  # fmt: skip


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-PyTorch selective scan; the state is kept in float32 (or float64 for float64 inputs).

    u, delta: (B, D, L); A: (D, N) real; B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,);
    z: (B, D, L). Returns out (B, D, L) in ``u.dtype`` [, last_state (B, D, N) in the state dtype].

    Same arithmetic as ``selective_scan_ref``, but the time loop walks ``unbind``-ed slices of the
    precomputed ``exp(delta*A)`` and ``delta*B*u`` and gathers outputs with one ``stack``: autograd then
    records O(L) nodes whose backward is a single stack, whereas ``deltaA[:, :, i]`` indexing builds a
    full-size zero gradient per step (O(L^2) time and memory in the backward).
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported; SSAMBA and Mamba-1 use real A")
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    dim = A.shape[0]
    B = _expand_groups(B.to(compute), dim)  # (B, 1|D, N, L)
    C = _expand_groups(C.to(compute), dim)  # (B, 1|D, N, L)

    # Discretisation (zero-order hold for A, Euler for B), laid out time-major so that each step reads a
    # contiguous (B, D, N) slice. Products in selective_scan_ref's einsum order: (delta * B) * u.
    delta_t = delta.permute(2, 0, 1)[..., None]  # (L, B, D, 1)
    delta_a = torch.exp(delta_t * A.to(compute))  # (L, B, D, N)
    delta_b_u = delta_t * B.permute(3, 0, 1, 2) * u.permute(2, 0, 1)[..., None]  # (L, B, D, N)
    c_steps = C.permute(3, 0, 1, 2).unbind(0)  # L x (B, 1|D, N)

    state = u.new_zeros((u.shape[0], dim, A.shape[1]))  # (B, D, N)
    ys = []
    for da_t, dbu_t, c_t in zip(delta_a.unbind(0), delta_b_u.unbind(0), c_steps, strict=True):
        state = da_t * state + dbu_t
        # einsum (a batched matmul) as selective_scan_ref: a mul+sum is faster here but rounds differently,
        # and the reference path must reproduce the official float32 numbers bit for bit.
        ys.append(torch.einsum("bdn,bdn->bd", state, c_t.expand_as(state)))  # (B, D)
    y = torch.stack(ys, dim=2)  # (B, D, L)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Depthwise causal conv1d, as ``causal_conv1d_ref`` (Dao-AILab/causal-conv1d).

    x: (B, D, L); weight: (D, W) or (D, 1, W); bias: (D,). Output (B, D, L): left padding W-1 by
    padding both sides and keeping the first L outputs, so position t only sees inputs <= t.
    ``activation``: None or "silu".
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)  # (D, 1, W)
    seqlen, width = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight, bias, padding=width - 1, groups=weight.shape[0])
    out = out[..., :seqlen]
    return F.silu(out) if activation == "silu" else out


# ---------------------------------------------------------------------------------------------- dispatch


class _Backends:
    """Backends of one op: name -> (function, is_available(t) predicate). ``auto`` picks the first available of
    ``auto_order``; the reference, always available, is registered first and stays last."""

    def __init__(self, op: str, reference: Callable) -> None:
        self.op = op
        self.table: dict[str, tuple[Callable, Callable[[Tensor], bool]]] = {"reference": (reference, lambda t: True)}
        self.auto_order: list[str] = ["reference"]

    def register(self, name: str, fn: Callable, is_available: Callable[[Tensor], bool],
                 auto_priority: int | None = None) -> None:
        self.table[name] = (fn, is_available)
        if auto_priority is not None:
            if name in self.auto_order:
                self.auto_order.remove(name)
            self.auto_order.insert(auto_priority, name)

    def resolve(self, t: Tensor, name: str, source: str | None = None) -> str:
        """The backend ``name`` ("auto" or a registered one) means for input ``t``; a ValueError names a backend
        that is unknown (and where the name came from) or cannot run on ``t``."""
        name = name.strip().lower() or "auto"
        if name == "auto":
            return next((c for c in self.auto_order if self.table[c][1](t)), "reference")
        if name not in self.table:
            origin = f" (from {source})" if source else ""
            raise ValueError(f"unknown {self.op} backend {name!r}{origin}; choose one of: auto, "
                             f"{', '.join(self.table)}")
        if not self.table[name][1](t):
            raise ValueError(f"{self.op} backend {name!r} cannot run on this input/installation")
        return name


ScanFn = Callable[..., "Tensor | tuple[Tensor, Tensor]"]
_SCANS = _Backends("selective-scan", selective_scan_reference)


def register_backend(
    name: str, fn: ScanFn, is_available: Callable[[Tensor], bool], auto_priority: int | None = None
) -> None:
    """Add a scan backend. ``is_available(u)`` says whether it can run on ``u`` (device, dtype, install);
    with ``auto_priority`` set it joins automatic selection at that position (0 = tried first; negative counts from
    the end, as ``list.insert``: -1 = just before the reference, which stays last)."""
    _SCANS.register(name, fn, is_available, auto_priority)


_forced: list[str] = []  # stack of use_backend() names, innermost last


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, every :func:`selective_scan` without an explicit ``backend`` uses ``name``
    (e.g. ``"reference"`` to replay the official numbers bit for bit)."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` / ``SSAMBA_SCAN_BACKEND`` (plus ``auto``)."""
    return list(_SCANS.table)


def resolve_backend(u: Tensor, backend: str | None = None) -> str:
    """The backend name that :func:`selective_scan` would use for input ``u``."""
    source = "argument" if backend is not None else "use_backend" if _forced else ENV_VAR
    name = backend if backend is not None else _forced[-1] if _forced else os.environ.get(ENV_VAR, "auto")
    return _SCANS.resolve(u, name, source)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with ``mamba_ssm.selective_scan_fn`` semantics (see the module docstring).

    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,).
    Returns out (B, D, L) [, last_state (B, D, N)].
    ``backend``: "auto" (default), or a name from :func:`available_backends`; overrides $SSAMBA_SCAN_BACKEND.
    """
    fn = _SCANS.table[resolve_backend(u, backend)][0]
    # A named range for torch.profiler (``ssamba bench models --profile`` attributes everything inside it,
    # numba time included, to the scan); costs about a microsecond per call when no profiler runs.
    with torch.profiler.record_function("ssamba::selective_scan"):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ------------------------------------------------------------------------------------ conv1d dispatch

ConvFn = Callable[..., Tensor]
# ``cpu`` registers from ssamba.ops.conv_cpu.
_CONVS = _Backends("causal-conv1d", causal_conv1d_reference)


def register_conv_backend(
    name: str, fn: ConvFn, is_available: Callable[[Tensor], bool], auto_priority: int | None = None
) -> None:
    """Add a causal-conv1d backend, as :func:`register_backend` does a scan backend."""
    _CONVS.register(name, fn, is_available, auto_priority)


def resolve_conv_backend(x: Tensor, backend: str | None = None) -> str:
    """The backend name that :func:`causal_conv1d` would use for input ``x``.

    ``auto`` follows the scan's explicit choice of the reference (an enclosing ``use_backend("reference")`` or
    ``SSAMBA_SCAN_BACKEND=reference``), so that "reference" means pure PyTorch for the whole mixer (the fused kernel
    sums the W taps in another order than ``F.conv1d``); otherwise the first available (``cpu`` for CPU tensors,
    else the reference).
    """
    name = (backend or "auto").strip().lower() or "auto"
    if name == "auto":
        scan_choice = _forced[-1] if _forced else os.environ.get(ENV_VAR, "auto")
        if scan_choice.strip().lower() == "reference":
            return "reference"
    return _CONVS.resolve(x, name)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu", backend: str | None = None
) -> Tensor:
    """Causal depthwise conv1d [+ SiLU] with :func:`causal_conv1d_reference`'s semantics, by backend.

    x: (B, D, L); weight: (D, W) or (D, 1, W); bias: (D,) or None; ``activation``: "silu" (default, the Mamba
    mixer's) or None. Returns (B, D, L) in ``weight.dtype``. ``backend``: "auto" (default, see
    :func:`resolve_conv_backend`), "reference" or "cpu".
    """
    fn = _CONVS.table[resolve_conv_backend(x, backend)][0]
    # Its own profiler range, as the scan's; the fused kernel runs no aten convolution op.
    with torch.profiler.record_function("ssamba::causal_conv1d"):
        return fn(x, weight, bias, activation)
