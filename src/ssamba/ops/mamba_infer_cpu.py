"""The Mamba mixer's forward kernels on CPU, token-major, and its inference: what
:func:`ssamba.ops.mamba_inner_cpu.mamba_inner_cpu` computes when autograd is not recording, with every (E, ...)
activation laid out (B, L, E), as the projections produce and consume it. The training path
(:mod:`ssamba.ops.mamba_inner_cpu`) runs the same two kernels and keeps what its backward needs.

Why token-major: a scan's vector lanes hold channels of one token, so each of the N states is its own vector
recurrence over a block of channels, the N of them independent (the CPU overlaps them), B and C are scalars
broadcast to the lanes, and the readout is a plain vector sum. (The channel-major layout that this replaced, one
row's 16 states across the lanes, made each step wait for the previous step of the same row and end in a horizontal
sum.) The projections stay single GEMMs over all B*L tokens, with no transposed copies. benchmarks/RESULTS.md
(sessions 11 and 12) has the times of both layouts.

    GEMM    x = in_proj_x(h)                                  (B*L, E)
    conv    u_k = silu(conv_k(x)), k = 1 in the reversed order of each item's valid positions
    GEMM    (dt, B, C)_k = x_proj_k(u_k)                      (B*L, P) each
    GEMM    z = in_proj_z(h)                                  (after the conv: x is gone by then)
    scan    y_k = scan(u_k, softplus(dt_proj_k(dt_k) + bias_k), A_k, B_k, C_k) + D_k u_k, with the gate
            silu(z) * (y_0 [+ rev(y_1)]) [/ 2] written over z
    GEMM    out = out_proj(z)

Live (B, L, E) buffers in inference: u (K of them) and z, three for K = 2 (x is freed before z is made).

Numbers: the readout sums the states in order, dt_proj's rank-R sum is a loop in the faithful product's order and
the conv sums its taps in order; the faithful path agrees to float32 rounding (tests/test_mamba_inner_cpu.py;
float64 agrees to 1e-12).

Shapes as in :mod:`ssamba.ops.mamba_inner_cpu`.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

from ssamba.ops.conv_cpu import padded_taps
from ssamba.ops.cpu_math import PARALLEL, SERIAL, exp, sigmoid
from ssamba.ops.cpu_math import softplus as softplus_of
from ssamba.ops.gemm_cpu import mm

__all__ = ["DirectionWeights", "mamba_infer_cpu"]

# Channels per task of the scan kernels: E = 384 (SSAMBA-tiny) makes 6 blocks per item, which two cores share evenly
# at batch 1 too; each state's update then runs over 4 vectors of 16 lanes.
CHANNELS = 64
# The training forward keeps the scan's states before every CHECKPOINT_STEPS-th step but the first, (N, E) per item
# and direction, half of u's size; its backward recomputes a chunk's states from them into a (2N + 3, CHANNELS) buffer
# per step, 256 KiB for a chunk of 32 steps at N = 16 (in a core's L2 cache on current server CPUs).
CHECKPOINT_STEPS = 32
# Tokens per task of the conv kernel: long enough that a task's setup is negligible, short enough that a batch of
# one short clip still splits across the cores.
CONV_TOKENS = 64


@numba.njit(**PARALLEL)
def conv_kernel(x, weight, bias, lengths, u):
    """u[k][b, i] = silu(conv_k(x)[b, i]) (see :func:`conv_preactivation`); one (direction, batch item, block of
    CONV_TOKENS steps) per iteration.

    x: (B, L, E); weight: (K, WP, E) left-padded taps, transposed; bias: (K, E); u: a tuple of K (B, L, E).
    """
    ndir = len(u)
    nb, seqlen, ne = x.shape
    nchunks = (seqlen + CONV_TOKENS - 1) // CONV_TOKENS
    for task in prange(ndir * nb * nchunks):
        k = task // (nb * nchunks)
        b = (task // nchunks) % nb
        i0 = (task % nchunks) * CONV_TOKENS
        acc = np.empty(ne, x.dtype)  # (E,) one step's pre-activation
        for i in range(i0, min(i0 + CONV_TOKENS, seqlen)):
            conv_preactivation(x, weight, bias[k], k, b, i, lengths[b], acc)
            u_i = u[k][b, i]  # (E,)
            for c in range(ne):
                u_i[c] = acc[c] * sigmoid(acc[c])


@numba.njit(**SERIAL, inline="always")
def conv_preactivation(x, weight, bias_k, k, b, i, n, acc):
    """acc = bias_k + sum_j weight[k, j] x[b, pos_k(i - (WP-1) + j)] over the taps with i - (WP-1) + j >= 0: the
    pre-activation of direction k's causal conv at its step i, where pos_0(s) = s and pos_1 reverses the item's
    first n positions (the rest stay in place). x: (B, L, E); weight: (K, WP, E); bias_k, acc: (E,)."""
    wp = weight.shape[1]
    for c in range(acc.shape[0]):
        acc[c] = bias_k[c]
    for j in range(wp):
        src = i - (wp - 1) + j
        if src < 0:
            continue
        t = n - 1 - src if k == 1 and src < n else src
        w_j, x_t = weight[k, j], x[b, t]  # (E,)
        for c in range(acc.shape[0]):
            acc[c] += w_j[c] * x_t[c]


@numba.njit(**PARALLEL)
def scan_gate_kernel(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths, scale, z):
    """z = silu(z) * (y_0 [+ rev(y_1)]) * scale with y_k = scan_k + D_k u_k, for inference; one (batch item, block
    of up to CHANNELS channels) per iteration, both directions in it: y_0 is written over u_0 (each step reads its
    own u before it writes), the gate over z by the last direction, so no further buffer or pass is needed.

    u: a tuple of K (B, L, E) (u[1] in reversed order, as the conv wrote it); x_dbl: a tuple of K (B, L, P);
    dt_weight: (K, R, E) dt_proj's weight transposed; dt_bias, d_skip: (K, E); a: (K, N, E) A transposed;
    lengths: (B,); z: (B, L, E), overwritten.
    """
    nb, ne = z.shape[0], z.shape[2]
    nblocks = (ne + CHANNELS - 1) // CHANNELS
    for task in prange(nb * nblocks):
        b = task // nblocks
        c0 = (task % nblocks) * CHANNELS
        # A full block's loops get a constant trip count, which LLVM vectorises without remainder loops (a partial
        # last block gets its own compiled copy).
        if ne - c0 >= CHANNELS:
            _scan_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], scale, z, b, c0, CHANNELS)
        else:
            _scan_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], scale, z, b, c0, ne - c0)


@numba.njit(**PARALLEL)
def scan_gate_train_kernel(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths, scale, z, ysum, g, ckpt):
    """:func:`scan_gate_kernel` for training: u and z are left alone, and what the backward needs is written.

    Inputs as there. Writes ysum = y_0 [+ rev(y_1)] and the gate's output g: (B, L, E), and ckpt:
    (K, B, S - 1, N, E), the states before step j CHECKPOINT_STEPS for j = 1 .. S - 1.
    """
    nb, ne = z.shape[0], z.shape[2]
    nblocks = (ne + CHANNELS - 1) // CHANNELS
    for task in prange(nb * nblocks):
        b = task // nblocks
        c0 = (task % nblocks) * CHANNELS
        if ne - c0 >= CHANNELS:
            _scan_train_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], scale, z, ysum, g, ckpt, b, c0,
                              CHANNELS)  # fmt: skip
        else:
            _scan_train_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], scale, z, ysum, g, ckpt, b, c0,
                              ne - c0)  # fmt: skip


@numba.njit(**SERIAL, inline="always")
def discretise(xd, w_g, bias_g, u_t, pre, dt, dtu, width):
    """One step's pre = dt_proj(x_dbl[:R]) + bias (summed in the order of the faithful path's rank-R product),
    dt = softplus(pre) and dtu = dt u, for a block of width channels. xd: (P,) the step's x_proj output; w_g:
    (R, width) dt_proj's weight for the block, transposed; bias_g, u_t, pre, dt, dtu: (width,)."""
    for c in range(width):
        pre[c] = 0
    for r in range(w_g.shape[0]):
        xr = xd[r]
        w_r = w_g[r]
        for c in range(width):
            pre[c] += xr * w_r[c]
    for c in range(width):
        p = pre[c] + bias_g[c]
        d = softplus_of(p)
        pre[c] = p
        dt[c] = d
        dtu[c] = d * u_t[c]


@numba.njit(**SERIAL, inline="always")
def load_direction(a, dt_weight, k, c0, a_g, w_g, width):
    """a_g = A_k and w_g = dt_proj_k's weight for channels c0 .. c0 + width - 1, (N, width) and (R, width)."""
    for s in range(a_g.shape[0]):
        for c in range(width):
            a_g[s, c] = a[k, s, c0 + c]
    for r in range(w_g.shape[0]):
        for c in range(width):
            w_g[r, c] = dt_weight[k, r, c0 + c]


@numba.njit(**SERIAL, inline="always")
def _scan_step(xd, w_g, bias_g, u_t, a_g, h, hc, pre, dt, dtu, y, width):
    """One step of a block's scan: h_s = exp(dt A_s) h_s + dt u B_s for every state s, and the readout
    y = sum_s C_s h_s (without the D skip). xd: (P,) the step's x_proj output (dt's rank inputs, B, C); h, a_g, hc:
    (N, width); pre, dt, dtu, y: (width,) scratch and output."""
    rank, nstate = w_g.shape[0], a_g.shape[0]
    discretise(xd, w_g, bias_g, u_t, pre, dt, dtu, width)
    for s in range(nstate):
        bs, cs = xd[rank + s], xd[rank + nstate + s]
        h_s, a_s, hc_s = h[s], a_g[s], hc[s]  # (width,)
        for c in range(width):
            hs = exp(dt[c] * a_s[c]) * h_s[c] + dtu[c] * bs
            h_s[c] = hs
            hc_s[c] = hs * cs
    # each state's share of the readout is summed after the states' loop: accumulating it inside that loop kept
    # the loop from vectorising
    for c in range(width):
        y[c] = hc[0, c]
    for s in range(1, nstate):
        hc_s = hc[s]
        for c in range(width):
            y[c] += hc_s[c]


@numba.njit(**SERIAL, inline="always")
def _block_scratch(nstate, rank, width, dtype):
    """A block's scan buffers: its states h, A and dt_proj's weight for the block (a_g, w_g), the states' shares of
    the readout (hc), and one step's pre-activation, dt, dt u and readout."""
    return (np.empty((nstate, width), dtype), np.empty((nstate, width), dtype), np.empty((rank, width), dtype),
            np.empty((nstate, width), dtype), np.empty(width, dtype), np.empty(width, dtype), np.empty(width, dtype),
            np.empty(width, dtype))  # fmt: skip


@numba.njit(**SERIAL, inline="always")
def _scan_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, n, scale, z, b, c0, width):
    """:func:`scan_gate_kernel` for batch item b's channels c0 .. c0 + width - 1 (n of its steps valid)."""
    ndir = len(u)
    seqlen = z.shape[1]
    nstate = a.shape[1]
    h, a_g, w_g, hc, pre, dt, dtu, y = _block_scratch(nstate, dt_weight.shape[1], width, z.dtype)
    for k in range(ndir):
        load_direction(a, dt_weight, k, c0, a_g, w_g, width)
        h[:] = 0
        bias_g, skip_g = dt_bias[k, c0 : c0 + width], d_skip[k, c0 : c0 + width]
        u_k, x_k = u[k], x_dbl[k]
        for i in range(seqlen):
            u_t = u_k[b, i, c0 : c0 + width]  # (width,)
            _scan_step(x_k[b, i], w_g, bias_g, u_t, a_g, h, hc, pre, dt, dtu, y, width)
            if k == 0 and ndir == 2:  # y_0 over u_0, this step's u being read already
                for c in range(width):
                    u_t[c] = y[c] + skip_g[c] * u_t[c]
            else:
                t = n - 1 - i if k == 1 and i < n else i  # the original position of step i
                z_t = z[b, t, c0 : c0 + width]
                y0 = u[0][b, t, c0 : c0 + width]  # y_0 when K = 2 (not read for K = 1)
                for c in range(width):
                    ys = y[c] + skip_g[c] * u_t[c]
                    if ndir == 2:
                        ys = y0[c] + ys
                    zt = z_t[c]
                    z_t[c] = ys * (zt * sigmoid(zt)) * scale


@numba.njit(**SERIAL, inline="always")
def _scan_train_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, n, scale, z, ysum, g, ckpt, b, c0, width):
    """:func:`scan_gate_train_kernel` for batch item b's channels c0 .. c0 + width - 1 (n of its steps valid)."""
    ndir = len(u)
    seqlen = z.shape[1]
    nstate = a.shape[1]
    h, a_g, w_g, hc, pre, dt, dtu, y = _block_scratch(nstate, dt_weight.shape[1], width, z.dtype)
    for k in range(ndir):
        load_direction(a, dt_weight, k, c0, a_g, w_g, width)
        h[:] = 0
        bias_g, skip_g = dt_bias[k, c0 : c0 + width], d_skip[k, c0 : c0 + width]
        u_k, x_k = u[k], x_dbl[k]
        for i0 in range(0, seqlen, CHECKPOINT_STEPS):
            if i0 > 0:  # the states before step i0 (before step 0 they are zero)
                ck = ckpt[k, b, i0 // CHECKPOINT_STEPS - 1]  # (N, E)
                for s in range(nstate):
                    for c in range(width):
                        ck[s, c0 + c] = h[s, c]
            for i in range(i0, min(i0 + CHECKPOINT_STEPS, seqlen)):
                u_t = u_k[b, i, c0 : c0 + width]  # (width,)
                _scan_step(x_k[b, i], w_g, bias_g, u_t, a_g, h, hc, pre, dt, dtu, y, width)
                t = n - 1 - i if k == 1 and i < n else i  # the original position of step i
                y_t = ysum[b, t, c0 : c0 + width]
                for c in range(width):
                    ys = y[c] + skip_g[c] * u_t[c]
                    if k == 1:
                        ys = y_t[c] + ys
                    y_t[c] = ys
                if k == ndir - 1:  # a loop of its own: with both stores in one, the loop stayed scalar
                    z_t, g_t = z[b, t, c0 : c0 + width], g[b, t, c0 : c0 + width]
                    for c in range(width):
                        zt = z_t[c]
                        g_t[c] = y_t[c] * (zt * sigmoid(zt)) * scale


class DirectionWeights(NamedTuple):
    """One direction's parameters, as the mixer holds them (A already -exp(A_log))."""

    conv_weight: Tensor  # (E, 1, W)
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (P, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A: Tensor  # (E, N), negative
    D: Tensor  # (E,)


class KernelWeights(NamedTuple):
    """The K directions' parameters in the kernels' dtype and token-major layouts (no graph)."""

    conv_w: np.ndarray  # (K, WP, E) left-padded taps, transposed
    conv_b: np.ndarray  # (K, E), zeros without a bias
    x_proj_w: tuple[Tensor, ...]  # K x (P, E), for the GEMMs
    dt_w: np.ndarray  # (K, R, E)
    dt_b: np.ndarray  # (K, E)
    a: np.ndarray  # (K, N, E)
    d_skip: np.ndarray  # (K, E)


def kernel_weights(dirs: tuple[DirectionWeights, ...], dtype: torch.dtype) -> KernelWeights:
    ne = dirs[0].D.shape[0]

    def stacked(ts: list[Tensor]) -> np.ndarray:
        return torch.stack([t.detach().to(dtype) for t in ts]).contiguous().numpy()

    return KernelWeights(
        conv_w=stacked([padded_taps(d.conv_weight, dtype).t() for d in dirs]),
        conv_b=stacked([d.conv_bias if d.conv_bias is not None else torch.zeros(ne) for d in dirs]),
        x_proj_w=tuple(d.x_proj_weight.detach().to(dtype) for d in dirs),
        dt_w=stacked([d.dt_proj_weight.t() for d in dirs]),
        dt_b=stacked([d.dt_proj_bias for d in dirs]),
        a=stacked([d.A.t() for d in dirs]),
        d_skip=stacked([d.D for d in dirs]),
    )


def mamba_infer_cpu(
    h: Tensor, in_proj: tuple[Tensor, Tensor | None], dirs: tuple[DirectionWeights, ...],
    out_proj: tuple[Tensor, Tensor | None], lengths_np: np.ndarray, scale: float,
) -> Tensor:  # fmt: skip
    """h (B, L, M) -> out_proj(gate(scans)) (B, L, M), without autograd; arguments as
    :func:`ssamba.ops.mamba_inner_cpu.mamba_inner_cpu`, lengths_np (B,) checked. Under ``torch.autocast`` in_proj
    and out_proj run in autocast's dtype."""
    nb, seqlen, m = h.shape
    ndir, ne = len(dirs), dirs[0].D.shape[0]
    dtype = h.dtype
    in_w, in_b = in_proj
    out_w, out_b = out_proj
    w = kernel_weights(dirs, dtype)
    h2 = h.reshape(nb * seqlen, m)

    def in_half(i: int) -> Tensor:  # x (i = 0) or z (i = 1): (B, L, E) in the kernels' dtype
        half = mm(h2, in_w[i * ne : (i + 1) * ne].t()).to(dtype)
        if in_b is not None:
            half += in_b[i * ne : (i + 1) * ne]
        return half.view(nb, seqlen, ne)

    x = in_half(0)
    u = tuple(torch.empty_like(x) for _ in range(ndir))
    with torch.profiler.record_function("ssamba::causal_conv1d"):
        conv_kernel(x.numpy(), w.conv_w, w.conv_b, lengths_np, tuple(t.numpy() for t in u))
    del x
    with torch.autocast(h.device.type, enabled=False):  # the small x_proj products stay in the kernels' dtype
        x_dbl = tuple(mm(u[k].view(nb * seqlen, ne), w.x_proj_w[k].t()).view(nb, seqlen, -1) for k in range(ndir))
    z = in_half(1)
    with torch.profiler.record_function("ssamba::selective_scan"):
        z_np = z.numpy()
        scan_gate_kernel(tuple(t.numpy() for t in u), tuple(t.numpy() for t in x_dbl), w.dt_w, w.dt_b, w.a, w.d_skip,
                         lengths_np, z_np.dtype.type(scale), z_np)  # fmt: skip
    del u, x_dbl, w
    out = mm(z.view(nb * seqlen, ne), out_w.t())  # (B*L, M), in autocast's dtype under autocast
    if out_b is not None:
        out = out + out_b
    return out.view(nb, seqlen, m)
