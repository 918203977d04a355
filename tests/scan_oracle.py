"""The float64 selective-scan oracle and the equivalence check shared by the scan backends' tests
(tests/test_scan_cpu.py, tests/test_scan_triton.py).

Shape glossary: B batch, D channels, L length, N state size, G groups of B/C (0 = B/C given as (B, N, L) without a
group axis).

Tolerances, as max |backend - float64| <= RTOL * max |float64| per tensor (a max-norm relative error, which stays
meaningful for gradients with entries near zero):
    float64 inputs: 1e-12 (the backends compute in float64; worst observed over test_scan_cpu's CASES 3e-15)
    float32 inputs: 2e-5 (float32 state over up to 700 steps; worst observed over those CASES 5e-7, cpu and
                    reference backends)
    bfloat16 inputs: 2e-2, against the oracle run on the bf16-rounded inputs (``round_inputs``), so that input
                    quantisation is no part of the error. What remains: the float32 state arithmetic (~1e-6), the
                    rounding of out, du, ddelta, dz and the parameter gradients to bfloat16, and the output
                    gradient's own rounding to bfloat16 on its way into the backward. bfloat16 keeps 8 significant
                    bits: rounding to nearest (PyTorch; a GPU) errs by up to 2^-8 = 3.9e-3 relative per entry (worst
                    observed 4.7e-3, cpu and reference backends), truncation by up to 2^-7 = 7.8e-3, and Triton's
                    interpreter converts float32 to bfloat16 by truncating the mantissa (cast_impl in
                    triton/runtime/interpreter.py): worst observed 7.3e-3 (triton, interpreted). 2e-2 leaves a margin
                    of more than twofold and is in line with mamba_ssm's own bf16 test tolerances (rtol 3e-2, atol
                    5e-2).
    float16 inputs: 5e-3, likewise on rounded inputs: float16 keeps 11 significant bits, 2^-11 = 4.9e-4 relative
                    per entry rounded to nearest (the interpreter rounds float16 to nearest, through numpy): about
                    ten of those; worst observed 4.8e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssamba.ops.selective_scan import selective_scan

RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def scan_float64(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The recurrence of the module docstring of ssamba.ops.selective_scan, one step at a time, in float64."""
    dim = A.shape[0]
    dt = delta if delta_bias is None else delta + delta_bias[:, None]  # (B, D, L)
    if delta_softplus:
        dt = F.softplus(dt)
    b_exp = B.unsqueeze(1) if B.dim() == 3 else B.repeat_interleave(dim // B.shape[1], dim=1)  # (B, 1|D, N, L)
    c_exp = C.unsqueeze(1) if C.dim() == 3 else C.repeat_interleave(dim // C.shape[1], dim=1)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * b_exp[..., t]
        ys.append((h * c_exp[..., t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(batch, dim, seqlen, nstate, groups, *, with_d, with_z, with_bias, softplus, seed, big_delta=False):
    """float64 leaves (None for absent optional inputs), in the value ranges Mamba uses."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (batch, nstate, seqlen) if groups == 0 else (batch, groups, nstate, seqlen)
    if softplus:
        delta = randn(batch, dim, seqlen) * 0.5 - 1.5
        if big_delta:  # exercise softplus's pass-through above its threshold (20)
            delta[..., ::3] += 25.0
        bias = randn(dim) * 0.2
    else:  # keep delta + bias > 0, else the state grows without bound
        delta = torch.rand(batch, dim, seqlen, generator=g, dtype=torch.float64) * 0.3 + 0.01
        bias = torch.rand(dim, generator=g, dtype=torch.float64) * 0.1
    tensors = {
        "u": randn(batch, dim, seqlen),
        "delta": delta,
        "A": -torch.exp(randn(dim, nstate) * 0.5),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if with_d else None,
        "z": randn(batch, dim, seqlen) if with_z else None,
        "delta_bias": bias if with_bias else None,
    }
    return {k: None if v is None else v.requires_grad_() for k, v in tensors.items()}


def check_backend(backend, dtype, inputs, softplus, seed=0, *, device="cpu", rtol=None, round_inputs=False):
    """Compare out, last state and all gradients of ``backend`` at ``dtype`` (on ``device``) with the float64 scan;
    returns {name: max-norm relative error}. ``round_inputs``: the oracle sees the inputs rounded to ``dtype``
    (for low precision, where rounding the inputs alone would dominate the error)."""
    if round_inputs:
        inputs = {k: None if v is None else v.detach().to(dtype).double().requires_grad_() for k, v in inputs.items()}
    ref_out, ref_last = scan_float64(*inputs.values(), softplus)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    w_last = torch.randn(ref_last.shape, generator=g, dtype=torch.float64)
    present = [k for k in NAMES if inputs[k] is not None]
    ref_grads = torch.autograd.grad((ref_out * w_out).sum() + (ref_last * w_last).sum(), [inputs[k] for k in present])

    cast = {k: None if v is None else v.detach().to(device, dtype).requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(
        *cast.values(), delta_softplus=softplus, return_last_state=True, backend=backend
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == ref_out.shape and last.shape == ref_last.shape
    loss = (out.double() * w_out.to(device)).sum() + (last.double() * w_last.to(device)).sum()
    grads = torch.autograd.grad(loss, [cast[k] for k in present])

    rtol = RTOL[dtype] if rtol is None else rtol
    errors = {}
    for name, got, want in [("out", out, ref_out), ("last_state", last, ref_last)] + list(
        zip([f"d{k}" for k in present], grads, ref_grads, strict=True)
    ):
        assert got.shape == want.shape, name
        err = (got.double().cpu() - want).abs().max().item()
        scale = want.abs().max().item()
        errors[name] = err / max(scale, 1e-30)
        assert err <= rtol * max(scale, 1e-30), f"{backend} {dtype} {name}: max err {err:.3g}, max |ref| {scale:.3g}"
    return errors
