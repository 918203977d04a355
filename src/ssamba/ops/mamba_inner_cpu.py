"""The Mamba mixer's whole fast path on CPU, ``in_proj`` to ``out_proj``, for one direction or Vim's two (v2):
numba kernels for everything between the projections, and a hand-written backward. Without autograd the call goes
to :mod:`ssamba.ops.mamba_infer_cpu`, the same computation in a token-major layout that needs no backward.

What :class:`ssamba.nn.mamba.Mamba` (K = 1 direction) and :class:`ssamba.nn.mamba.InnerBiMamba` (K = 2) compute on
their fast path, as ``mamba_ssm``'s ``mamba_inner_fn`` does on a GPU:

    GEMM    [x | z] = in_proj(h)                                              (one product over all B*L tokens)
    conv    u_k = silu(conv_k(x)) for k = 0; for k = 1 on rev(x)
    GEMM    (dt, B, C)_k = x_proj_k(u_k)
    scan    y_k = scan(u_k, softplus(dt_proj_k(dt_k) + bias_k), A_k, B_k, C_k) + D_k u_k  (dt_proj inside, row by row)
    gate    g = silu(z) * (y_0 [+ rev(y_1)]) [/ 2]
    GEMM    out = out_proj(g)

``rev`` reverses the valid part of each item and leaves its padding in place (``nn.layers.reverse_padded``). The
gate is applied once, after the directions are summed: silu(z) * y_0 + rev(silu(rev(z)) * y_1) equals
silu(z) * (y_0 + rev(y_1)) because rev is a permutation, so no reversed copy of z exists.

Layout: every (E, ...) tensor is channel-major over the whole batch, (E, B, L), so that each projection, forward and
backward, is one matrix product over all B*L tokens with no transposing copy (through oneDNN: see
:mod:`ssamba.ops.gemm_cpu`): in_proj's output (2E, B*L) is x and z as they come out of the GEMM, and out_proj reads
g (E, B*L) as a transposed operand (``torch.bmm``'s per-item products, which the unfused path needs for its
(B, E, L) layout, are small GEMMs of depth L for short clips). The kernels read rows (k, e, b) of length L,
contiguous: the scan's checkpointed backward walks them row by row.

Parallel regions per mixer call: three in the forward (conv, scan, gate), three in the backward (gate, scan, conv),
each over all directions, channels and batch items, where the unfused fast path runs a parallel region or a tensor
op for each step of each direction (the reversals, the conv, softplus, the scan, the gate, the direction sum).

Shape glossary
    B  batch      E  channels (d_inner)      L  sequence length      M  d_model      N  state size    R  dt_rank
    P  R + 2N (x_proj's outputs)      K  directions (1 or 2)      W  conv width (WP: padded to conv_cpu.TAPS)
    NB, LANES, S  state blocks and checkpoints as in scan_cpu       Q  dB/dC slots of the backward's partitions

Numbers: the conv, the scan recurrence and their backward passes are :mod:`ssamba.ops.conv_cpu`'s and
:mod:`ssamba.ops.scan_cpu`'s own row code; what differs from the unfused fast path is the summation order of
dt_proj's rank-R products (a plain loop against BLAS), of the projections (one product over B*L tokens against one
per item) and where the gate's product is rounded, so the two agree to float32 rounding (tests/test_mamba_inner_cpu.py
states the tolerance; in float64 they agree to 1e-12).

Memory kept for the backward, per call: in_proj's output (2E), u and y (K E each) and the x_proj outputs, in
(B*L)-sized rows, plus the scan's checkpoints; the gate's output is recomputed by the gate's backward, delta by the
scan's. The unfused path also keeps delta, the reversed copies of x and z, the conv inputs and each direction's
pre-gate output (benchmarks/RESULTS.md, session 9, has both training peaks).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

from ssamba.ops.conv_cpu import backward_row as conv_backward_row
from ssamba.ops.conv_cpu import padded_taps, preactivation
from ssamba.ops.cpu_math import PARALLEL, SERIAL, SOFTPLUS_THRESHOLD, sigmoid
from ssamba.ops.cpu_math import softplus as softplus_of
from ssamba.ops.gemm_cpu import mm
from ssamba.ops.mamba_infer_cpu import mamba_infer_cpu
from ssamba.ops.scan_cpu import CHECKPOINT_EVERY, LANES, WORK_ROWS, a_blocks, backward_chunk, partitions, scan_row_pair

__all__ = ["DirectionWeights", "is_available", "mamba_inner_cpu"]


class DirectionWeights(NamedTuple):
    """One direction's parameters, as the mixer holds them (A already -exp(A_log))."""

    conv_weight: Tensor  # (E, 1, W)
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (P, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A: Tensor  # (E, N), negative
    D: Tensor  # (E,)


# ----------------------------------------------------------------------------------------------- kernels


@numba.njit(**SERIAL, inline="always")
def _reverse_valid(src, n, dst):
    """dst = src with its first n elements reversed (the rest in place). Unsigned positions: with signed ones numba
    checks each index for wrap-around and the loop stays scalar (a gate loop took 3.4x as long)."""
    last = n - np.uintp(1)
    for t in range(n):
        dst[t] = src[last - t]
    for t in range(n, np.uintp(src.shape[0])):
        dst[t] = src[t]


@numba.njit(**PARALLEL)
def _conv_kernel(x, weight, bias, lengths, u):
    """u[k] = silu(conv_k(x)), on rev(x) for k = 1; one (channel, batch item) row per iteration.

    x: (E, B, L); u: (K, E, B, L), written; weight: (K, E, WP); bias: (K, E); lengths: (B,).
    """
    ndir, ne, nb, seqlen = u.shape
    for row in prange(ne * nb):
        e = row // nb
        b = row % nb
        x_r = x[e, b]  # (L,)
        p = np.empty(seqlen, x.dtype)  # (L,) pre-activation
        if ndir == 2:
            x_rev = np.empty(seqlen, x.dtype)  # (L,) the row with its valid part reversed
            _reverse_valid(x_r, np.uintp(lengths[b]), x_rev)
            preactivation(x_rev, weight[1, e], bias[1, e], p)
            u_r = u[1, e, b]
            for t in range(seqlen):
                u_r[t] = p[t] * sigmoid(p[t])
        preactivation(x_r, weight[0, e], bias[0, e], p)
        u_r = u[0, e, b]
        for t in range(seqlen):
            u_r[t] = p[t] * sigmoid(p[t])


@numba.njit(**SERIAL, inline="always")
def _delta_row(x_dbl, k, b, w_e, bias_e, pre, dt):
    """pre[t] = sum_r w_e[r] x_dbl[k, r, b, t] + bias_e (dt_proj's rank-R product for one channel and the scan's
    delta_bias) and dt[t] = softplus(pre[t]). x_dbl: (K, P, B, L), of which rows r < R are read; w_e: (R,).
    Each row is taken as x_dbl[k, r, b], which numba types as contiguous; a row of the view x_dbl[k, :, b] is
    typed as strided, its loops stay scalar, and the two calls per channel pair took about as long as the scan
    itself (one core of the 2-core AMD EPYC, B = 16, L = 49)."""
    seqlen = dt.shape[0]
    for t in range(seqlen):
        pre[t] = 0
    for r in range(w_e.shape[0]):
        w = w_e[r]
        src = x_dbl[k, r, b]  # (L,)
        for t in range(seqlen):
            pre[t] += w * src[t]
    for t in range(seqlen):
        pre[t] += bias_e
    for t in range(seqlen):
        dt[t] = softplus_of(pre[t])


@numba.njit(**PARALLEL)
def _scan_kernel(u, x_dbl, dt_weight, dt_bias, a_blk, b_blk, c_blk, d_skip, y, ckpt):
    """y = scan(u, softplus(dt_weight @ x_dbl[:R] + dt_bias), ...) + D u; a pair of channels of one (direction,
    batch item) per iteration (see scan_cpu.scan_row_pair), every direction in one parallel region.

    u: (K, E, B, L); x_dbl: (K, P, B, L); dt_weight: (K, E, R); dt_bias, d_skip: (K, E); a_blk: (K, E, NB, LANES);
    b_blk, c_blk: (K, B, NB, L, LANES). Writes y: (K, E, B, L) and the checkpoints ckpt: (K, E, B, NB, S, LANES).
    """
    ndir, ne, nb, seqlen = u.shape
    nblocks = a_blk.shape[2]
    npairs = (ne + 1) // 2
    for item in prange(ndir * npairs * nb):
        k = item // (npairs * nb)
        e0 = 2 * ((item // nb) % npairs)
        b = item % nb
        e1 = min(e0 + 1, ne - 1)  # an odd E ends with its last channel twice, written once
        pre = np.empty(seqlen, u.dtype)  # (L,) scratch
        dt0 = np.empty(seqlen, u.dtype)  # (L,) the discretisation step of each channel
        dt1 = np.empty(seqlen, u.dtype)
        y0 = np.empty(seqlen, u.dtype)  # (L,) the scan's readouts
        y1 = np.empty(seqlen, u.dtype)
        last = np.empty((nblocks, LANES), u.dtype)  # the states after the row: not needed
        _delta_row(x_dbl, k, b, dt_weight[k, e0], dt_bias[k, e0], pre, dt0)
        _delta_row(x_dbl, k, b, dt_weight[k, e1], dt_bias[k, e1], pre, dt1)
        u0, u1 = u[k, e0, b], u[k, e1, b]  # (L,)
        scan_row_pair(dt0, dt1, u0, u1, a_blk[k, e0], a_blk[k, e1], b_blk[k, b], c_blk[k, b], y0, y1, last, last,
                      True, ckpt[k, e0, b], ckpt[k, e1, b])  # fmt: skip
        _skip_row(y[k, e0, b], y0, u0, d_skip[k, e0])
        if e1 != e0:
            _skip_row(y[k, e1, b], y1, u1, d_skip[k, e1])


@numba.njit(**SERIAL, inline="always")
def _skip_row(y_r, readout, u_r, skip):
    """y_r[t] = readout[t] + skip u_r[t] (the D skip)."""
    for t in range(u_r.shape[0]):
        y_r[t] = readout[t] + skip * u_r[t]


@numba.njit(**PARALLEL)
def _gate_kernel(y, z, lengths, scale, out):
    """out = silu(z) * (y_0 [+ rev(y_1)]) * scale; one (channel, batch item) row per iteration.

    y: (K, E, B, L); z, out: (E, B, L); lengths: (B,).
    """
    ndir, ne, nb, seqlen = y.shape
    for row in prange(ne * nb):
        e = row // nb
        b = row % nb
        ysum = np.empty(seqlen, z.dtype)  # (L,) y_0 [+ rev(y_1)]
        _direction_sum(y, e, b, np.uintp(lengths[b]), ysum)
        z_r, o_r = z[e, b], out[e, b]  # (L,)
        for t in range(seqlen):
            zt = z_r[t]
            o_r[t] = ysum[t] * (zt * sigmoid(zt)) * scale


@numba.njit(**SERIAL, inline="always")
def _direction_sum(y, e, b, n, ysum):
    """ysum = y[0, e, b] [+ rev(y[1, e, b])] with n valid steps."""
    y0 = y[0, e, b]  # (L,)
    if y.shape[0] == 1:
        for t in range(ysum.shape[0]):
            ysum[t] = y0[t]
    else:
        _reverse_valid(y[1, e, b], n, ysum)
        for t in range(ysum.shape[0]):
            ysum[t] += y0[t]


@numba.njit(**PARALLEL)
def _gate_backward_kernel(dg, z, y, lengths, scale, dz, dy):
    """Through the gate: dz = dg scale (y_0 [+ rev(y_1)]) silu'(z), dy_0 = dg scale silu(z) [and dy_1, its
    reversal]; dg becomes the gate's output again (out_proj's weight gradient needs it), in place.

    dg, z, dz: (E, B, L); y, dy: (K, E, B, L); lengths: (B,).
    """
    ndir, ne, nb, seqlen = y.shape
    one = z.dtype.type(1)
    for row in prange(ne * nb):
        e = row // nb
        b = row % nb
        n = np.uintp(lengths[b])
        ysum = np.empty(seqlen, z.dtype)  # (L,) y_0 [+ rev(y_1)]
        _direction_sum(y, e, b, n, ysum)
        dg_r, z_r, dz_r, dy0 = dg[e, b], z[e, b], dz[e, b], dy[0, e, b]  # (L,)
        for t in range(seqlen):
            zt = z_r[t]
            s = sigmoid(zt)
            silu = zt * s
            g = dg_r[t] * scale
            dy0[t] = g * silu
            dz_r[t] = g * ysum[t] * s * (one + zt * (one - s))
            dg_r[t] = ysum[t] * silu * scale
        if ndir == 2:
            _reverse_valid(dy0, n, dy[1, e, b])


@numba.njit(**PARALLEL)
def _scan_backward_kernel(
    u, x_dbl, dt_weight, dt_bias, a_blk, b_blk, c_blk, d_skip, ckpt, dy, row_start, slot_start,
    du, ddelta, d_a, d_d, d_bias, d_b, d_c,
):  # fmt: skip
    """Gradients of :func:`_scan_kernel`, one thread per partition of the K*B*E rows, ordered
    (direction, batch item, channel) so that neighbouring rows share B and C and go through scan_cpu.backward_chunk
    in pairs, as scan_cpu's own backward does.

    Inputs as :func:`_scan_kernel`; dy: (K, E, B, L) the gradient of y; row_start (P+1,) and slot_start (P,) as
    scan_cpu.partitions for K*B "batch items" of E rows. Writes du, ddelta (the gradient of dt_proj's output,
    before the bias): (K, E, B, L); d_a: (K, E, B, NB, LANES), d_d, d_bias: (K, E, B), float64, to be summed over
    the batch; d_b, d_c: (Q, NB, L, LANES), summed over each (direction, batch item)'s slots by the caller.
    """
    for part in prange(row_start.shape[0] - 1):
        _scan_backward_partition(part, u, x_dbl, dt_weight, dt_bias, a_blk, b_blk, c_blk, d_skip, ckpt, dy,
                                 row_start, slot_start, du, ddelta, d_a, d_d, d_bias, d_b, d_c)  # fmt: skip


@numba.njit(**SERIAL, inline="always")
def _scan_backward_partition(
    part, u, x_dbl, dt_weight, dt_bias, a_blk, b_blk, c_blk, d_skip, ckpt, dy, row_start, slot_start,
    du, ddelta, d_a, d_d, d_bias, d_b, d_c,
):  # fmt: skip
    """The rows of partition ``part`` (see :func:`_scan_backward_kernel`); a row without a partner (the last of an
    odd E, or at the partition's end) is paired with a ghost as in scan_cpu: its own inputs with a zero output
    gradient and a zero final state gradient, so every gradient the ghost sends is exactly zero."""
    ndir, ne, nb, seqlen = u.shape
    nblocks = a_blk.shape[2]
    nchunks = (seqlen + CHECKPOINT_EVERY - 1) // CHECKPOINT_EVERY
    pre = np.empty((2, seqlen), u.dtype)  # per row of the pair: dt_proj's output + bias
    dt = np.empty((2, seqlen), u.dtype)  # the discretisation step
    ddt = np.empty((2, seqlen), u.dtype)  # its gradient
    ghost_du = np.empty(seqlen, u.dtype)
    zeros = np.zeros(seqlen, u.dtype)
    zero_state = np.zeros(LANES, u.dtype)
    work = np.empty((WORK_ROWS, LANES), u.dtype)  # a chunk's working set (scan_cpu.backward_chunk)
    da_rows = np.empty((2, LANES), np.float64)
    first_kb = row_start[part] // ne
    row = row_start[part]
    while row < row_start[part + 1]:
        kb = row // ne
        k = kb // nb
        b = kb % nb
        e0 = row % ne
        e1 = e0 + 1
        paired = row + 1 < row_start[part + 1] and e1 < ne
        if not paired:
            e1 = e0
        slot = slot_start[part] + kb - first_kb
        _scan_backward_row_start(x_dbl, k, b, dt_weight[k, e0], dt_bias[k, e0], d_skip[k, e0], u[k, e0, b],
                                 dy[k, e0, b], pre[0], dt[0], ddt[0], du[k, e0, b], d_d[k, e0])  # fmt: skip
        if paired:
            _scan_backward_row_start(x_dbl, k, b, dt_weight[k, e1], dt_bias[k, e1], d_skip[k, e1], u[k, e1, b],
                                     dy[k, e1, b], pre[1], dt[1], ddt[1], du[k, e1, b], d_d[k, e1])  # fmt: skip
        else:
            dt[1, :] = dt[0]
        dy1, du1 = (dy[k, e1, b], du[k, e1, b]) if paired else (zeros, ghost_du)
        for blk in range(nblocks):
            b_r, c_r = b_blk[k, b, blk], c_blk[k, b, blk]  # (L, LANES)
            db_r, dc_r = d_b[slot, blk], d_c[slot, blk]  # (L, LANES)
            da_rows[:] = 0.0
            for chunk in range(nchunks - 1, -1, -1):
                t0 = chunk * CHECKPOINT_EVERY
                steps = min(CHECKPOINT_EVERY, seqlen - t0)
                backward_chunk(
                    work, chunk == nchunks - 1, np.uintp(steps), t0, dt[0], dt[1], u[k, e0, b], u[k, e1, b],
                    dy[k, e0, b], dy1, du[k, e0, b], du1, ddt[0], ddt[1], a_blk[k, e0, blk], a_blk[k, e1, blk],
                    b_r.reshape(seqlen * LANES), c_r.reshape(seqlen * LANES), ckpt[k, e0, b, blk],
                    ckpt[k, e1, b, blk], zero_state, zero_state, da_rows, db_r.reshape(seqlen * LANES),
                    dc_r.reshape(seqlen * LANES),
                )  # fmt: skip
            d_a[k, e0, b, blk] = da_rows[0]
            if paired:
                d_a[k, e1, b, blk] = da_rows[1]
        d_bias[k, e0, b] = _softplus_backward(pre[0], ddt[0], ddelta[k, e0, b])
        if paired:
            d_bias[k, e1, b] = _softplus_backward(pre[1], ddt[1], ddelta[k, e1, b])
        row += 2 if paired else 1


@numba.njit(**SERIAL, inline="always")
def _scan_backward_row_start(x_dbl, k, b, w_e, bias_e, skip, u_r, dy_r, pre, dt, ddt, du_r, d_d_e):
    """One row before the scan's backward: its pre-activation and dt again (as the forward computed them), the D
    skip's share of du and dD (into d_d_e[b]); ddt zeroed."""
    _delta_row(x_dbl, k, b, w_e, bias_e, pre, dt)
    dd_sum = 0.0
    for t in range(dt.shape[0]):
        dd_sum += dy_r[t] * u_r[t]
        du_r[t] = dy_r[t] * skip
        ddt[t] = 0
    d_d_e[b] = dd_sum


@numba.njit(**SERIAL, inline="always")
def _softplus_backward(pre, ddt, ddelta_r):
    """ddelta = ddt softplus'(pre) (identity above the threshold, as torch's softplus); returns its sum over time
    (float64), the row's share of d delta_bias."""
    one = pre.dtype.type(1)
    bias_sum = 0.0
    for t in range(ddt.shape[0]):
        x = pre[t]
        g = ddt[t] * (sigmoid(x) if x <= SOFTPLUS_THRESHOLD else one)
        ddelta_r[t] = g
        bias_sum += g
    return bias_sum


@numba.njit(**PARALLEL)
def _conv_backward_kernel(x, weight, bias, lengths, du, dweight, dbias):
    """Gradients of :func:`_conv_kernel`: dx = conv_0'(du_0) [+ rev(conv_1'(du_1))], written over du[0] (each row of
    du_0 is read into conv_cpu.backward_row's scratch before its dx is written); one row per iteration.

    x: (E, B, L); du: (K, E, B, L); weight: (K, E, WP); bias: (K, E); lengths: (B,). Writes dx into du[0], and
    dweight: (K, E, B, WP), dbias: (K, E, B), float64, to be summed over the batch by the caller.
    """
    ndir, ne, nb, seqlen = du.shape
    wp = weight.shape[2]
    for row in prange(ne * nb):
        e = row // nb
        b = row % nb
        n = np.uintp(lengths[b])
        x_r, dx_r = x[e, b], du[0, e, b]  # (L,)
        gp = np.empty(seqlen + wp - 1, x.dtype)  # scratch of conv_cpu.backward_row
        if ndir == 2:
            x_rev = np.empty(seqlen, x.dtype)
            dx_rev = np.empty(seqlen, x.dtype)
            _reverse_valid(x_r, n, x_rev)
            dbias[1, e, b] = conv_backward_row(x_rev, weight[1, e], bias[1, e], True, du[1, e, b], dx_rev, gp,
                                               dweight[1, e, b])  # fmt: skip
        dbias[0, e, b] = conv_backward_row(x_r, weight[0, e], bias[0, e], True, dx_r, dx_r, gp, dweight[0, e, b])
        if ndir == 2:
            last = n - np.uintp(1)
            for t in range(n):
                dx_r[t] += dx_rev[last - t]
            for t in range(n, np.uintp(seqlen)):
                dx_r[t] += dx_rev[t]


# ------------------------------------------------------------------------------------------- torch glue


def is_available(x: Tensor) -> bool:
    """float32 or float64 CPU tensors (other dtypes take the unfused path, which computes in float32)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class _Weights(NamedTuple):
    """The K directions' parameters stacked, in the kernels' dtype and layouts (for the kernels only: no graph)."""

    conv_w: Tensor  # (K, E, WP) left-padded taps
    conv_b: Tensor  # (K, E), zeros without a bias
    x_proj_w: tuple[Tensor, ...]  # K x (P, E), not stacked: only the GEMMs read them
    dt_w: Tensor  # (K, E, R)
    dt_b: Tensor  # (K, E)
    a_blk: Tensor  # (K, E, NB, LANES)
    d_skip: Tensor  # (K, E)


def _kernel_weights(dirs: tuple[DirectionWeights, ...], dtype: torch.dtype) -> _Weights:
    nblocks = -(-dirs[0].A.shape[1] // LANES)

    def stacked(ts: list[Tensor]) -> Tensor:
        return torch.stack([t.detach().to(dtype) for t in ts]).contiguous()

    ne = dirs[0].D.shape[0]
    return _Weights(
        conv_w=torch.stack([padded_taps(d.conv_weight, dtype) for d in dirs]),
        conv_b=stacked([d.conv_bias if d.conv_bias is not None else torch.zeros(ne) for d in dirs]),
        x_proj_w=tuple(d.x_proj_weight.detach().to(dtype) for d in dirs),
        dt_w=stacked([d.dt_proj_weight for d in dirs]),
        dt_b=stacked([d.dt_proj_bias for d in dirs]),
        a_blk=torch.stack([a_blocks(d.A, dtype, nblocks) for d in dirs]),
        d_skip=stacked([d.D for d in dirs]),
    )


def _lengths(lengths: Tensor | None, nb: int, seqlen: int, ndir: int) -> np.ndarray:
    """(B,) valid lengths for the kernels, checked here: the kernels index with them unchecked."""
    if lengths is None or ndir == 1:  # one direction is causal: right padding never reaches a valid position
        return np.full(nb, seqlen, np.int64)
    out = lengths.detach().to(torch.int64).cpu().numpy()
    if out.shape != (nb,) or out.min() < 0 or out.max() > seqlen:
        raise ValueError(f"lengths must be ({nb},) valid lengths in [0, {seqlen}], got {lengths.tolist()}")
    return out


def _state_blocks(x_dbl: Tensor, lo: int, nstate: int, nblocks: int) -> Tensor:
    """x_dbl[:, lo:lo + N] (K, N, B, L) -> (K, B, NB, L, LANES), zero-padded: each step's state lanes adjacent."""
    ndir, _, nb, seqlen = x_dbl.shape
    padded = x_dbl.new_zeros(ndir, nb, nblocks * LANES, seqlen)
    padded[:, :, :nstate] = x_dbl[:, lo : lo + nstate].transpose(1, 2)
    return padded.view(ndir, nb, nblocks, LANES, seqlen).transpose(-1, -2).contiguous()


def _inner_forward(x: Tensor, z: Tensor, w: _Weights, lengths_np: np.ndarray, scale: float,
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """x, z (E, B, L), in_proj's halves -> the gate's output (E, B, L), with what the backward keeps: u, y
    (K, E, B, L), x_dbl (K, P, B, L) and the scan's checkpoints (K, E, B, NB, S, LANES)."""
    ne, nb, seqlen = x.shape
    ndir = w.conv_w.shape[0]
    nproj, rank = w.x_proj_w[0].shape[0], w.dt_w.shape[2]
    nblocks = w.a_blk.shape[2]
    nstate = (nproj - rank) // 2
    u = x.new_empty(ndir, ne, nb, seqlen)
    with torch.profiler.record_function("ssamba::causal_conv1d"):
        _conv_kernel(_np(x), _np(w.conv_w), _np(w.conv_b), lengths_np, _np(u))
    x_dbl = torch.stack([mm(w.x_proj_w[k], u[k].view(ne, nb * seqlen)) for k in range(ndir)])
    x_dbl = x_dbl.view(ndir, nproj, nb, seqlen)
    with torch.profiler.record_function("ssamba::selective_scan"):
        b_blk = _state_blocks(x_dbl, rank, nstate, nblocks)
        c_blk = _state_blocks(x_dbl, rank + nstate, nstate, nblocks)
        y = torch.empty_like(u)
        ckpt = x.new_empty(ndir, ne, nb, nblocks, -(-seqlen // CHECKPOINT_EVERY), LANES)
        _scan_kernel(_np(u), _np(x_dbl), _np(w.dt_w), _np(w.dt_b), _np(w.a_blk), _np(b_blk), _np(c_blk),
                     _np(w.d_skip), _np(y), _np(ckpt))  # fmt: skip
    with torch.profiler.record_function("ssamba::gate"):
        out = torch.empty_like(x)
        _gate_kernel(_np(y), _np(z), lengths_np, _np(x).dtype.type(scale), _np(out))
    return out, u, x_dbl, y, ckpt


def _unblocked_into(dst: Tensor, slots: Tensor, slot_kb: Tensor, ndir: int, nb: int) -> None:
    """dB or dC slot partials (Q, NB, L, LANES) -> summed per (direction, batch item) into dst (K, N, B, L)."""
    full = slots.new_zeros(ndir * nb, *slots.shape[1:]).index_add_(0, slot_kb, slots)  # (K*B, NB, L, LANES)
    nstate, seqlen = dst.shape[1], dst.shape[3]
    grad = full.view(ndir, nb, -1, seqlen, LANES).permute(0, 1, 2, 4, 3).reshape(ndir, nb, -1, seqlen)
    dst.copy_(grad[:, :, :nstate].transpose(1, 2))


class _MambaInnerFn(torch.autograd.Function):
    """in_proj -> conv, x_proj, scan, gate (every direction) -> out_proj, with the backward of
    :func:`mamba_inner_cpu`; the direction parameters come in stacked (K, ...), so autograd splits their gradients."""

    @staticmethod
    def forward(ctx, h, in_w, in_b, conv_w, conv_b, x_proj_w, dt_w, dt_b, A, D, out_w, out_b, lengths, scale):
        nb, seqlen, m = h.shape
        ndir, ne = D.shape
        dtype = h.dtype
        w = _kernel_weights(tuple(DirectionWeights(conv_w[k], None if conv_b is None else conv_b[k], x_proj_w[k],
                                                   dt_w[k], dt_b[k], A[k], D[k]) for k in range(ndir)), dtype)
        lengths_np = _lengths(lengths, nb, seqlen, ndir)
        h2 = h.reshape(nb * seqlen, m)
        xz = mm(in_w.to(dtype), h2.t())  # (2E, B*L): x and z channel-major, as the kernels read them
        if in_b is not None:
            xz += in_b[:, None]
        xz = xz.view(2 * ne, nb, seqlen)
        g, u, x_dbl, y, ckpt = _inner_forward(xz[:ne], xz[ne:], w, lengths_np, scale)
        out = mm(g.view(ne, nb * seqlen).t(), out_w.to(dtype).t())  # (B*L, M)
        if out_b is not None:
            out += out_b
        ctx.save_for_backward(h, in_w, out_w, xz, u, x_dbl, y, ckpt)
        ctx.w, ctx.lengths_np, ctx.scale = w, lengths_np, scale
        ctx.has_bias = (in_b is not None, conv_b is not None, out_b is not None)
        ctx.nstate, ctx.conv_width = A.shape[2], conv_w.shape[2]
        ctx.dtypes = [None if t is None else t.dtype for t in (h, in_w, in_b, conv_w, conv_b, x_proj_w, dt_w, dt_b, A,
                                                               D, out_w, out_b)]  # fmt: skip
        return out.view(nb, seqlen, m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        h, in_w, out_w, xz, u, x_dbl, y, ckpt = ctx.saved_tensors
        w: _Weights = ctx.w
        ndir, ne, nb, seqlen = u.shape
        nproj, rank = w.x_proj_w[0].shape[0], w.dt_w.shape[2]
        nstate = (nproj - rank) // 2
        tokens = nb * seqlen
        # Gradient buffers double up where a tensor is read for the last time before the one replacing it is
        # written (fewer fresh pages, which the allocator may fault in anew every step): dg -> the gate's output g,
        # dy -> ddelta, du[0] -> dx. Saved tensors stay untouched, so the backward can run again (retain_graph).
        d2 = dout.reshape(tokens, -1).to(u.dtype)  # (B*L, M)
        dg = mm(out_w.to(u.dtype).t(), d2.t()).view(ne, nb, seqlen)  # (E, B, L)
        dz, dy = torch.empty_like(dg), torch.empty_like(y)
        with torch.profiler.record_function("ssamba::gate"):
            _gate_backward_kernel(_np(dg), _np(xz[ne:]), _np(y), ctx.lengths_np, _np(y).dtype.type(ctx.scale),
                                  _np(dz), _np(dy))  # fmt: skip
        d_out_w = mm(d2.t(), dg.view(ne, tokens).t())  # (M, E): dg holds g now
        del dg

        with torch.profiler.record_function("ssamba::selective_scan"):
            nblocks = w.a_blk.shape[2]
            b_blk = _state_blocks(x_dbl, rank, nstate, nblocks)
            c_blk = _state_blocks(x_dbl, rank + nstate, nstate, nblocks)
            row_start, slot_start, slot_kb = partitions(ndir * nb, ne)
            nslots = slot_kb.shape[0]
            du = torch.empty_like(u)
            ddelta = dy  # each row of dy is read for the last time before its ddelta is written
            d_a = torch.empty(ndir, ne, nb, nblocks, LANES, dtype=torch.float64)
            d_d = torch.empty(ndir, ne, nb, dtype=torch.float64)
            d_bias = torch.empty(ndir, ne, nb, dtype=torch.float64)
            d_b = torch.zeros(nslots, nblocks, seqlen, LANES, dtype=u.dtype)
            d_c = torch.zeros(nslots, nblocks, seqlen, LANES, dtype=u.dtype)
            _scan_backward_kernel(
                _np(u), _np(x_dbl), _np(w.dt_w), _np(w.dt_b), _np(w.a_blk), _np(b_blk), _np(c_blk), _np(w.d_skip),
                _np(ckpt), _np(dy), row_start, slot_start, _np(du), _np(ddelta), _np(d_a), _np(d_d), _np(d_bias),
                _np(d_b), _np(d_c),
            )  # fmt: skip
        dx_dbl = torch.empty_like(x_dbl)  # (K, P, B, L)
        _unblocked_into(dx_dbl[:, rank : rank + nstate], d_b, slot_kb, ndir, nb)
        _unblocked_into(dx_dbl[:, rank + nstate :], d_c, slot_kb, ndir, nb)
        d_dt_w = torch.empty_like(w.dt_w)
        d_x_proj_w = u.new_empty(ndir, nproj, ne)
        for k in range(ndir):
            ddelta_k = ddelta[k].view(ne, tokens)
            dx_dbl[k, :rank].view(rank, tokens).copy_(mm(w.dt_w[k].t(), ddelta_k))
            d_dt_w[k] = mm(ddelta_k, x_dbl[k, :rank].view(rank, tokens).t())
            dx_dbl_k = dx_dbl[k].view(nproj, tokens)
            d_x_proj_w[k] = mm(dx_dbl_k, u[k].view(ne, tokens).t())
            du[k].view(ne, tokens).add_(mm(w.x_proj_w[k].t(), dx_dbl_k))

        d_conv_w = torch.empty(ndir, ne, nb, w.conv_w.shape[2], dtype=torch.float64)
        d_conv_b = torch.empty(ndir, ne, nb, dtype=torch.float64)
        with torch.profiler.record_function("ssamba::causal_conv1d"):
            _conv_backward_kernel(_np(xz[:ne]), _np(w.conv_w), _np(w.conv_b), ctx.lengths_np, _np(du),
                                  _np(d_conv_w), _np(d_conv_b))  # fmt: skip
        dx = du[0].view(ne, tokens)
        dz = dz.view(ne, tokens)
        h2 = h.reshape(tokens, -1).to(u.dtype)
        in_w = in_w.to(u.dtype)
        dh = mm(dx.t(), in_w[:ne]).add_(mm(dz.t(), in_w[ne:])).view(h.shape)  # (B, L, M)
        d_in_w = torch.cat([mm(dx, h2), mm(dz, h2)])  # (2E, M)
        wp, width, nstate_a = w.conv_w.shape[2], ctx.conv_width, ctx.nstate
        grads = (
            dh,
            d_in_w,
            torch.cat([dx.sum(1), dz.sum(1)]) if ctx.has_bias[0] else None,
            d_conv_w.sum(2)[:, :, wp - width :],
            d_conv_b.sum(2) if ctx.has_bias[1] else None,
            d_x_proj_w,
            d_dt_w,
            d_bias.sum(2),
            d_a.sum(2).view(ndir, ne, nblocks * LANES)[:, :, :nstate_a],
            d_d.sum(2),
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
    three (B, L, E)-sized buffers. Under ``torch.autocast`` (inference only) in_proj and out_proj run in autocast's
    dtype.
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
