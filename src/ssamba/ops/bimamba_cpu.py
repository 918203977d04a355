"""Fused CPU inference of the bidirectional (Vim v2) Mamba mixer's inner chain: numba kernels over both directions.

What :class:`ssamba.nn.mamba.InnerBiMamba` computes between ``in_proj`` and ``out_proj`` on its fast path, for
inference (no autograd), in three parallel passes and the two x_proj GEMMs instead of about twenty tensor ops:

    conv    u_f = silu(conv_f(x)) written over x; u_b = silu(conv_b(rev(x))) into a buffer of its own
    GEMM    (dt, B, C)_dir = x_proj_dir(u_dir)                                          (BLAS, both directions)
    scan    y_dir = scan(u_dir, softplus(dt_proj_dir(dt) + bias_dir), A_dir, B_dir, C_dir) + D_dir u_dir,
            written over u_dir; dt_proj's rank-R product is taken inside the kernel, row by row
    gate    z <- silu(z) * (y_f + rev(y_b)) [/ 2]

``rev`` reverses the valid part of each item and leaves its padding in place (``nn.layers.reverse_padded``). The
gate is applied once, after the directions are summed: silu(z) * y_f + rev(silu(rev(z)) * y_b) equals
silu(z) * (y_f + rev(y_b)) because rev is a permutation, so the backward direction needs no reversed copy of z.

Shape glossary
    B  batch      E  channels (d_inner)      L  sequence length      N  state size      R  dt_rank
    W  conv width (WP: padded to a multiple of conv_cpu.TAPS)      NB, LANES  state blocks as in scan_cpu

Numbers: the conv and the scan recurrence are :mod:`ssamba.ops.conv_cpu`'s and :mod:`ssamba.ops.scan_cpu`'s own
row code (``preactivation``; ``scan_row_pair``, which also runs the training forward); what differs from
the unfused fast path is the summation order of dt_proj's R products (BLAS's against a plain loop) and where the
gate's product is rounded, so the two agree to float32 rounding (tests/test_bimamba_cpu.py states the tolerance).

Memory: (B, E, L) tensors alive at once are x (then u_f, then y_f), z (then the output) and u_b (then y_b): three,
against five in the unfused path, which also materialises delta and the reversed copies of x and z.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

from ssamba.ops.conv_cpu import padded_taps, preactivation
from ssamba.ops.cpu_math import PARALLEL, SERIAL, sigmoid
from ssamba.ops.cpu_math import softplus as softplus_of
from ssamba.ops.scan_cpu import LANES, a_blocks, scan_row_pair, state_blocks

__all__ = ["DirectionWeights", "bimamba_inner_cpu", "is_available"]


class DirectionWeights(NamedTuple):
    """One direction's parameters, as the mixer holds them."""

    conv_weight: Tensor  # (E, 1, W)
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (R + 2N, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A: Tensor  # (E, N), negative
    D: Tensor  # (E,)


# ----------------------------------------------------------------------------------------------- kernels


@numba.njit(**PARALLEL)
def _conv_kernel(x, weight, bias, lengths, u_b):
    """u_b = silu(conv_b(rev(x))); x = silu(conv_f(x)), in place. One (batch, channel) row per iteration.

    x, u_b: (B, E, L); weight: (2, E, WP) and bias: (2, E), direction 0 forward, 1 backward; lengths: (B,).
    Reversed positions are unsigned (as in _gate_kernel): with signed ones numba checks each index for
    wrap-around and the loop stays scalar (the gate took 3.4x as long).
    """
    nb, ne, seqlen = x.shape
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        n = np.uintp(lengths[b])
        last = n - np.uintp(1)
        x_r, ub_r = x[b, e], u_b[b, e]  # (L,)
        x_rev = np.empty(seqlen, x.dtype)  # (L,) the row with its valid part reversed
        p = np.empty(seqlen, x.dtype)  # (L,) pre-activation
        for t in range(n):
            x_rev[t] = x_r[last - t]
        for t in range(n, np.uintp(seqlen)):
            x_rev[t] = x_r[t]
        preactivation(x_rev, weight[1, e], bias[1, e], p)
        for t in range(seqlen):
            ub_r[t] = p[t] * sigmoid(p[t])
        preactivation(x_r, weight[0, e], bias[0, e], p)
        for t in range(seqlen):
            x_r[t] = p[t] * sigmoid(p[t])


@numba.njit(**SERIAL, inline="always")
def _delta_row(x_dbl_b, w_e, bias_e, dt):
    """dt[t] = softplus(sum_r w_e[r] x_dbl_b[r, t] + bias_e): dt_proj's rank-R product for one channel, then the
    scan's delta_bias and softplus. x_dbl_b: (R + 2N, L), of which the first R rows are read; w_e: (R,)."""
    seqlen = dt.shape[0]
    for t in range(seqlen):
        dt[t] = 0
    for r in range(w_e.shape[0]):
        w = w_e[r]
        src = x_dbl_b[r]  # (L,)
        for t in range(seqlen):
            dt[t] += w * src[t]
    for t in range(seqlen):
        dt[t] = softplus_of(dt[t] + bias_e)


@numba.njit(**SERIAL, inline="always")
def _skip_row(u_r, y, skip):
    """u_r[t] = y[t] + skip u_r[t]: the D skip, written over the scan's input."""
    for t in range(u_r.shape[0]):
        u_r[t] = y[t] + skip * u_r[t]


@numba.njit(**PARALLEL)
def _scan_kernel(u, x_dbl, dt_weight, dt_bias, a_blk, b_blk, c_blk, d_skip):
    """y = scan(u, softplus(dt_weight @ x_dbl[:R] + dt_bias), ...) + D u, written over u; one pair of channels of
    one (direction, batch item) per iteration (see scan_cpu.scan_row_pair), both directions in one parallel region.

    u: (2, B, E, L); x_dbl: (2, B, R + 2N, L); dt_weight: (2, E, R); dt_bias, d_skip: (2, E);
    a_blk: (2, E, NB, LANES); b_blk, c_blk: (2, B, NB, L, LANES).
    """
    _, nb, ne, seqlen = u.shape
    nblocks = a_blk.shape[2]
    npairs = (ne + 1) // 2
    for item in prange(2 * nb * npairs):
        k = item // (nb * npairs)
        b = (item // npairs) % nb
        e0 = 2 * (item % npairs)
        e1 = min(e0 + 1, ne - 1)  # an odd E ends with its last channel twice, written once
        dt0 = np.empty(seqlen, u.dtype)  # (L,) delta, then the discretisation step, of each channel
        dt1 = np.empty(seqlen, u.dtype)
        y0 = np.empty(seqlen, u.dtype)  # (L,) the scan's readouts
        y1 = np.empty(seqlen, u.dtype)
        last = np.empty((nblocks, LANES), u.dtype)  # the states after the row: not kept (inference)
        no_ckpt = np.empty((nblocks, 1, LANES), u.dtype)  # checkpoints: not written (save=False)
        _delta_row(x_dbl[k, b], dt_weight[k, e0], dt_bias[k, e0], dt0)
        _delta_row(x_dbl[k, b], dt_weight[k, e1], dt_bias[k, e1], dt1)
        u0, u1 = u[k, b, e0], u[k, b, e1]  # (L,)
        scan_row_pair(dt0, dt1, u0, u1, a_blk[k, e0], a_blk[k, e1], b_blk[k, b], c_blk[k, b], y0, y1, last, last,
                      False, no_ckpt, no_ckpt)  # fmt: skip
        _skip_row(u0, y0, d_skip[k, e0])
        if e1 != e0:
            _skip_row(u1, y1, d_skip[k, e1])


@numba.njit(**PARALLEL)
def _gate_kernel(y, z, lengths, scale):
    """z = silu(z) * (y_f + rev(y_b)) * scale, in place; one (batch, channel) row per iteration.

    y: (2, B, E, L), the two directions' outputs; z: (B, E, L); lengths: (B,).
    """
    _, nb, ne, seqlen = y.shape
    for row in prange(nb * ne):
        b = row // ne
        e = row % ne
        n = np.uintp(lengths[b])
        last = n - np.uintp(1)
        yf, yb, z_r = y[0, b, e], y[1, b, e], z[b, e]  # (L,)
        for t in range(n):
            zt = z_r[t]
            z_r[t] = (yf[t] + yb[last - t]) * (zt * sigmoid(zt)) * scale
        for t in range(n, np.uintp(seqlen)):
            zt = z_r[t]
            z_r[t] = (yf[t] + yb[t]) * (zt * sigmoid(zt)) * scale


# ------------------------------------------------------------------------------------------- torch glue


def is_available(x: Tensor) -> bool:
    """float32 or float64 CPU tensors (other dtypes take the unfused path, which computes in float32)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _stacked(dtype: torch.dtype, *pair: Tensor) -> Tensor:
    return torch.stack([t.detach().to(dtype) for t in pair]).contiguous()


def bimamba_inner_cpu(
    xu: Tensor, z: Tensor, lengths: Tensor | None, fwd: DirectionWeights, bwd: DirectionWeights, divide_out: bool
) -> Tensor:
    """The mixer's chain between in_proj and out_proj, for inference; overwrites its inputs.

    xu: (2, B, E, L) contiguous, with x = in_proj's first half in xu[0] (xu[1] is scratch); z: (B, E, L)
    contiguous; lengths: (B,) valid lengths or None. Both tensors are reused as buffers: z comes back holding the
    result (B, E, L), the input to out_proj.
    """
    _, nb, ne, seqlen = xu.shape
    dtype = xu.dtype
    nstate = fwd.A.shape[1]
    rank = fwd.dt_proj_weight.shape[1]
    nblocks = -(-nstate // LANES)
    lengths_np = (np.full(nb, seqlen, np.int64) if lengths is None
                  else lengths.detach().to(torch.int64).cpu().numpy())  # fmt: skip

    conv_w = torch.stack([padded_taps(w.conv_weight, dtype) for w in (fwd, bwd)])  # (2, E, WP)
    conv_b = torch.zeros(2, ne, dtype=dtype)
    for k, w in enumerate((fwd, bwd)):
        if w.conv_bias is not None:
            conv_b[k] = w.conv_bias.detach()
    # Named ranges, as the unfused ops have, so that ``ssamba bench models --profile`` sorts the kernels' time.
    with torch.profiler.record_function("ssamba::causal_conv1d"):
        _conv_kernel(_np(xu[0]), _np(conv_w), _np(conv_b), lengths_np, _np(xu[1]))

    x_dbl = torch.empty(2, nb, rank + 2 * nstate, seqlen, dtype=dtype)  # (2, B, R + 2N, L)
    with torch.autocast(xu.device.type, enabled=False):  # the small x_proj products stay in the kernels' dtype
        for k, w in enumerate((fwd, bwd)):
            torch.bmm(w.x_proj_weight.detach().to(dtype).unsqueeze(0).expand(nb, -1, -1), xu[k], out=x_dbl[k])
    with torch.profiler.record_function("ssamba::selective_scan"):
        bc = x_dbl[:, :, rank:].reshape(2 * nb, 2 * nstate, seqlen)
        b_blk = state_blocks(bc[:, :nstate], dtype, nblocks).view(2, nb, nblocks, seqlen, LANES)
        c_blk = state_blocks(bc[:, nstate:], dtype, nblocks).view(2, nb, nblocks, seqlen, LANES)
        a_blk = torch.stack([a_blocks(w.A, dtype, nblocks) for w in (fwd, bwd)])  # (2, E, NB, LANES)
        _scan_kernel(
            _np(xu), _np(x_dbl), _np(_stacked(dtype, fwd.dt_proj_weight, bwd.dt_proj_weight)),
            _np(_stacked(dtype, fwd.dt_proj_bias, bwd.dt_proj_bias)), _np(a_blk),
            _np(b_blk), _np(c_blk), _np(_stacked(dtype, fwd.D, bwd.D)),
        )  # fmt: skip
    scale = _np(xu).dtype.type(0.5 if divide_out else 1.0)  # in the compute dtype, so the loop stays in it
    with torch.profiler.record_function("ssamba::gate"):
        _gate_kernel(_np(xu), _np(z), lengths_np, scale)
    return z
