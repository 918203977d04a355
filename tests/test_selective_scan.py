"""Selective scan reference: outputs, last state and every gradient against a plain float64 loop."""

import pytest
import torch
import torch.nn.functional as F

from ssamba.ops import (
    causal_conv1d_reference,
    resolve_backend,
    selective_scan,
    selective_scan_reference,
    use_backend,
)


def loop_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The recurrence written element by element (float64): h = exp(dt*A) h + dt*B*u, y = C.h + D*u."""
    batch, dim, length = u.shape
    n = A.shape[1]
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]
    out = torch.zeros(batch, dim, length, dtype=torch.float64)
    last = torch.zeros(batch, dim, n, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            g = d // (dim // groups)
            h = torch.zeros(n, dtype=torch.float64)
            for t in range(length):
                dt = delta[b, d, t] + (0 if delta_bias is None else delta_bias[d])
                if delta_softplus:
                    dt = F.softplus(dt)
                h = torch.exp(dt * A[d]) * h + dt * B[b, g, :, t] * u[b, d, t]
                y = (h * C[b, g, :, t]).sum() + (0 if D is None else D[d] * u[b, d, t])
                out[b, d, t] = y * (1 if z is None else F.silu(z[b, d, t]))
            last[b, d] = h
    return out, last


def make_inputs(batch, dim, n, length, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (batch, n, length) if groups == 0 else (batch, groups, n, length)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.rand(dim, n, generator=g) * 2 - 0.1,
        B=torch.randn(*shape_bc, generator=g),
        C=torch.randn(*shape_bc, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.5,
    )


@pytest.mark.parametrize(
    "length,groups,softplus,optional",
    [(1, 0, True, True), (7, 0, True, True), (33, 2, True, True), (6, 0, False, False), (5, 4, False, True)],
)
def test_reference_matches_loop_with_gradients(length, groups, softplus, optional):
    x64 = {k: v.double().requires_grad_() for k, v in make_inputs(2, 4, 3, length, groups).items()}
    if not optional:
        x64["D"] = x64["z"] = x64["delta_bias"] = None
    args = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    want, want_last = loop_scan(*(x64[k] for k in args), softplus)
    x32 = {k: None if v is None else v.detach().float().requires_grad_() for k, v in x64.items()}
    # float64: the same recurrence in another order (1e-12, ~1e4 float64 u); float32 state over <= 33 steps of
    # O(1) values against the float64 loop (2e-5, ~300 float32 u): independent of the CPU's kernels
    for inputs, atol in ((x64, 1e-12), (x32, 2e-5)):
        got, last = selective_scan(
            *(inputs[k] for k in args), delta_softplus=softplus, return_last_state=True, backend="reference"
        )
        assert got.dtype == inputs["u"].dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=atol, atol=atol)
        torch.testing.assert_close(last.double(), want_last, rtol=atol, atol=atol)

    # gradients of every input, float32 reference vs float64 loop
    weight = torch.randn_like(want)
    grads_want = torch.autograd.grad((want * weight).sum(), [v for v in x64.values() if v is not None])
    got = selective_scan(*(x32[k] for k in args), delta_softplus=softplus)
    grads_got = torch.autograd.grad((got * weight.float()).sum(), [v for v in x32.values() if v is not None])
    for g_got, g_want in zip(grads_got, grads_want, strict=True):  # gradients sum over L and N: 5x the forward's
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    x = {k: v.double().requires_grad_() for k, v in make_inputs(1, 2, 2, 4, 0, seed=1).items()}
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    fn = lambda *a: selective_scan_reference(*a, delta_softplus=True)
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in order))


def test_backward_graph_has_no_per_step_indexing():
    # selective_scan_ref's deltaA[:, :, i] makes one SelectBackward per step, each materialising a full
    # zero gradient in the backward (O(L^2)); the reference must use unbind/stack instead.
    x = {k: v.requires_grad_() for k, v in make_inputs(1, 2, 2, 16, 0).items()}
    out = selective_scan(**x, delta_softplus=True)
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    assert not [n for n in names if n.startswith(("SelectBackward", "IndexBackward"))]
    assert names.count("UnbindBackward0") <= 3


def test_backend_dispatch(monkeypatch):
    x = make_inputs(1, 2, 2, 3, 0)
    monkeypatch.delenv("SSAMBA_SCAN_BACKEND", raising=False)
    assert resolve_backend(x["u"]) == "cpu"  # auto: the fused kernel on CPU tensors
    with use_backend("reference"):
        assert resolve_backend(x["u"]) == "reference"
        assert resolve_backend(x["u"], backend="cpu") == "cpu"  # an explicit argument wins
    with use_backend("nope"), pytest.raises(ValueError, match="from use_backend"):
        selective_scan(**x)
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nope'"):
        selective_scan(**x, backend="nope")
    monkeypatch.setenv("SSAMBA_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SSAMBA_SCAN_BACKEND"):
        selective_scan(**x)
    monkeypatch.setenv("SSAMBA_SCAN_BACKEND", "reference")
    # exact by construction: the dispatcher runs the reference itself, here, on the same input
    torch.testing.assert_close(selective_scan(**x), selective_scan_reference(**x), rtol=0, atol=0)


def test_causal_conv1d_reference():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 9, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    out = causal_conv1d_reference(x, w, b, activation="silu")
    want = torch.zeros_like(out)
    for t in range(9):
        for k in range(4):  # tap k reads x[t - (3 - k)]
            if t - (3 - k) >= 0:
                want[..., t] += w[:, k] * x[..., t - (3 - k)]
    torch.testing.assert_close(out, F.silu(want + b[:, None]))
    x2 = x.clone()
    x2[..., 5:] = 100.0  # the future does not reach the past
    torch.testing.assert_close(causal_conv1d_reference(x2, w, b)[..., :5], causal_conv1d_reference(x, w, b)[..., :5])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_reference(x, w, b, activation="relu")
