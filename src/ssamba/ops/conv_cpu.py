"""Fused CPU causal depthwise conv1d + SiLU: a numba forward kernel and a hand-written backward.

Registers itself as the ``cpu`` backend of :func:`ssamba.ops.selective_scan.causal_conv1d` on import (see the end
of the file), with the semantics of ``causal_conv1d_reference`` (``causal_conv1d_ref``, Dao-AILab/causal-conv1d):

    p_t = bias + sum_k weight_k * x_(t - (W-1) + k)        (x_s = 0 for s < 0: causal, left zero padding)
    u_t = silu(p_t) = p_t * sigmoid(p_t)                    (or u_t = p_t without activation)

Shape glossary
    B  batch            E  channels (d_inner)        L  sequence length        W  kernel width (d_conv)

Precision: computed in float32 for float32/float16/bfloat16 weights and in float64 for float64 ones, with the
input cast to the weight's dtype first, as the reference does; the sums over time of the weight and bias gradients
are accumulated in float64 (as the scan kernel's dA, dD).

Why it is faster than the reference (``F.conv1d`` with W-1 padding on both sides, a slice, ``F.silu``): one pass
per (batch, channel) row, in L1, instead of a convolution that writes L+W-1 outputs, then a SiLU over a strided
slice of them; the backward is one pass too (the reference runs SiLU's backward, zero-fills the padded gradient for
the slice, then the convolution's backward). Only ``x`` is saved for the backward, which recomputes ``p`` (W
multiply-adds per element) instead of keeping the (B, E, L + W - 1) pre-activation alive as the reference's
autograd graph does.
Rows are independent, so they are split over threads with ``prange``; inside a row each tap of the kernel is one
vectorised loop over time (W + 1 passes over 4 * L bytes that stay in L1), because a runtime W as the inner loop
would keep LLVM from vectorising over time.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

# The vectorisable float32 exp/sigmoid (numba overloads registered by scan_cpu) and the same compiler settings as
# the scan kernels, so that both are compiled alike (fastmath flags, numpy error model, on-disk cache).
from ssamba.ops.scan_cpu import _PARALLEL, _sigmoid
from ssamba.ops.selective_scan import register_conv_backend

__all__ = ["causal_conv1d_cpu", "is_available"]


# ----------------------------------------------------------------------------------------------- kernels


@numba.njit(**_PARALLEL)
def _forward_kernel(x, weight, bias, silu, out):
    """out = [silu](causal depthwise conv1d(x)), one (batch, channel) row per iteration.

    x, out: (B, E, L); weight: (E, W); bias: (E,) (zeros without a bias).
    """
    nb, ne, seqlen = x.shape
    width = weight.shape[1]
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        x_r, o_r, w_r = x[b, e], out[b, e], weight[e]  # (L,), (L,), (W,)
        # Tap k multiplies x_(t - shift) with shift = W - 1 - k; the last tap (shift 0) initialises the row.
        bias_e, w_last = bias[e], w_r[width - 1]
        for t in range(seqlen):
            o_r[t] = bias_e + w_last * x_r[t]
        for k in range(width - 1):
            shift = width - 1 - k
            w_k = w_r[k]
            for t in range(shift, seqlen):
                o_r[t] += w_k * x_r[t - shift]
        if silu:
            for t in range(seqlen):
                p = o_r[t]
                o_r[t] = p * _sigmoid(p)


@numba.njit(**_PARALLEL)
def _backward_kernel(x, weight, bias, silu, dout, dx, dweight, dbias):
    """Gradients of :func:`_forward_kernel`, one row per iteration; the pre-activation is recomputed from x.

    x, dout, dx: (B, E, L); weight: (E, W); bias: (E,). Writes dx, and dweight: (B, E, W) and dbias: (B, E), both
    float64, to be summed over the batch by the caller (each row owns its slot, so threads never share memory).
    """
    nb, ne, seqlen = x.shape
    width = weight.shape[1]
    one = x.dtype.type(1)
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        x_r, dout_r, dx_r, w_r = x[b, e], dout[b, e], dx[b, e], weight[e]  # (L,) x3, (W,)
        g = np.empty(seqlen, x.dtype)  # (L,) the pre-activation p, then its gradient
        bias_e, w_last = bias[e], w_r[width - 1]
        for t in range(seqlen):
            g[t] = bias_e + w_last * x_r[t]
        for k in range(width - 1):
            shift = width - 1 - k
            w_k = w_r[k]
            for t in range(shift, seqlen):
                g[t] += w_k * x_r[t - shift]
        # Through u = p sigmoid(p): du/dp = s (1 + p (1 - s)), as torch's silu_backward.
        if silu:
            for t in range(seqlen):
                p = g[t]
                s = _sigmoid(p)
                g[t] = dout_r[t] * s * (one + p * (one - s))
        else:
            for t in range(seqlen):
                g[t] = dout_r[t]
        # dbias = sum_t g_t; dweight_k = sum_t g_t x_(t - shift); dx_s = sum_k w_k g_(s + shift) (s + shift < L).
        acc = 0.0
        for t in range(seqlen):
            acc += g[t]
        dbias[b, e] = acc
        for k in range(width):
            shift = width - 1 - k
            acc = 0.0
            for t in range(shift, seqlen):
                acc += g[t] * x_r[t - shift]
            dweight[b, e, k] = acc
        for s in range(seqlen):
            dx_r[s] = w_last * g[s]
        for k in range(width - 1):
            shift = width - 1 - k
            w_k = w_r[k]
            for s in range(seqlen - shift):
                dx_r[s] += w_k * g[s + shift]


# ------------------------------------------------------------------------------------------- torch glue


def is_available(x: Tensor) -> bool:
    """The kernels run on CPU tensors of any floating dtype (float16/bfloat16 are computed in float32)."""
    return x.device.type == "cpu" and x.dtype.is_floating_point


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shape errors here rather than out-of-bounds reads in the (unchecked) kernels."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, channels, length), got shape {tuple(x.shape)}")
    ne = x.shape[1]
    if not (weight.dim() == 2 or (weight.dim() == 3 and weight.shape[1] == 1)) or weight.shape[0] != ne:
        raise ValueError(f"weight must be ({ne}, W) or ({ne}, 1, W), got shape {tuple(weight.shape)}")
    if weight.shape[-1] < 1:
        raise ValueError("weight must have at least one tap (W >= 1)")
    if bias is not None and tuple(bias.shape) != (ne,):
        raise ValueError(f"bias must be ({ne},), got shape {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the cpu causal-conv1d backend needs CPU tensors; {name} is on {t.device}")


def _prepare(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, E, L), weight (E, W), bias (E,) in the compute dtype, contiguous. x goes through the weight's dtype
    first (the reference's ``x.to(weight.dtype)``), so a float64 x with float32 weights rounds as it does there."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    xc = x.detach().to(weight.dtype).to(compute).contiguous()
    wc = weight.detach().reshape(weight.shape[0], weight.shape[-1]).to(compute).contiguous()
    bc = torch.zeros(weight.shape[0], dtype=compute) if bias is None else bias.detach().to(compute).contiguous()
    return xc, wc, bc


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _run_forward(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """(B, E, L) output in ``weight.dtype``, the reference's output dtype."""
    xc, wc, bc = _prepare(x, weight, bias)
    out = torch.empty_like(xc)
    _forward_kernel(_np(xc), _np(wc), _np(bc), silu, _np(out))
    return out.to(weight.dtype)


class _CausalConv1dFn(torch.autograd.Function):
    """Forward kernel saving only the inputs; backward kernel recomputing the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return _run_forward(x, weight, bias, silu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        xc, wc, bc = _prepare(x, weight, bias)
        nb, ne, _ = xc.shape
        dout = dout.to(xc.dtype).contiguous()
        dx = torch.empty_like(xc)
        dweight = torch.empty(nb, ne, wc.shape[1], dtype=torch.float64)
        dbias = torch.empty(nb, ne, dtype=torch.float64)
        _backward_kernel(_np(xc), _np(wc), _np(bc), ctx.silu, _np(dout), _np(dx), _np(dweight), _np(dbias))
        return (
            dx.to(x.dtype),
            dweight.sum(0).reshape(weight.shape).to(weight.dtype),
            None if bias is None else dbias.sum(0).to(bias.dtype),
            None,
        )


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Fused causal depthwise conv1d [+ SiLU] on CPU; arguments and result as ``causal_conv1d_reference``.

    x: (B, E, L); weight: (E, W) or (E, 1, W); bias: (E,) or None; ``activation``: None or "silu".
    Returns (B, E, L) in ``weight.dtype``, contiguous. Differentiable in x, weight and bias.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    _check_inputs(x, weight, bias)
    silu = activation == "silu"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _CausalConv1dFn.apply(x, weight, bias, silu)
    return _run_forward(x, weight, bias, silu)


# First choice of "auto" on CPU (unless the scan is forced to the reference, see causal_conv1d): it agrees with the
# reference to float32 rounding, not bit for bit (F.conv1d sums the taps in its own order).
register_conv_backend("cpu", causal_conv1d_cpu, is_available, auto_priority=0)
