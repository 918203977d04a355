"""Equivalence of the selective-scan backends (``cpu``: fused numba kernels; ``reference``: pure PyTorch) with a
straightforward float64 scan (tests/scan_oracle.py, shared with the triton backend's tests): outputs, last state
and every gradient.

Shape glossary: B batch, D channels, L length, N state size, G groups of B/C (0 in a case = B/C given as
(B, N, L) without a group axis).

Tolerances (RTOL, stated with their reasons in tests/scan_oracle.py), as max |backend - float64| <= RTOL *
max |float64| per tensor: float64 1e-12 (worst observed over CASES 3e-15), float32 2e-5 (worst observed 5e-7).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssamba.ops  # noqa: F401  (registers the "cpu" and "cuda" backends)
from ssamba.ops.selective_scan import resolve_backend, selective_scan
from tests.scan_oracle import NAMES, check_backend, make_inputs, scan_float64

BACKENDS = ["cpu", "reference"]
CUDA_BACKENDS = ["cuda", "reference"]


# (batch, D, L, N, groups, with_d, with_z, with_bias, softplus)
CASES = [
    pytest.param(2, 4, 1, 16, 0, True, True, True, True, id="L1"),
    pytest.param(1, 3, 37, 16, 0, False, False, False, False, id="oddL-bare"),
    pytest.param(2, 6, 700, 16, 0, True, True, True, True, id="L700-full"),
    pytest.param(2, 8, 129, 16, 2, True, False, True, True, id="grouped-L129"),
    pytest.param(1, 4, 50, 5, 0, False, True, False, True, id="N5"),
    pytest.param(3, 4, 300, 20, 4, True, True, False, False, id="N20-grouped"),
    pytest.param(1, 5, 256, 16, 1, False, False, True, False, id="G1-L256"),
    # groups of 3 channels: the kernels pair channels 2 and 3 with themselves (their B, C differ), N > 16
    pytest.param(2, 6, 140, 20, 2, True, True, True, True, id="groups-of-3"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch,dim,seqlen,nstate,groups,with_d,with_z,with_bias,softplus", CASES)
def test_backend_matches_float64(backend, dtype, batch, dim, seqlen, nstate, groups, with_d, with_z, with_bias,
                                 softplus):  # fmt: skip
    inputs = make_inputs(batch, dim, seqlen, nstate, groups, with_d=with_d, with_z=with_z, with_bias=with_bias,
                         softplus=softplus, seed=seqlen)  # fmt: skip
    check_backend(backend, dtype, inputs, softplus)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_softplus_threshold(backend, dtype):
    """delta + bias above 20 passes through softplus unchanged, with gradient 1, as torch's softplus."""
    inputs = make_inputs(2, 3, 40, 16, 0, with_d=True, with_z=True, with_bias=True, softplus=True, seed=7,
                         big_delta=True)  # fmt: skip
    check_backend(backend, dtype, inputs, softplus=True)


def test_mixed_b_c_layouts():
    """B shared by all channels (B, N, L) while C is grouped (B, G, N, L), and the other way round."""
    for b_groups, c_groups in [(0, 3), (2, 0)]:
        inputs = make_inputs(2, 6, 33, 16, b_groups or 1, with_d=True, with_z=False, with_bias=True, softplus=True,
                             seed=3)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        shape = (2, 16, 33) if c_groups == 0 else (2, c_groups, 16, 33)
        if b_groups == 0:
            inputs["B"] = inputs["B"].detach()[:, 0].requires_grad_()
        inputs["C"] = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
        for backend in BACKENDS:
            check_backend(backend, torch.float64, inputs, softplus=True)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    dim=st.sampled_from([1, 2, 4, 6]),
    seqlen=st.integers(1, 300),
    nstate=st.integers(1, 20),
    grouped=st.booleans(),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_cpu_backend_property(batch, dim, seqlen, nstate, grouped, flags, seed):
    """Random shapes and options (float64, where any mismatch is a bug rather than rounding)."""
    with_d, with_z, with_bias, softplus = flags
    groups = 2 if grouped and dim % 2 == 0 else 0
    inputs = make_inputs(batch, dim, seqlen, nstate, groups, with_d=with_d, with_z=with_z, with_bias=with_bias,
                         softplus=softplus, seed=seed)  # fmt: skip
    check_backend("cpu", torch.float64, inputs, softplus, seed=seed)


def test_no_grad_path_and_low_precision():
    """Without autograd the forward skips checkpoints but gives the same numbers; bfloat16 in, bfloat16 out."""
    inputs = make_inputs(2, 4, 200, 16, 0, with_d=True, with_z=True, with_bias=True, softplus=True, seed=11)
    args = [None if v is None else v.detach().float() for v in inputs.values()]
    with torch.no_grad():
        out_ng, last_ng = selective_scan(*args, delta_softplus=True, return_last_state=True, backend="cpu")
    grad_args = [None if a is None else a.clone().requires_grad_() for a in args]
    out_g, last_g = selective_scan(*grad_args, delta_softplus=True, return_last_state=True, backend="cpu")
    # exact by construction: one kernel, one machine; the grad path only also stores checkpoints
    assert torch.equal(out_ng, out_g.detach()) and torch.equal(last_ng, last_g.detach())

    bf16 = [None if a is None else a.bfloat16() for a in args]
    out_bf = selective_scan(*bf16, delta_softplus=True, backend="cpu")
    ref_bf = selective_scan(*bf16, delta_softplus=True, backend="reference")
    assert out_bf.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits (u = 2^-9 = 2e-3) and the two backends round intermediates differently: 10 u of the
    # output's scale
    torch.testing.assert_close(out_bf.float(), ref_bf.float(), rtol=0, atol=2e-2 * ref_bf.float().abs().max().item())


def test_only_last_state_used():
    """A loss on the last state alone (dout is None in the backward) still gives the float64 gradients."""
    inputs = make_inputs(1, 3, 150, 16, 0, with_d=True, with_z=True, with_bias=False, softplus=True, seed=2)
    present = [k for k in NAMES if inputs[k] is not None]
    _, ref_last = scan_float64(*inputs.values(), True)
    want = torch.autograd.grad(ref_last.sum(), [inputs[k] for k in present], allow_unused=True)
    args = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    _, last = selective_scan(*args.values(), delta_softplus=True, return_last_state=True, backend="cpu")
    got = torch.autograd.grad(last.sum(), [args[k] for k in present], allow_unused=True)
    for name, a, b in zip(present, got, want, strict=True):
        if b is None:  # D and z do not reach the state
            assert a is None or not a.abs().max() > 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(delta=a["delta"][..., :-1]), "delta must have u's shape"),
        (lambda a: a.update(A=a["A"][:-1]), "A must be"),
        (lambda a: a.update(B=a["B"][..., :-1]), "B must be"),
        (lambda a: a.update(C=a["C"].unsqueeze(1).expand(-1, 3, -1, -1)), "C must be"),
        (lambda a: a.update(D=a["D"][:-1]), "D must be"),
        (lambda a: a.update(A=a["A"].to(torch.complex64)), "complex A"),
    ],
)
def test_bad_shapes_are_errors(change, message):
    """The kernels do not bounds-check, so shapes are checked before them."""
    inputs = {k: None if v is None else v.detach().float() for k, v in make_inputs(
        2, 4, 10, 16, 0, with_d=True, with_z=False, with_bias=False, softplus=False, seed=0).items()}  # fmt: skip
    change(inputs)
    with pytest.raises((ValueError, NotImplementedError), match=message):
        selective_scan(*inputs.values(), backend="cpu")


def test_bench_scan_smoke():
    """``ssamba bench scan``'s library side end to end at a toy length (no timing asserted, only the contract)."""
    import json

    from ssamba.bench import scan as bench

    result = bench.run(lengths=(4,), measure_memory=False)
    assert {r["method"] for r in result["rows"]} >= {"backend:cpu", "backend:reference", "baseline:torch_loop",
                                                      "baseline:per_step"}  # fmt: skip
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in result["rows"])
    assert json.loads(json.dumps(result)) == result
    table = bench.format_table(result)
    assert "| 4 | backend:cpu |" in table and "Speed-up of backend:cpu" in table
    if bench.os.path.exists("/proc/self/clear_refs"):
        memory = bench._memory_child("backend:cpu", 4)
        assert memory["forward_backward_mib"] >= 0


def test_cuda_backend_refuses_clearly_where_it_cannot_run():
    u = torch.zeros(1, 2, 3)
    assert resolve_backend(u) == "cpu"
    with pytest.raises(ValueError, match="'cuda' cannot run"):
        resolve_backend(u, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("seqlen,groups", [(1, 0), (257, 0), (700, 2)])
def test_cuda_backends_match_float64(backend, seqlen, groups):
    if backend == "cuda" and ssamba.ops.scan_cuda.selective_scan_fn is None:
        pytest.skip("mamba_ssm is not installed (pip install ssamba[cuda])")
    inputs = make_inputs(2, 8, seqlen, 16, groups, with_d=True, with_z=True, with_bias=True, softplus=True, seed=3)
    leaves = {k: v.detach().float().cuda().requires_grad_() if v is not None else None for k, v in inputs.items()}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
    ref_out, ref_last = scan_float64(**inputs, delta_softplus=True)
    (out.sum() + last.sum()).backward()
    (ref_out.sum() + ref_last.sum()).backward()
    for got, want in [(out, ref_out), (last, ref_last)] + [(leaves[k].grad, inputs[k].grad) for k in NAMES]:
        err = (got.double().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-30)
        assert err <= 1e-4
