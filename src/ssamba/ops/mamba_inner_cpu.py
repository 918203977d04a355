"""The Mamba mixer's whole fast path on CPU, ``in_proj`` to ``out_proj``, for one direction or Vim's two (v2):
numba kernels for everything between the projections, and a hand-written backward. Without autograd the call goes
to :func:`ssamba.ops.mamba_infer_cpu.mamba_infer_cpu`, whose forward kernels the training path shares.

What :class:`ssamba.nn.mamba.Mamba` (K = 1 direction) and :class:`ssamba.nn.mamba.InnerBiMamba` (K = 2) compute on
their fast path, as ``mamba_ssm``'s ``mamba_inner_fn`` does on a GPU:

    GEMM    x = in_proj_x(h), z = in_proj_z(h)                               (B*L, E) each
    conv    u_k = silu(conv_k(x)) for k = 0; for k = 1 on rev(x)
    GEMM    (dt, B, C)_k = x_proj_k(u_k)                                      (B*L, P) each
    scan    y_k = scan(u_k, softplus(dt_proj_k(dt_k) + bias_k), A_k, B_k, C_k) + D_k u_k  (dt_proj inside)
    gate    g = silu(z) * (y_0 [+ rev(y_1)]) [/ 2]
    GEMM    out = out_proj(g)

``rev`` reverses the valid part of each item and leaves its padding in place (``nn.layers.reverse_padded``). The
gate is applied once, after the directions are summed: silu(z) * y_0 + rev(silu(rev(z)) * y_1) equals
silu(z) * (y_0 + rev(y_1)) because rev is a permutation, so no reversed copy of z exists.

Layout: every activation is token-major, (B, L, E), as the projections produce and consume it, so each projection,
forward and backward, is one matrix product over all B*L tokens (through oneDNN: :mod:`ssamba.ops.gemm_cpu`).
Direction 1's u, x_proj output and their gradients are kept in its scan order (the valid part reversed), as its
conv writes u; the kernels map positions, so no reversed copy exists. The scan kernels' vector lanes hold channels
(see :mod:`ssamba.ops.mamba_infer_cpu`): one task is a (batch item, block of CHANNELS channels) with both
directions in it.

The backward, per call: the gate's (one pass: the gradients of z and of the direction sum, and the gate's output
again for out_proj's weight gradient); the scan's, chunk by chunk from the last: a chunk's states are recomputed
from the forward's checkpoint, then walked backwards, every state a vector recurrence over the block's channels,
and dB, dC summed over each block's channels per step (the caller sums the blocks); the x_proj and dt_proj
products; the conv's, in two passes (the gradient of its pre-activation with the weight gradients, then dx, which
gathers both directions' taps, so no two threads write one element).

Shape glossary
    B  batch      E  channels (d_inner)      L  sequence length      M  d_model      N  state size    R  dt_rank
    P  R + 2N (x_proj's outputs)      K  directions (1 or 2)      W  conv width (WP: padded to conv_cpu.TAPS)
    S  chunks of CHECKPOINT_STEPS steps per row, rounded up (S - 1 checkpoints)
    NBLK  channel blocks (E / CHANNELS, rounded up)

Numbers: the forward is the inference path's arithmetic, and the backward recomputes the states with the same
expressions; what differs from the faithful path is the order of float32 sums (the projections over all B*L
tokens, dt_proj's rank-R sum as a loop, the readout, dB and dC over channels, the sums over time in float32 within
a chunk and float64 across chunks), so the two agree to float32 rounding (tests/test_mamba_inner_cpu.py states the
tolerance; in float64 they agree to 1e-12).

Memory kept for the backward, per call: x, z, the direction sum of the scans' outputs (E each), u and the x_proj
outputs (K E and K P), and the scan's checkpoints (K N E / CHECKPOINT_STEPS per token); the gate's output is
recomputed by the gate's backward, delta and the states by the scan's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

from ssamba.ops.cpu_math import PARALLEL, SERIAL, SOFTPLUS_THRESHOLD, exp, sigmoid
from ssamba.ops.gemm_cpu import mm
from ssamba.ops.mamba_infer_cpu import (
    CHANNELS,
    CHECKPOINT_STEPS,
    CONV_TOKENS,
    DirectionWeights,
    conv_kernel,
    conv_preactivation,
    discretise,
    kernel_weights,
    load_direction,
    mamba_infer_cpu,
    scan_gate_train_kernel,
)

__all__ = ["DirectionWeights", "is_available", "mamba_inner_cpu"]


# ----------------------------------------------------------------------------------------------- kernels


@numba.njit(**PARALLEL)
def _gate_backward_kernel(dg, z, ysum, scale, dys, dz):
    """Through g = ysum silu(z) scale: dys = dg scale silu(z) (the gradient of every direction's y at that
    position), dz = dg scale ysum silu'(z); dg becomes g again (out_proj's weight gradient needs it), in place.

    All (B*L, E); one token per iteration.
    """
    one = z.dtype.type(1)
    for row in prange(z.shape[0]):
        dg_r, z_r, y_r, dys_r, dz_r = dg[row], z[row], ysum[row], dys[row], dz[row]  # (E,)
        for c in range(z_r.shape[0]):
            zt = z_r[c]
            s = sigmoid(zt)
            silu = zt * s
            gs = dg_r[c] * scale
            dys_r[c] = gs * silu
            dz_r[c] = gs * y_r[c] * s * (one + zt * (one - s))
            dg_r[c] = y_r[c] * silu * scale


@numba.njit(**PARALLEL)
def _scan_backward_kernel(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths, dys, ckpt,
                          du, ddelta, d_a, d_d, d_bias, d_bc):  # fmt: skip
    """Gradients of the scans of :func:`ssamba.ops.mamba_infer_cpu.scan_gate_train_kernel`; one (batch item, block of
    CHANNELS channels) per iteration, both directions in it.

    Inputs as that kernel, with dys: (B, L, E) the gradient of the direction sum and ckpt: (K, B, S - 1, N, E) its
    checkpoints. Writes, in each direction's scan order: du and ddelta (the gradient of dt_proj's output): tuples
    of K (B, L, E); d_bc: (K, NBLK, B, L, 2N), dB then dC summed over each block's channels; and d_a: (K, B, N, E),
    d_d, d_bias: (K, B, E), float64, to be summed over the batch by the caller.
    """
    nb, ne = dys.shape[0], dys.shape[2]
    nblocks = (ne + CHANNELS - 1) // CHANNELS
    for task in prange(nb * nblocks):
        b = task // nblocks
        blk = task % nblocks
        c0 = blk * CHANNELS
        if ne - c0 >= CHANNELS:  # a constant trip count for full blocks, as in the forward
            _scan_backward_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], dys, ckpt,
                                 du, ddelta, d_a, d_d, d_bias, d_bc, b, blk, CHANNELS)  # fmt: skip
        else:
            _scan_backward_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, lengths[b], dys, ckpt,
                                 du, ddelta, d_a, d_d, d_bias, d_bc, b, blk, ne - c0)  # fmt: skip


@numba.njit(**SERIAL, inline="always")
def _scan_backward_block(u, x_dbl, dt_weight, dt_bias, a, d_skip, n, dys, ckpt,
                         du, ddelta, d_a, d_d, d_bias, d_bc, b, blk, width):  # fmt: skip
    """:func:`_scan_backward_kernel` for batch item b's channel block blk (width channels, n steps valid).

    Per step, with dh the gradient of the states after it (zero after the last step):
        dh_s += dy C_s;  dC_s = sum_c h_s dy;  dB_s = sum_c dh_s dt u;  d(dt u) = sum_s dh_s B_s
        e_s = dh_s h_s' exp(dt A_s) (h_s' the states before the step);  dA_s += e_s dt;  ddt = sum_s e_s A_s
        dh_s = dh_s exp(dt A_s)   (the gradient of the states before the step)
    then du = d(dt u) dt + D dy, ddt += d(dt u) u, and through softplus into ddelta.
    """
    ndir = len(u)
    seqlen = dys.shape[1]
    rank, nstate = dt_weight.shape[1], a.shape[1]
    nchunks = (seqlen + CHECKPOINT_STEPS - 1) // CHECKPOINT_STEPS
    c0 = blk * CHANNELS
    dtype = dys.dtype
    one, zero = dtype.type(1), dtype.type(0)
    threshold = dtype.type(SOFTPLUS_THRESHOLD)
    # A chunk's steps recomputed: hist[j + 1] holds step j's states (rows [0, N)), exp(dt A) ([N, 2N)), pre, dt and
    # dt u (2N, 2N + 1, 2N + 2); hist[0]'s states are the checkpoint's (zero before step 0).
    dt_row, dtu_row, pre_row = 2 * nstate + 1, 2 * nstate + 2, 2 * nstate
    hist = np.empty((CHECKPOINT_STEPS + 1, 2 * nstate + 3, width), dtype)
    # One array for every row a step writes, so that LLVM can tell the rows apart from their constant offsets and
    # vectorise the state loop without runtime overlap checks: dh, the per-state terms of d(dt u) and ddt (summed
    # after the states' loop, as the forward's readout), a chunk's dA, then d(dt u), ddt, dD, d bias.
    dh, qtu, qdt, da_acc = 0, nstate, 2 * nstate, 3 * nstate
    ddtu_row, ddt_row, dd_row, dbias_row = 4 * nstate, 4 * nstate + 1, 4 * nstate + 2, 4 * nstate + 3
    work = np.empty((4 * nstate + 4, width), dtype)
    a_g = np.empty((nstate, width), dtype)
    w_g = np.empty((rank, width), dtype)
    for k in range(ndir):
        load_direction(a, dt_weight, k, c0, a_g, w_g, width)
        bias_g, skip_g = dt_bias[k, c0 : c0 + width], d_skip[k, c0 : c0 + width]
        u_k, x_k, du_k, dl_k = u[k], x_dbl[k], du[k], ddelta[k]
        d_a_k, d_d_k, d_bias_k = d_a[k, b], d_d[k, b], d_bias[k, b]  # (N, E), (E,), (E,)
        for s in range(nstate):
            for c in range(width):
                work[dh + s, c] = 0
                d_a_k[s, c0 + c] = 0
        for c in range(width):
            d_d_k[c0 + c] = 0
            d_bias_k[c0 + c] = 0
        for chunk in range(nchunks - 1, -1, -1):
            i0 = chunk * CHECKPOINT_STEPS
            steps = min(CHECKPOINT_STEPS, seqlen - i0)
            if chunk == 0:
                for s in range(nstate):
                    for c in range(width):
                        hist[0, s, c] = 0
            else:
                ck = ckpt[k, b, chunk - 1]  # (N, E)
                for s in range(nstate):
                    for c in range(width):
                        hist[0, s, c] = ck[s, c0 + c]
            for j in range(steps):  # the chunk's forward again, as scan_gate_train_kernel computes it
                i = i0 + j
                hp, hn = hist[j], hist[j + 1]
                discretise(x_k[b, i], w_g, bias_g, u_k[b, i, c0 : c0 + width], hn[pre_row], hn[dt_row], hn[dtu_row],
                           width)
                dt_r, dtu_r = hn[dt_row], hn[dtu_row]
                for s in range(nstate):
                    bs = x_k[b, i, rank + s]
                    hp_s, h_s, e_s, a_s = hp[s], hn[s], hn[nstate + s], a_g[s]
                    for c in range(width):
                        decay = exp(dt_r[c] * a_s[c])
                        e_s[c] = decay
                        h_s[c] = decay * hp_s[c] + dtu_r[c] * bs
            for row in range(da_acc, da_acc + nstate):
                for c in range(width):
                    work[row, c] = 0
            for row in (dd_row, dbias_row):
                for c in range(width):
                    work[row, c] = 0
            for j in range(steps - 1, -1, -1):
                i = i0 + j
                t = n - 1 - i if k == 1 and i < n else i  # the original position of step i
                dy, u_t, xd = dys[b, t, c0 : c0 + width], u_k[b, i, c0 : c0 + width], x_k[b, i]
                hp, hn = hist[j], hist[j + 1]
                dt_r, dtu_r, pre_r = hn[dt_row], hn[dtu_row], hn[pre_row]
                dbc = d_bc[k, blk, b, i]  # (2N,)
                for s in range(nstate):
                    bs, cs = xd[rank + s], xd[rank + nstate + s]
                    hp_s, h_s, e_s, a_s = hp[s], hn[s], hn[nstate + s], a_g[s]
                    sum_b = zero  # this block's share of dB_s and dC_s at step i
                    sum_c = zero
                    for c in range(width):
                        g = work[dh + s, c] + dy[c] * cs
                        sum_c += h_s[c] * dy[c]
                        sum_b += g * dtu_r[c]
                        work[qtu + s, c] = g * bs
                        ge = g * hp_s[c] * e_s[c]
                        work[qdt + s, c] = ge * a_s[c]
                        work[da_acc + s, c] += ge * dt_r[c]
                        work[dh + s, c] = g * e_s[c]
                    dbc[s] = sum_b
                    dbc[nstate + s] = sum_c
                for c in range(width):
                    work[ddtu_row, c] = work[qtu, c]
                    work[ddt_row, c] = work[qdt, c]
                for s in range(1, nstate):
                    for c in range(width):
                        work[ddtu_row, c] += work[qtu + s, c]
                        work[ddt_row, c] += work[qdt + s, c]
                du_t, dl_t = du_k[b, i, c0 : c0 + width], dl_k[b, i, c0 : c0 + width]
                for c in range(width):
                    ddtu = work[ddtu_row, c]
                    du_t[c] = ddtu * dt_r[c] + skip_g[c] * dy[c]
                    p = pre_r[c]
                    above = dtype.type(p > threshold)  # softplus is the identity above its threshold, as torch's
                    dp = (work[ddt_row, c] + ddtu * u_t[c]) * (above + (one - above) * sigmoid(p))
                    dl_t[c] = dp
                    work[dd_row, c] += dy[c] * u_t[c]
                    work[dbias_row, c] += dp
            # the chunk's sums over time, float32 within a chunk and float64 across (as conv_cpu's SUM_CHUNK)
            for s in range(nstate):
                for c in range(width):
                    d_a_k[s, c0 + c] += work[da_acc + s, c]
            for c in range(width):
                d_d_k[c0 + c] += work[dd_row, c]
                d_bias_k[c0 + c] += work[dbias_row, c]


@numba.njit(**PARALLEL)
def _conv_grad_kernel(x, weight, bias, lengths, gp, dweight, dbias):
    """Through u_k = silu(p_k): gp[k] = du_k silu'(p_k) in place (p recomputed from x), with the conv's weight and
    bias gradients; one (direction, batch item, block of CONV_TOKENS steps) per iteration.

    x: (B, L, E); weight: (K, WP, E); bias: (K, E); gp: a tuple of K (B, L, E), du on entry. Writes the task's
    partial sums dweight: (K, B * chunks, WP, E) and dbias: (K, B * chunks, E), float64, summed by the caller.
    """
    ndir = len(gp)
    nb, seqlen, ne = x.shape
    wp = weight.shape[1]
    nchunks = (seqlen + CONV_TOKENS - 1) // CONV_TOKENS
    one = x.dtype.type(1)
    for task in prange(ndir * nb * nchunks):
        k = task // (nb * nchunks)
        slot = task % (nb * nchunks)
        b = slot // nchunks
        i0 = (slot % nchunks) * CONV_TOKENS
        n = lengths[b]
        acc = np.empty(ne, x.dtype)  # (E,) one step's pre-activation
        dw = np.zeros((wp, ne), x.dtype)  # float32 within the task's CONV_TOKENS steps, float64 across tasks
        db = np.zeros(ne, x.dtype)
        for i in range(i0, min(i0 + CONV_TOKENS, seqlen)):
            conv_preactivation(x, weight, bias[k], k, b, i, n, acc)
            g_i = gp[k][b, i]  # (E,)
            for c in range(ne):
                p = acc[c]
                s = sigmoid(p)
                g = g_i[c] * s * (one + p * (one - s))  # silu'(p), as torch's silu_backward
                g_i[c] = g
                db[c] += g
            for j in range(wp):
                src = i - (wp - 1) + j
                if src < 0:
                    continue
                x_t = x[b, n - 1 - src if k == 1 and src < n else src]  # (E,)
                dw_j = dw[j]
                for c in range(ne):
                    dw_j[c] += g_i[c] * x_t[c]
        dweight[k, slot] = dw
        dbias[k, slot] = db


@numba.njit(**PARALLEL)
def _conv_input_grad_kernel(gp, weight, lengths, dx):
    """dx[b, t] = sum_k sum_j weight[k, j] gp[k][b, s_k(t) + (WP-1) - j] over the steps < L, s_k(t) being position
    t's step in direction k's order (rev is its own inverse): every step whose conv window reads x[b, t]. One
    (batch item, block of CONV_TOKENS positions) per iteration, so each thread writes its own positions.

    gp: a tuple of K (B, L, E) from :func:`_conv_grad_kernel`; weight: (K, WP, E); dx: (B, L, E), written.
    """
    ndir = len(gp)
    nb, seqlen, ne = dx.shape
    wp = weight.shape[1]
    nchunks = (seqlen + CONV_TOKENS - 1) // CONV_TOKENS
    for task in prange(nb * nchunks):
        b = task // nchunks
        t0 = (task % nchunks) * CONV_TOKENS
        n = lengths[b]
        for t in range(t0, min(t0 + CONV_TOKENS, seqlen)):
            dx_t = dx[b, t]  # (E,)
            for c in range(ne):
                dx_t[c] = 0
            for k in range(ndir):
                step = n - 1 - t if k == 1 and t < n else t
                for j in range(wp):
                    i = step + (wp - 1) - j
                    if i >= seqlen:
                        continue
                    w_j, g_i = weight[k, j], gp[k][b, i]  # (E,)
                    for c in range(ne):
                        dx_t[c] += w_j[c] * g_i[c]


# ------------------------------------------------------------------------------------------- torch glue


def is_available(x: Tensor) -> bool:
    """float32 or float64 CPU tensors (other dtypes take the unfused path, which computes in float32)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _lengths(lengths: Tensor | None, nb: int, seqlen: int, ndir: int) -> np.ndarray:
    """(B,) valid lengths for the kernels, checked here: the kernels index with them unchecked."""
    if lengths is None or ndir == 1:  # one direction is causal: right padding never reaches a valid position
        return np.full(nb, seqlen, np.int64)
    out = lengths.detach().to(torch.int64).cpu().numpy()
    if out.shape != (nb,) or out.min() < 0 or out.max() > seqlen:
        raise ValueError(f"lengths must be ({nb},) valid lengths in [0, {seqlen}], got {lengths.tolist()}")
    return out


class _MambaInnerFn(torch.autograd.Function):
    """in_proj -> conv, x_proj, scan, gate (every direction) -> out_proj, with the backward of
    :func:`mamba_inner_cpu`; the direction parameters come in stacked (K, ...), so autograd splits their gradients."""

    @staticmethod
    def forward(ctx, h, in_w, in_b, conv_w, conv_b, x_proj_w, dt_w, dt_b, A, D, out_w, out_b, lengths, scale):
        nb, seqlen, m = h.shape
        ndir, ne = D.shape
        dtype = h.dtype
        w = kernel_weights(tuple(DirectionWeights(conv_w[k], None if conv_b is None else conv_b[k], x_proj_w[k],
                                                  dt_w[k], dt_b[k], A[k], D[k]) for k in range(ndir)), dtype)
        lengths_np = _lengths(lengths, nb, seqlen, ndir)
        tokens = nb * seqlen
        h2 = h.reshape(tokens, m)
        in_w_c = in_w.to(dtype)
        x, z = mm(h2, in_w_c[:ne].t()), mm(h2, in_w_c[ne:].t())  # (B*L, E) each
        if in_b is not None:
            x += in_b[:ne]
            z += in_b[ne:]
        x, z = x.view(nb, seqlen, ne), z.view(nb, seqlen, ne)
        u = tuple(torch.empty_like(x) for _ in range(ndir))
        with torch.profiler.record_function("ssamba::causal_conv1d"):
            conv_kernel(_np(x), w.conv_w, w.conv_b, lengths_np, tuple(_np(t) for t in u))
        x_dbl = tuple(mm(u[k].view(tokens, ne), w.x_proj_w[k].t()).view(nb, seqlen, -1) for k in range(ndir))
        with torch.profiler.record_function("ssamba::selective_scan"):
            ysum, g = torch.empty_like(x), torch.empty_like(x)
            ckpt = x.new_empty(ndir, nb, max(seqlen - 1, 0) // CHECKPOINT_STEPS, w.a.shape[1], ne)
            scan_gate_train_kernel(tuple(_np(t) for t in u), tuple(_np(t) for t in x_dbl), w.dt_w, w.dt_b, w.a,
                                   w.d_skip, lengths_np, _np(x).dtype.type(scale), _np(z), _np(ysum), _np(g),
                                   _np(ckpt))  # fmt: skip
        out = mm(g.view(tokens, ne), out_w.to(dtype).t())  # (B*L, M)
        del g
        if out_b is not None:
            out += out_b
        ctx.save_for_backward(h, in_w, dt_w, out_w, x, z, ysum, ckpt, *u, *x_dbl)
        ctx.w, ctx.lengths_np, ctx.scale = w, lengths_np, scale
        ctx.has_bias = (in_b is not None, conv_b is not None, out_b is not None)
        ctx.conv_width = conv_w.shape[2]
        ctx.dtypes = [None if t is None else t.dtype for t in (h, in_w, in_b, conv_w, conv_b, x_proj_w, dt_w, dt_b, A,
                                                               D, out_w, out_b)]  # fmt: skip
        return out.view(nb, seqlen, m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        h, in_w, dt_w, out_w, x, z, ysum, ckpt, *acts = ctx.saved_tensors
        w = ctx.w
        nb, seqlen, ne = x.shape
        ndir = len(acts) // 2
        u, x_dbl = acts[:ndir], acts[ndir:]
        dtype = x.dtype
        tokens = nb * seqlen
        nstate = w.a.shape[1]
        rank = w.dt_w.shape[1]
        # Gradient buffers double up where a tensor is read for the last time before the one replacing it is
        # written: dg -> the gate's output g -> ddelta_0, dys -> dx, du -> the conv's pre-activation gradient.
        # Saved tensors stay untouched, so the backward can run again (retain_graph).
        d2 = dout.reshape(tokens, -1).to(dtype)  # (B*L, M)
        dg = mm(d2, out_w.to(dtype))  # (B*L, E)
        dys, dz = torch.empty_like(dg), torch.empty_like(dg)
        with torch.profiler.record_function("ssamba::gate"):
            _gate_backward_kernel(_np(dg), _np(z.view(tokens, ne)), _np(ysum.view(tokens, ne)),
                                  _np(dg).dtype.type(ctx.scale), _np(dys), _np(dz))  # fmt: skip
        d_out_w = mm(d2.t(), dg)  # (M, E): dg holds g now

        with torch.profiler.record_function("ssamba::selective_scan"):
            du = tuple(torch.empty_like(x) for _ in range(ndir))
            ddelta = (dg.view(nb, seqlen, ne), *(torch.empty_like(x) for _ in range(ndir - 1)))
            d_a = torch.empty(ndir, nb, nstate, ne, dtype=torch.float64)
            d_d = torch.empty(ndir, nb, ne, dtype=torch.float64)
            d_bias = torch.empty(ndir, nb, ne, dtype=torch.float64)
            d_bc = x.new_empty(ndir, -(-ne // CHANNELS), nb, seqlen, 2 * nstate)
            _scan_backward_kernel(
                tuple(_np(t) for t in u), tuple(_np(t) for t in x_dbl), w.dt_w, w.dt_b, w.a, w.d_skip,
                ctx.lengths_np, _np(dys).reshape(nb, seqlen, ne), _np(ckpt), tuple(_np(t) for t in du),
                tuple(_np(t) for t in ddelta), _np(d_a), _np(d_d), _np(d_bias), _np(d_bc),
            )  # fmt: skip
        d_x_proj_w, d_dt_w = [], []
        for k in range(ndir):
            ddelta_k, x_dbl_k = ddelta[k].view(tokens, ne), x_dbl[k].view(tokens, -1)
            dx_dbl = torch.cat([mm(ddelta_k, dt_w[k].to(dtype)), d_bc[k].sum(0).view(tokens, 2 * nstate)], 1)
            d_dt_w.append(mm(x_dbl_k[:, :rank].t(), ddelta_k).t())  # (E, R): see the weight gradients below
            d_x_proj_w.append(mm(dx_dbl.t(), u[k].view(tokens, ne)))  # (P, E)
            du[k].view(tokens, ne).add_(mm(dx_dbl, w.x_proj_w[k]))
        del ddelta, d_bc

        nchunks = -(-seqlen // CONV_TOKENS)
        wp = w.conv_w.shape[1]
        d_conv_w = torch.empty(ndir, nb * nchunks, wp, ne, dtype=torch.float64)
        d_conv_b = torch.empty(ndir, nb * nchunks, ne, dtype=torch.float64)
        dx = dys.view(nb, seqlen, ne)  # dys is read for the last time by the scan's backward
        with torch.profiler.record_function("ssamba::causal_conv1d"):
            gp = tuple(_np(t) for t in du)
            _conv_grad_kernel(_np(x), w.conv_w, w.conv_b, ctx.lengths_np, gp, _np(d_conv_w), _np(d_conv_b))
            _conv_input_grad_kernel(gp, w.conv_w, ctx.lengths_np, _np(dx))
        dx = dx.view(tokens, ne)
        in_w = in_w.to(dtype)
        dh = mm(dx, in_w[:ne]).add_(mm(dz, in_w[ne:])).view(h.shape)  # (B, L, M)
        # Weight gradients G^T X as (X^T G)^T: oneDNN copies a transposed left operand and reads a transposed right
        # one in place, so the transposed operand on the left is the narrow one (a (384, 784) copy took 0.5 ms).
        h2t = h.reshape(tokens, -1).to(dtype).t().contiguous()  # (M, B*L)
        d_in_w = torch.cat([mm(h2t, dx).t(), mm(h2t, dz).t()])  # (2E, M)
        grads = (
            dh,
            d_in_w,
            torch.cat([dx.sum(0), dz.sum(0)]) if ctx.has_bias[0] else None,
            d_conv_w.sum(1).transpose(1, 2)[:, :, wp - ctx.conv_width :],
            d_conv_b.sum(1) if ctx.has_bias[1] else None,
            torch.stack(d_x_proj_w),
            torch.stack(d_dt_w),
            d_bias.sum(1),
            d_a.sum(1).transpose(1, 2),
            d_d.sum(1),
            d_out_w,
            d2.sum(0) if ctx.has_bias[2] else None,
        )
        return (*(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None)


def mamba_inner_cpu(
    h: Tensor, in_proj: tuple[Tensor, Tensor | None], dirs: tuple[DirectionWeights, ...],
    out_proj: tuple[Tensor, Tensor | None], lengths: Tensor | None, scale: float,
) -> Tensor:  # fmt: skip
    """The mixer's fast path on CPU: h (B, L, M) -> out_proj(gate(scans)) (B, L, M).

    in_proj / out_proj: (weight, bias or None) as the Linear layers hold them; dirs: one or two directions'
    weights (the second scans the valid part of each item reversed); lengths (B,) valid lengths or None; scale:
    the factor of the direction sum (1/2 for Vim's ``if_devide_out``, else 1). Differentiable in h and every
    weight when autograd is recording; otherwise :func:`ssamba.ops.mamba_infer_cpu.mamba_infer_cpu` runs it, in
    three (B, L, E)-sized buffers. Under ``torch.autocast`` (inference only) in_proj and out_proj run in
    autocast's dtype.
    """
    nb, seqlen, m = h.shape
    ndir, ne = len(dirs), dirs[0].D.shape[0]
    in_w, in_b = in_proj
    out_w, out_b = out_proj
    weights = (in_w, in_b, out_w, out_b, *(t for d in dirs for t in d))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, *weights)):
        stack = torch.stack
        conv_b = None if dirs[0].conv_bias is None else stack([d.conv_bias for d in dirs])
        return _MambaInnerFn.apply(
            h, in_w, in_b, stack([d.conv_weight.reshape(ne, -1) for d in dirs]), conv_b,
            stack([d.x_proj_weight for d in dirs]), stack([d.dt_proj_weight for d in dirs]),
            stack([d.dt_proj_bias for d in dirs]), stack([d.A for d in dirs]), stack([d.D for d in dirs]),
            out_w, out_b, lengths, scale,
        )  # fmt: skip
    return mamba_infer_cpu(h, in_proj, dirs, out_proj, _lengths(lengths, nb, seqlen, ndir), scale)
