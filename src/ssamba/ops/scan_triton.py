"""Triton selective scan: forward and backward kernels for CUDA tensors, with nothing to compile at install time.

Registers itself as the ``triton`` backend of :func:`ssamba.ops.selective_scan.selective_scan` on import (end of the
file), with the semantics of ``selective_scan_reference`` (``mamba_ssm``'s ``selective_scan_fn`` for real ``A``):
``z``, ``D``, ``delta_bias``, ``delta_softplus``, B/C as (B, N, L) or grouped (B, G, N, L), ``return_last_state``.
Triton is optional (PyTorch's CUDA wheels ship it; ``pip install ssamba[triton]`` elsewhere): without it the module
imports, and the backend reports itself unavailable. Automatic choice on CUDA tensors: ``cuda`` (``mamba_ssm``) when
importable, else ``triton``, else ``reference``. On CPU tensors the ``cpu`` backend stays the default; ``triton``
runs there only when asked for by name and only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported: ``triton.jit`` reads it when the kernels below are decorated), which is how the tests check
these kernels on machines without a GPU.

Shape glossary
    B  batch            D  channels (d_inner)        L  sequence length
    N  state size       G  groups of B/C (1 for B/C given as (B, N, L)); Dg = D / G channels per group
    BD channels per program (BLOCK_D, a power of two dividing Dg for B and for C)
    BN N padded up to a power of two (BLOCK_N)
    K  checkpoint interval (CHUNK)                    S  checkpoints per row, ceil(L / K)
    P  channel blocks, D / BD

Algorithm. Grid (B, P): one program per batch item and block of BD channels; the programs are independent, and
each walks the L steps in order, carrying its (BD, BN) state tile in registers:
    dt   = softplus(delta_t + delta_bias)                              (BD,)
    h    = exp(dt A) * h + (dt u_t) B_t                                (BD, BN); B_t (BN,) is shared by the block
    y_t  = <h, C_t> + D u_t;   out_t = y_t * silu(z_t)                 (BD,)
A block never straddles a group of B/C (BD divides Dg), so B_t and C_t are one (BN,) vector per step, loaded once
for the block. The forward stores the state before every K-th step, (B, D, S, N), and the last state.

The backward (one program per batch item and channel block again) walks the chunks of K steps from the last to
the first. For each chunk it recomputes the K states from the chunk's checkpoint into a per-program scratch
buffer, (B, D, K + 1, BN) in all, computing the pre-gate output y on the way (for dz), then walks the chunk
backwards with the adjoint g_t = dL/dh_t in registers:
    g_t        = dy_t C_t + g_(t+1) exp(dt_(t+1) A)        (the carry; dL/d last_state enters at t = L - 1)
    dB_t      += sum over the block's channels of g_t dt_t u_t;     dC_t += sum over them of dy_t h_t
    d(dt_t u_t) = <g_t, B_t>  -> du_t, and ddt_t from it and from <g_t h_(t-1) exp(dt_t A), A>
    dA        += g_t h_(t-1) exp(dt_t A) dt_t              (summed over time in registers)
then ddelta through the softplus, d delta_bias and dD summed over time in registers. Per-block partial sums of
dA, dD, d delta_bias (B, D, ...) and of dB, dC (B, P, N, L) are reduced over the batch / the group's blocks by
PyTorch afterwards: deterministic, unlike atomics, at the price of P partial copies of dB and dC.

Why sequential and chunked like this: every (batch, channel) row is an independent recurrence whose only
step-to-step dependence is one multiply-add per state entry, so a program needs nothing from the others and the
state never leaves registers in the forward. Storing every state for the backward would cost (B, D, L, N): 200 MB
per layer and direction in float32 at B = 2, D = 768, N = 16, L = 2048, K = 64 times the checkpoints (3 MB there).
Recomputing a chunk from its checkpoint costs one more exp per state entry and step, and its K states live in a
scratch buffer that is reused chunk after chunk (6 MB there), so the backward's memory is O(B D (L/K + K) N)
instead of O(B D L N). The reverse walk reads h_(t-1) from that buffer rather than undoing the update
(h_(t-1) = (h_t - dt u B) / exp(dt A) divides by a decay that underflows to 0). Parallelism is B * P programs
(96 at B = 2, D = 768), each latency-bound on its chain of L steps; a parallel scan inside a chunk
(``tl.associative_scan``) or over chunks would give a GPU more, but the interpreter, where these kernels are tested,
runs an associative scan element by element in Python (~0.1 ms per state entry and scan, several times the
sequential form's cost per step there). Whether the sequential form meets the GPU targets is for the benchmark
(``ssamba bench scan --device cuda``) to say; MAX_BLOCK_D and _num_warps are its untuned knobs.

Precision: the state and all arithmetic are in float32 for float32/float16/bfloat16 inputs and in float64 for
float64 inputs (the dtype ``A`` is cast to, read by the kernels from its pointer); inputs are read in their own
dtype and converted on load; out, du, ddelta and dz are written in their tensor's dtype, the last state in the
compute dtype. exp is Triton's ``tl.exp`` (on a GPU: exp2 of x * log2(e), a few ulp).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ssamba.ops.selective_scan import check_scan_inputs, register_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: pip install ssamba[triton] (PyTorch's CUDA wheels already bring it)
    triton = None
    tl = None

__all__ = ["CHUNK", "INTERPRETED", "MAX_BLOCK_D", "is_available", "selective_scan_triton"]

# Checkpoint interval K: the forward stores S = ceil(L / K) states per row, and the backward's scratch holds K + 1
# states per row; K = 64 keeps both small (1/64 of (B, D, L, N) and (B, D, 65, N)) and the scratch in L2.
CHUNK = 64
# Channels per program, at most (the block must also divide each B/C group's channel count). Smaller blocks give a
# GPU more programs to hide latency with; larger ones fewer partial copies of dB and dC. Untuned: a GPU session
# should sweep it (and _num_warps) with ``ssamba bench scan --device cuda``.
MAX_BLOCK_D = 16
# torch.nn.functional.softplus's default threshold (and mamba_ssm's kernels'): above it softplus(x) = x.
SOFTPLUS_THRESHOLD = 20.0


def _num_warps(block_d: int, block_n: int) -> int:
    """About 4 state entries per thread, one to four warps."""
    return max(1, min(4, block_d * block_n // 128))


if triton is not None:
    # jit functions may read module globals only as constexprs
    _THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)

    @triton.jit
    def _softplus(x):
        """torch's softplus (threshold 20) as max(x, 0) + log1p(exp(-|x|)), so that exp never overflows. No log1p in
        tl: Kahan's log1p(e) = log(w) * e / (w - 1) with w = 1 + e is exact to a few ulp (e when w rounds to 1)."""
        e = tl.exp(-tl.abs(x))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        return tl.where(x > _THRESHOLD, x, tl.maximum(x, 0.0) + log1p)

    @triton.jit
    def _scan_forward_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, dskip_ptr, z_ptr, bias_ptr,
        out_ptr, last_ptr, ckpt_ptr,
        dim, seqlen, nstate, nchunks, per_group_b, per_group_c,
        stride_b_batch, stride_b_group, stride_b_state, stride_b_len,
        stride_c_batch, stride_c_group, stride_c_state, stride_c_len,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE: tl.constexpr, CHUNK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program: batch item program_id(0), channels program_id(1) * BD + [0, BD).

        u, delta, z, out: (B, D, L) contiguous; a: (D, N) in the compute dtype; b: (B, Gb, N, L), c: (B, Gc, N, L)
        (strided); dskip, bias: (D,) compute dtype; last: (B, D, N) and ckpt: (B, D, S, N), compute dtype (ckpt
        written only when SAVE: ckpt[:, :, s] is the state before step s * K).
        """
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        ct = a_ptr.dtype.element_ty  # the compute dtype
        d_idx = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
        n_idx = tl.arange(0, BLOCK_N)  # (BN,)
        n_mask = n_idx < nstate
        rows = pid_b * dim + d_idx  # (BD,) row of (B, D, ...)
        row_off = rows.to(tl.int64) * seqlen  # (BD,) start of each row in (B, D, L); 64-bit: B*D*L may pass 2^31
        state_off = rows[:, None].to(tl.int64) * nstate + n_idx[None, :]  # (BD, BN) into (B, D, N)
        state_mask = n_mask[None, :]
        # Padded state lanes: A = 0 decays by exp(0) = 1 but B = 0 feeds nothing in, so they stay 0.
        a = tl.load(a_ptr + d_idx[:, None] * nstate + n_idx[None, :], mask=state_mask, other=0.0)  # (BD, BN)
        # The block lies inside one group of B and one of C: their step-t values are one (BN,) vector each.
        b_base = b_ptr + pid_b.to(tl.int64) * stride_b_batch + (pid_d * BLOCK_D // per_group_b) * stride_b_group
        c_base = c_ptr + pid_b.to(tl.int64) * stride_c_batch + (pid_d * BLOCK_D // per_group_c) * stride_c_group
        b_base = b_base + n_idx * stride_b_state  # (BN,) pointers
        c_base = c_base + n_idx * stride_c_state
        if HAS_D:
            d_skip = tl.load(dskip_ptr + d_idx)  # (BD,)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d_idx)  # (BD,)

        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ct)  # (BD, BN) the state, in registers throughout
        for chunk in range(0, nchunks):
            t0 = chunk * CHUNK_K
            if SAVE:
                tl.store(ckpt_ptr + (rows[:, None].to(tl.int64) * nchunks + chunk) * nstate + n_idx[None, :], h,
                         mask=state_mask)  # fmt: skip
            for t in range(t0, tl.minimum(t0 + CHUNK_K, seqlen)):
                u_t = tl.load(u_ptr + row_off + t).to(ct)  # (BD,)
                dt = tl.load(delta_ptr + row_off + t).to(ct)  # (BD,)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                b_t = tl.load(b_base + t * stride_b_len, mask=n_mask, other=0.0).to(ct)  # (BN,)
                c_t = tl.load(c_base + t * stride_c_len, mask=n_mask, other=0.0).to(ct)  # (BN,)
                h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t[None, :]  # (BD, BN)
                y = tl.sum(h * c_t[None, :], axis=1)  # (BD,)
                if HAS_D:
                    y = y + d_skip * u_t
                if HAS_Z:
                    z_t = tl.load(z_ptr + row_off + t).to(ct)
                    y = y * (z_t / (1.0 + tl.exp(-z_t)))  # * silu(z_t)
                tl.store(out_ptr + row_off + t, y.to(out_ptr.dtype.element_ty))
        tl.store(last_ptr + state_off, h, mask=state_mask)

    @triton.jit
    def _scan_backward_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, dskip_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr, work_ptr,
        steps_ptr,
        du_ptr, ddelta_ptr, dz_ptr, da_ptr, dd_ptr, dbias_ptr, db_ptr, dc_ptr,
        dim, seqlen, nstate, nchunks, per_group_b, per_group_c,
        stride_b_batch, stride_b_group, stride_b_state, stride_b_len,
        stride_c_batch, stride_c_group, stride_c_state, stride_c_len,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        CHUNK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Gradients of one program's rows (grid and inputs as :func:`_scan_forward_kernel`).

        ckpt: (B, D, S, N) from the forward; dout: (B, D, L); dlast: (B, D, N) compute dtype; scratch: work
        (B, D, K+1, BN) and steps (B, D, 3, K), compute dtype. Writes du, ddelta, dz: (B, D, L); da: (B, D, N), dd,
        dbias: (B, D) (compute dtype, to be summed over the batch); db, dc: (B, P, N, L) per-block partials (compute
        dtype, to be summed over each group's blocks).
        """
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        ct = a_ptr.dtype.element_ty
        d_idx = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
        n_idx = tl.arange(0, BLOCK_N)  # (BN,)
        n_mask = n_idx < nstate
        rows = pid_b * dim + d_idx  # (BD,)
        row_off = rows.to(tl.int64) * seqlen  # (BD,)
        state_off = rows[:, None].to(tl.int64) * nstate + n_idx[None, :]  # (BD, BN)
        state_mask = n_mask[None, :]
        a = tl.load(a_ptr + d_idx[:, None] * nstate + n_idx[None, :], mask=state_mask, other=0.0)  # (BD, BN)
        b_base = b_ptr + pid_b.to(tl.int64) * stride_b_batch + (pid_d * BLOCK_D // per_group_b) * stride_b_group
        c_base = c_ptr + pid_b.to(tl.int64) * stride_c_batch + (pid_d * BLOCK_D // per_group_c) * stride_c_group
        b_base = b_base + n_idx * stride_b_state  # (BN,)
        c_base = c_base + n_idx * stride_c_state
        # This program's (BN,) slice of the dB / dC partials at step 0: (B, P, N, L), block (pid_b, pid_d).
        part_off = (pid_b * tl.num_programs(1) + pid_d).to(tl.int64) * nstate * seqlen + n_idx * seqlen  # (BN,)
        # Scratch rows of the recomputed states: work[row, j] is the state after j steps of the chunk.
        work_off = rows[:, None].to(tl.int64) * ((CHUNK_K + 1) * BLOCK_N) + n_idx[None, :]  # (BD, BN)
        # Per-step scratch: steps[row, 0, j] = dt, steps[row, 1, j] = softplus'(x), steps[row, 2, j] = silu(z).
        steps_off = rows.to(tl.int64) * (3 * CHUNK_K)  # (BD,)
        if HAS_D:
            d_skip = tl.load(dskip_ptr + d_idx)  # (BD,)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d_idx)  # (BD,)

        carry = tl.load(dlast_ptr + state_off, mask=state_mask, other=0.0)  # (BD, BN) dL/dh from later steps
        da_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ct)  # dA, summed over time
        dd_acc = tl.zeros((BLOCK_D,), dtype=ct)  # dD
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ct)  # d delta_bias
        for chunk_rev in range(0, nchunks):
            chunk = nchunks - 1 - chunk_rev
            t0 = chunk * CHUNK_K
            t1 = tl.minimum(t0 + CHUNK_K, seqlen)
            # Recompute the chunk's states from its checkpoint into the scratch, with the per-step values the reverse
            # walk needs (dt, softplus'(x), silu(z)), and dz, which needs the pre-gate output y of the forward.
            h = tl.load(ckpt_ptr + (rows[:, None].to(tl.int64) * nchunks + chunk) * nstate + n_idx[None, :],
                        mask=state_mask, other=0.0)  # fmt: skip
            tl.store(work_ptr + work_off, h)
            for t in range(t0, t1):
                j = t - t0
                u_t = tl.load(u_ptr + row_off + t).to(ct)
                dt = tl.load(delta_ptr + row_off + t).to(ct)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    # softplus'(x) = sigmoid(x), and 1 above the threshold where softplus(x) = x
                    dsp = tl.where(dt > _THRESHOLD, 1.0, 1.0 / (1.0 + tl.exp(-dt)))
                    tl.store(steps_ptr + steps_off + CHUNK_K + j, dsp)
                    dt = _softplus(dt)
                tl.store(steps_ptr + steps_off + j, dt)
                b_t = tl.load(b_base + t * stride_b_len, mask=n_mask, other=0.0).to(ct)
                h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t[None, :]
                tl.store(work_ptr + work_off + (j + 1) * BLOCK_N, h)
                if HAS_Z:
                    # out = y * silu(z): dz = dout * y * silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
                    c_t = tl.load(c_base + t * stride_c_len, mask=n_mask, other=0.0).to(ct)
                    y = tl.sum(h * c_t[None, :], axis=1)
                    if HAS_D:
                        y = y + d_skip * u_t
                    z_t = tl.load(z_ptr + row_off + t).to(ct)
                    sig = 1.0 / (1.0 + tl.exp(-z_t))
                    tl.store(steps_ptr + steps_off + 2 * CHUNK_K + j, z_t * sig)
                    dout_t = tl.load(dout_ptr + row_off + t).to(ct)
                    dz = dout_t * y * (sig * (1.0 + z_t * (1.0 - sig)))
                    tl.store(dz_ptr + row_off + t, dz.to(dz_ptr.dtype.element_ty))
            # The reverse walk below reads values other threads of the program may have written.
            tl.debug_barrier()
            for step in range(0, t1 - t0):
                t = t1 - 1 - step
                j = t - t0  # the state before step t is work[j], after it work[j + 1]
                dt = tl.load(steps_ptr + steps_off + j)  # (BD,)
                u_t = tl.load(u_ptr + row_off + t).to(ct)
                b_t = tl.load(b_base + t * stride_b_len, mask=n_mask, other=0.0).to(ct)
                c_t = tl.load(c_base + t * stride_c_len, mask=n_mask, other=0.0).to(ct)
                dy = tl.load(dout_ptr + row_off + t).to(ct)  # (BD,) gradient of out_t
                if HAS_Z:
                    dy = dy * tl.load(steps_ptr + steps_off + 2 * CHUNK_K + j)  # * silu(z_t): gradient of y_t
                h_prev = tl.load(work_ptr + work_off + j * BLOCK_N)  # (BD, BN)
                h_t = tl.load(work_ptr + work_off + (j + 1) * BLOCK_N)
                decay = tl.exp(dt[:, None] * a)  # (BD, BN)
                g = dy[:, None] * c_t[None, :] + carry  # (BD, BN) dL/dh_t
                dtu = dt * u_t  # (BD,)
                # dB_t, dC_t: this block's share (its channels all read the same B_t, C_t).
                db_t = tl.sum(g * dtu[:, None], axis=0)  # (BN,)
                dc_t = tl.sum(dy[:, None] * h_t, axis=0)  # (BN,)
                tl.store(db_ptr + part_off + t, db_t, mask=n_mask)
                tl.store(dc_ptr + part_off + t, dc_t, mask=n_mask)
                s_b = tl.sum(g * b_t[None, :], axis=1)  # (BD,) d(dt_t u_t)
                g_da = g * h_prev * decay  # (BD, BN) d(dt_t A)
                ddt = u_t * s_b + tl.sum(g_da * a, axis=1)  # (BD,)
                da_acc += g_da * dt[:, None]
                carry = g * decay
                du = dt * s_b
                if HAS_D:
                    du = du + d_skip * dy
                    dd_acc += dy * u_t
                if SOFTPLUS:
                    ddt = ddt * tl.load(steps_ptr + steps_off + CHUNK_K + j)  # through the softplus
                dbias_acc += ddt
                tl.store(du_ptr + row_off + t, du.to(du_ptr.dtype.element_ty))
                tl.store(ddelta_ptr + row_off + t, ddt.to(ddelta_ptr.dtype.element_ty))
            # The next chunk's recomputation overwrites the scratch this one read.
            tl.debug_barrier()
        tl.store(da_ptr + state_off, da_acc, mask=state_mask)
        tl.store(dd_ptr + rows, dd_acc)
        tl.store(dbias_ptr + rows, dbias_acc)

    # Whether the kernels above were built for Triton's interpreter (TRITON_INTERPRET=1 at import): then they run
    # on CPU tensors, as numpy, one program after another.
    INTERPRETED = not isinstance(_scan_forward_kernel, triton.JITFunction)
else:
    INTERPRETED = False


def is_available(u: Tensor) -> bool:
    """Triton importable and a floating ``u`` on a CUDA device Triton compiles for (compute capability 7.0 or
    later, or a ROCm device), or on the CPU when the kernels are interpreted."""
    if triton is None or not u.dtype.is_floating_point:
        return False
    if u.is_cuda:
        return torch.version.hip is not None or torch.cuda.get_device_capability(u.device) >= (7, 0)
    return INTERPRETED and u.device.type == "cpu"


def _block_d(per_group_b: int, per_group_c: int) -> int:
    """The largest power of two dividing both group sizes, at most MAX_BLOCK_D: a block never straddles a group."""
    common = math.gcd(per_group_b, per_group_c)
    return min(common & -common, MAX_BLOCK_D)


class _Launch:
    """Inputs in the kernels' layouts, and the launch geometry, shared by the forward and the backward."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        self.compute = torch.promote_types(u.dtype, torch.float32)
        self.nb, self.nd, self.seqlen = u.shape
        self.nstate = A.shape[1]
        self.u = u.contiguous()  # (B, D, L)
        self.delta = delta.contiguous()
        self.z = None if z is None else z.contiguous()
        self.a = A.detach().to(self.compute).contiguous()  # (D, N)
        self.d_skip = None if D is None else D.detach().to(self.compute).contiguous()  # (D,)
        self.bias = None if delta_bias is None else delta_bias.detach().to(self.compute).contiguous()
        self.b4 = B if B.dim() == 4 else B.unsqueeze(1)  # (B, Gb, N, L), any strides
        self.c4 = C if C.dim() == 4 else C.unsqueeze(1)
        self.per_group_b = self.nd // self.b4.shape[1]
        self.per_group_c = self.nd // self.c4.shape[1]
        self.block_d = _block_d(self.per_group_b, self.per_group_c)
        self.block_n = triton.next_power_of_2(self.nstate)
        self.grid = (self.nb, self.nd // self.block_d)
        self.nchunks = triton.cdiv(self.seqlen, CHUNK)
        self.softplus = bool(softplus)

    def common_args(self) -> tuple:
        """The scalar arguments after the pointers, in both kernels' order."""
        return (self.nd, self.seqlen, self.nstate, self.nchunks, self.per_group_b, self.per_group_c,
                *self.b4.stride(), *self.c4.stride())  # fmt: skip

    def flags(self) -> dict:
        return dict(HAS_D=self.d_skip is not None, HAS_Z=self.z is not None, HAS_BIAS=self.bias is not None,
                    SOFTPLUS=self.softplus, CHUNK_K=CHUNK, BLOCK_D=self.block_d, BLOCK_N=self.block_n,
                    num_warps=_num_warps(self.block_d, self.block_n))  # fmt: skip

    def or_dummy(self, t: Tensor | None) -> Tensor:
        """Absent optional inputs: any valid pointer (the kernel never reads it: its HAS_* flag is False)."""
        return self.u if t is None else t

    def device_guard(self):
        return torch.cuda.device(self.u.device) if self.u.is_cuda else contextlib.nullcontext()

    def forward(self, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        """out (B, D, L) in u's dtype, last (B, D, N) and ckpt (B, D, S, N) (a placeholder unless ``save``) in the
        compute dtype."""
        u = self.u
        out = torch.empty_like(u)
        last = torch.empty(self.nb, self.nd, self.nstate, dtype=self.compute, device=u.device)
        ckpt_shape = (self.nb, self.nd, self.nchunks, self.nstate) if save else (1,)
        ckpt = torch.empty(ckpt_shape, dtype=self.compute, device=u.device)
        with self.device_guard():
            _scan_forward_kernel[self.grid](
                u, self.delta, self.a, self.b4, self.c4, self.or_dummy(self.d_skip), self.or_dummy(self.z),
                self.or_dummy(self.bias), out, last, ckpt, *self.common_args(), SAVE=save, **self.flags(),
            )  # fmt: skip
        return out, last, ckpt

    def backward(self, ckpt: Tensor, dout: Tensor | None, dlast: Tensor | None):
        """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias) in the compute dtype (du, ddelta, dz in their
        tensor's), dB/dC in the (B, G, N, L) layout; see the kernel."""
        u, dev, ct = self.u, self.u.device, self.compute
        nb, nd, nstate, seqlen = self.nb, self.nd, self.nstate, self.seqlen
        nblocks = self.grid[1]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = torch.zeros(nb, nd, nstate, dtype=ct, device=dev) if dlast is None else dlast.to(ct).contiguous()
        work = torch.empty(nb, nd, CHUNK + 1, self.block_n, dtype=ct, device=dev)
        steps = torch.empty(nb, nd, 3, CHUNK, dtype=ct, device=dev)
        du, ddelta = torch.empty_like(u), torch.empty_like(self.delta)
        dz = torch.empty_like(self.z) if self.z is not None else torch.empty(1, dtype=u.dtype, device=dev)
        d_a = torch.empty(nb, nd, nstate, dtype=ct, device=dev)
        d_d = torch.empty(nb, nd, dtype=ct, device=dev)
        d_bias = torch.empty(nb, nd, dtype=ct, device=dev)
        d_b = torch.empty(nb, nblocks, nstate, seqlen, dtype=ct, device=dev)
        d_c = torch.empty(nb, nblocks, nstate, seqlen, dtype=ct, device=dev)
        with self.device_guard():
            _scan_backward_kernel[self.grid](
                u, self.delta, self.a, self.b4, self.c4, self.or_dummy(self.d_skip), self.or_dummy(self.z),
                self.or_dummy(self.bias), ckpt, dout, dlast, work, steps, du, ddelta, dz, d_a, d_d, d_bias, d_b, d_c,
                *self.common_args(), **self.flags(),
            )  # fmt: skip
        # Per-block partials -> per group: the blocks of one group are consecutive.
        groups_b, groups_c = self.b4.shape[1], self.c4.shape[1]
        d_b = d_b.view(nb, groups_b, nblocks // groups_b, nstate, seqlen).sum(2)  # (B, Gb, N, L)
        d_c = d_c.view(nb, groups_c, nblocks // groups_c, nstate, seqlen).sum(2)  # (B, Gc, N, L)
        return du, ddelta, d_a.sum(0), d_b, d_c, d_d.sum(0), dz, d_bias.sum(0)


class _SelectiveScanFn(torch.autograd.Function):
    """Forward kernel saving checkpoints; backward kernel recomputing the states between them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        launch = _Launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out, last, ckpt = launch.forward(save=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        launch = _Launch(u, delta, A, B, C, D, z, delta_bias, ctx.softplus)
        du, ddelta, d_a, d_b, d_c, d_d, dz, d_bias = launch.backward(ckpt, dout, dlast)
        return (
            du,
            ddelta,
            d_a.to(A.dtype),
            (d_b if B.dim() == 4 else d_b.squeeze(1)).to(B.dtype),
            (d_c if C.dim() == 4 else d_c.squeeze(1)).to(C.dtype),
            None if D is None else d_d.to(D.dtype),
            None if z is None else dz,
            None if delta_bias is None else d_bias.to(delta_bias.dtype),
            None,
        )


def selective_scan_triton(
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
    """Triton selective scan; arguments and results as ``selective_scan_reference``.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,).
    Returns out (B, D, L) in ``u.dtype`` [, last_state (B, D, N) in the compute dtype]. Differentiable in every
    tensor argument (including through last_state) when autograd is recording.
    """
    if triton is None:
        raise RuntimeError("the triton selective-scan backend needs Triton: pip install 'ssamba[triton]'")
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, backend="triton")
    if not is_available(u):
        raise ValueError(
            f"the triton selective-scan backend runs on CUDA tensors, or on CPU tensors under Triton's interpreter "
            f"(TRITON_INTERPRET=1 before ssamba is imported); u is a {u.dtype} tensor on {u.device}"
        )
    args = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        out, last = _SelectiveScanFn.apply(*args, delta_softplus)
    else:
        out, last, _ = _Launch(*args, delta_softplus).forward(save=False)
    return (out, last) if return_last_state else out


# Just before the reference in automatic selection (auto_priority=-1): on CUDA tensors after mamba_ssm's kernel
# ("cuda", first); on CPU tensors the "cpu" backend, ahead of it, always runs, so the interpreter is never chosen
# automatically.
register_backend("triton", selective_scan_triton, is_available, auto_priority=-1)
