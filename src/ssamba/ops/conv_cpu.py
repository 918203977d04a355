"""Fused CPU causal depthwise conv1d + SiLU: a numba forward kernel and a hand-written backward.

Registers itself as the ``cpu`` backend of :func:`ssamba.ops.selective_scan.causal_conv1d` on import (see the end
of the file), with the semantics of ``causal_conv1d_reference`` (``causal_conv1d_ref``, Dao-AILab/causal-conv1d):

    p_t = bias + sum_k weight_k * x_(t - (W-1) + k)        (x_s = 0 for s < 0: causal, left zero padding)
    u_t = silu(p_t) = p_t * sigmoid(p_t)                    (or u_t = p_t without activation)

Shape glossary
    B  batch            E  channels (d_inner)        L  sequence length        W  kernel width (d_conv)

Precision: computed in float32 for float32/float16/bfloat16 weights and in float64 for float64 ones, with the
input cast to the weight's dtype first, as the reference does. The sums over time of the weight and bias gradients
are float32 within chunks of SUM_CHUNK steps and float64 across them (the scan kernel sums over time in float64).

Why it is faster than the reference (``F.conv1d`` with W-1 padding on both sides, a slice, ``F.silu``): the
forward is one kernel, a tap loop and a SiLU pass over each (batch, channel) row while it is in L1, instead of a
convolution writing L+W-1 outputs and a SiLU over a strided slice of them; the backward is one kernel too (the
reference runs SiLU's backward, zero-fills the padded gradient for the slice's backward, then the convolution's
backward for input and weight). Only ``x`` is saved for the backward, which recomputes ``p`` (W multiply-adds per
element) instead of keeping the (B, E, L + W - 1) pre-activation alive, as the reference's graph does for SiLU.
Measured at SSAMBA-tiny's shape at 512 tokens (B=2, E=384, L=513, W=4, float32; one core of the 2-core AMD EPYC,
2026-12-01), medians: forward 0.15 ms against the reference's 0.28 ms, forward + backward 0.56 ms against 2.04 ms,
with every allocation reused; with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``ssamba bench models`` times), where each
fresh (B, E, L) tensor costs about 0.6 ms of page faults here, 0.78 ms against 2.75 ms and 1.85 ms against 8.07 ms
(the reference allocates four such buffers per forward, this one its output).
Rows are independent, so they are split over threads with ``prange``; inside a row the taps are one vectorised
loop over time (see TAPS).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

# The vectorisable float32 sigmoid and the scan kernels' compiler settings (fastmath flags, numpy error model,
# on-disk cache), so that both are compiled alike.
from ssamba.ops.cpu_math import PARALLEL, SERIAL, sigmoid
from ssamba.ops.selective_scan import register_conv_backend

__all__ = ["causal_conv1d_cpu", "is_available", "padded_taps"]


# ----------------------------------------------------------------------------------------------- kernels

# Taps are handled in blocks of TAPS, the weights left-padded with zeros to WP = TAPS * ceil(W / TAPS): a block
# is a loop over time whose body has a constant number of multiply-adds at constant offsets from the loop index
# (through array views), which LLVM vectorises. Every Mamba has W = d_conv = 4 (and causal-conv1d's CUDA kernel
# supports W <= 4 only), one block; wider kernels take a block per 4 taps. A loop per tap,
# ``o[t + shift] += w_k x[t]``, stayed scalar (LLVM could not rule out that o and x overlap at distance shift):
# 0.41 ms against 0.06 ms for the conv of SSAMBA-tiny at 512 tokens on one core.
TAPS = 4
# The weight and bias gradients sum over time in float32 within chunks of SUM_CHUNK steps (one vectorised loop)
# and in float64 across chunks, so their rounding error is that of a SUM_CHUNK-term float32 sum whatever L and the
# vector width. Float64 accumulators in the loop itself stopped it vectorising (0.35 ms against 0.07 ms at
# SSAMBA-tiny's shape); a float32 accumulator over all of L would be about 0.03 ms faster.
SUM_CHUNK = 64


@numba.njit(**SERIAL, inline="always")
def _preactivation(x_r, w_r, bias_e, p_r):
    """p_t = bias_e + sum_k w_r[k] x_r[t - (WP-1) + k] (zero before the start) into p_r[:L].

    x_r: (L,); w_r: (WP,) left-padded taps; p_r: (>= L,), written. The first WP - 1 outputs, which see the zero
    padding, are scalar; the rest is one vectorised loop per block of TAPS taps."""
    seqlen, wp = x_r.shape[0], w_r.shape[0]
    for t in range(min(wp - 1, seqlen)):
        acc = bias_e
        for k in range(wp - 1 - t, wp):
            acc += w_r[k] * x_r[t + k - (wp - 1)]
        p_r[t] = acc
    if seqlen <= wp - 1:
        return
    p_main = p_r[wp - 1 :]  # output t = WP - 1 + i reads x_r[i + j + 0..3] in block j
    m = np.uintp(seqlen - (wp - 1))  # unsigned: no negative-index wrap-around, which would stop vectorisation
    for j in range(0, wp, TAPS):
        w0, w1, w2, w3 = w_r[j], w_r[j + 1], w_r[j + 2], w_r[j + 3]
        xj = x_r[j:]
        if j == 0:
            for i in range(m):
                p_main[i] = bias_e + w0 * xj[i] + w1 * xj[i + 1] + w2 * xj[i + 2] + w3 * xj[i + 3]
        else:
            for i in range(m):
                p_main[i] += w0 * xj[i] + w1 * xj[i + 1] + w2 * xj[i + 2] + w3 * xj[i + 3]


@numba.njit(**PARALLEL)
def _forward_kernel(x, weight, bias, silu, out):
    """out = [silu](causal depthwise conv1d(x)), one (batch, channel) row per iteration.

    x, out: (B, E, L); weight: (E, WP), left-padded with zeros; bias: (E,) (zeros without a bias).
    """
    nb, ne, seqlen = x.shape
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        o_r = out[b, e]  # (L,)
        _preactivation(x[b, e], weight[e], bias[e], o_r)
        if silu:  # a pass of its own: fused into the tap loop it was no faster (the exp dominates)
            for t in range(np.uintp(seqlen)):
                p = o_r[t]
                o_r[t] = p * sigmoid(p)


@numba.njit(**PARALLEL)
def _backward_kernel(x, weight, bias, silu, dout, dx, dweight, dbias):
    """Gradients of :func:`_forward_kernel`, one row per iteration (see :func:`_backward_row`).

    x, dout, dx: (B, E, L); weight: (E, WP), left-padded; bias: (E,). Writes dx, and dweight: (B, E, WP) and
    dbias: (B, E), both float64, to be summed over the batch by the caller (each row owns its slot, so threads
    never share memory).
    """
    nb, ne, seqlen = x.shape
    wp = weight.shape[1]
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        gp = np.empty(seqlen + wp - 1, x.dtype)
        dbias[b, e] = _backward_row(x[b, e], weight[e], bias[e], silu, dout[b, e], dx[b, e], gp, dweight[b, e])


@numba.njit(**SERIAL, inline="always")
def _backward_row(x_r, w_r, bias_e, silu, dout_r, dx_r, gp, dweight_r):
    """The gradients of one (batch, channel) row; the pre-activation is recomputed from x. Returns d bias (float64).

    x_r, dout_r, dx_r: (L,), dx_r written; w_r: (WP,) left-padded taps; gp: (L + WP - 1,) scratch;
    dweight_r: (WP,) float64, written.
    """
    seqlen, wp = x_r.shape[0], w_r.shape[0]
    n = np.uintp(seqlen)
    one = x_r.dtype.type(1)
    zero = x_r.dtype.type(0)
    nfull = seqlen // SUM_CHUNK
    for i in range(wp - 1):  # gp: p, then its gradient g, then WP - 1 zeros
        gp[seqlen + i] = 0
    _preactivation(x_r, w_r, bias_e, gp)
    # Through u = p sigmoid(p): du/dp = s (1 + p (1 - s)), as torch's silu_backward.
    if silu:
        for t in range(n):
            p = gp[t]
            sg = sigmoid(p)
            gp[t] = dout_r[t] * sg * (one + p * (one - sg))
    else:
        for t in range(n):
            gp[t] = dout_r[t]

    # Tap k (shift s = WP - 1 - k) took x_t to p_(t+s), so dx_t = sum_k w_k g_(t+s), dweight_k = sum_t x_t
    # g_(t+s) (g is zero past L) and dbias = sum_t g_t: one loop per block reads g once for all three. In
    # block j, gj = gp[WP - 4 - j:] puts g_(t+s) of tap j + i at gj[t + 3 - i]. The block with no offset
    # (the last) writes dx and sums dbias; the others (W > 4 only) add to dx.
    db = 0.0
    for j in range(wp - TAPS, -1, -TAPS):
        w0, w1, w2, w3 = w_r[j], w_r[j + 1], w_r[j + 2], w_r[j + 3]
        gj = gp[wp - TAPS - j :]
        d0 = d1 = d2 = d3 = 0.0
        for c in range(nfull + 1):  # float32 within a chunk, float64 across chunks (SUM_CHUNK)
            lo = np.uintp(c * SUM_CHUNK)
            steps = np.uintp(SUM_CHUNK) if c < nfull else n - lo  # the last chunk: the remainder
            gc, xc, dxc = gj[lo:], x_r[lo:], dx_r[lo:]
            a0 = a1 = a2 = a3 = ab = zero
            if j == wp - TAPS:
                for t in range(steps):
                    g0, g1, g2, g3, xt = gc[t], gc[t + 1], gc[t + 2], gc[t + 3], xc[t]
                    dxc[t] = w0 * g3 + w1 * g2 + w2 * g1 + w3 * g0
                    ab += g0
                    a0 += xt * g3
                    a1 += xt * g2
                    a2 += xt * g1
                    a3 += xt * g0
                db += ab
            else:
                for t in range(steps):
                    g0, g1, g2, g3, xt = gc[t], gc[t + 1], gc[t + 2], gc[t + 3], xc[t]
                    dxc[t] += w0 * g3 + w1 * g2 + w2 * g1 + w3 * g0
                    a0 += xt * g3
                    a1 += xt * g2
                    a2 += xt * g1
                    a3 += xt * g0
            d0, d1, d2, d3 = d0 + a0, d1 + a1, d2 + a2, d3 + a3
        dweight_r[j], dweight_r[j + 1], dweight_r[j + 2], dweight_r[j + 3] = d0, d1, d2, d3
    return db


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


def padded_taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight (E, W) or (E, 1, W) -> (E, WP) in ``dtype``, left-padded with zeros to a multiple of TAPS: the
    kernels' weight layout."""
    ne, width = weight.shape[0], weight.shape[-1]
    wc = torch.zeros(ne, -(-width // TAPS) * TAPS, dtype=dtype)
    wc[:, wc.shape[1] - width :] = weight.detach().reshape(ne, width)
    return wc


def _prepare(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, E, L), weight (E, WP) left-padded with zeros (see TAPS), bias (E,): the compute dtype, contiguous.
    x goes through the weight's dtype first (the reference's ``x.to(weight.dtype)``), so that a float64 x with
    float32 weights rounds as it does there."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    ne = weight.shape[0]
    xc = x.detach().to(weight.dtype).to(compute).contiguous()
    wc = padded_taps(weight, compute)
    bc = torch.zeros(ne, dtype=compute) if bias is None else bias.detach().to(compute).contiguous()
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
        dweight = torch.empty(nb, ne, wc.shape[1], dtype=torch.float64)  # (B, E, WP)
        dbias = torch.empty(nb, ne, dtype=torch.float64)
        _backward_kernel(_np(xc), _np(wc), _np(bc), ctx.silu, _np(dout), _np(dx), _np(dweight), _np(dbias))
        return (
            dx.to(x.dtype),
            dweight.sum(0)[:, wc.shape[1] - weight.shape[-1] :].reshape(weight.shape).to(weight.dtype),
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
