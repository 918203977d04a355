"""Equivalence of the causal depthwise conv1d (+ SiLU) backends (``cpu``: fused numba kernels, ssamba.ops.conv_cpu;
``reference``: ``F.conv1d``, causal_conv1d_reference) with the reference run in float64: the output and the
gradients of x, weight and bias; plus the dispatcher's choice of backend.

Shape glossary: B batch, E channels, L length, W kernel width.

Tolerances, as max |backend - float64| <= RTOL * max |float64| per tensor (a max-norm relative error, meaningful
for gradients with entries near zero), against the float64 reference on the same (exactly representable) values:
    float64: 1e-12 (both backends compute in float64; sums of at most W + 1 terms for the output and dx, and of
             B * L terms for dweight and dbias; worst observed 1e-15)
    float32: 1e-5, about 170 float32 unit roundoffs (u = 2^-24): the output and dx are sums of at most W + 1
             float32 products through a float32 sigmoid (about 2 ulp), dweight and dbias sums of B * L products,
             float32 within 64-step chunks and float64 across them in the cpu kernel, float32 throughout in the
             reference. Worst observed over these cases and up to L = 2049: cpu 3e-7; reference 2e-7 (output, dx)
             and 1.6e-6 (dweight, dbias); the same under scripts/numerics.sh's avx2 and baseline profiles.
    bfloat16 x with float32 weights (the reference computes in the weight's dtype): output, dweight and dbias are
             float32 results on exact inputs (1e-5 as above); dx is rounded to bfloat16, 8 significant bits, up to
             2^-8 = 3.9e-3 relative per entry: 8e-3.
    bfloat16 everywhere: 2e-2 as tests/scan_oracle.py: every result rounded to bfloat16 (2^-8 per entry) and the
             output gradient rounded to bfloat16 on its way into the backward.
"""

from __future__ import annotations

import pytest
import torch

import ssamba.ops  # noqa: F401  (registers the "cpu" conv backend)
from ssamba.ops.selective_scan import (
    ENV_VAR,
    causal_conv1d,
    causal_conv1d_reference,
    resolve_conv_backend,
    use_backend,
)

BACKENDS = ["cpu", "reference"]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ["x", "weight", "bias"]


def make_inputs(batch, dim, seqlen, width, *, with_bias, seed, weight_3d=True):
    """float64 leaves (bias None without it), in the ranges of a Mamba mixer (nn.Conv1d's uniform init bound)."""
    g = torch.Generator().manual_seed(seed)
    bound = width**-0.5
    shape = (dim, 1, width) if weight_3d else (dim, width)
    return {
        "x": torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64),
        "weight": (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound,
        "bias": (torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1) * bound if with_bias else None,
    }


def grads(fn, inputs, dout, activation="silu"):
    """fn's output and the gradients of the present inputs for the output gradient dout."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], activation)
    present = [k for k in NAMES if leaves[k] is not None]
    return out, dict(zip(present, torch.autograd.grad(out, [leaves[k] for k in present], dout), strict=True))


def assert_close_maxnorm(got, want, rtol, name):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"{name}: max |error| {err:.3g} > {rtol:g} * max |float64| {scale:.3g}"


def check_backend(backend, inputs, *, dtypes, rtol, activation="silu", seed=0):
    """Run ``backend`` on the inputs cast to ``dtypes`` (name -> dtype) and compare output and gradients with the
    float64 reference on the same values."""
    cast = {k: None if v is None else v.to(dtypes[k]) for k, v in inputs.items()}
    ref_in = {k: None if v is None else v.double() for k, v in cast.items()}
    out_dtype = cast["weight"].dtype  # the reference's output dtype
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(cast["x"].shape, generator=g, dtype=torch.float64).to(out_dtype)

    def run(x, weight, bias, act):
        return causal_conv1d(x, weight, bias, act, backend=backend)

    out, got = grads(run, cast, dout, activation)
    want_out, want = grads(causal_conv1d_reference, ref_in, dout.double(), activation)
    assert out.dtype == out_dtype and out.shape == cast["x"].shape
    assert_close_maxnorm(out, want_out, rtol["out"], "out")
    for name, grad in got.items():
        assert grad.dtype == cast[name].dtype and grad.shape == cast[name].shape, name
        assert_close_maxnorm(grad, want[name], rtol[name], f"d{name}")


def _uniform(rtol):
    return dict.fromkeys(["out", *NAMES], rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 4, 5, 64, 513])
def test_backend_matches_float64(backend, dtype, with_bias, width, seqlen):
    """L below, at and above W (the zero-padded head), a chunk of the gradient sums (64) and SSAMBA-tiny's 513."""
    inputs = make_inputs(2, 5, seqlen, width, with_bias=with_bias, seed=seqlen * 10 + width)
    check_backend(backend, inputs, dtypes=dict.fromkeys(NAMES, dtype), rtol=_uniform(RTOL[dtype]), seed=seqlen)


@pytest.mark.parametrize("width", [1, 5, 8, 9])
def test_other_widths(width):
    """W outside Mamba's 2..4: one tap, and more than one block of 4 taps (the cpu kernel's slower path)."""
    inputs = make_inputs(2, 3, 70, width, with_bias=True, seed=width)
    for backend in BACKENDS:
        check_backend(backend, inputs, dtypes=dict.fromkeys(NAMES, torch.float64), rtol=_uniform(1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [3, 130])
def test_without_activation_and_2d_weight(backend, seqlen):
    """activation=None is the bare convolution; weight may be given as (E, W) (gradient returned in that shape)."""
    inputs = make_inputs(2, 4, seqlen, 4, with_bias=True, seed=seqlen, weight_3d=False)
    for dtype in (torch.float32, torch.float64):
        check_backend(backend, inputs, dtypes=dict.fromkeys(NAMES, dtype), rtol=_uniform(RTOL[dtype]),
                      activation=None)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [5, 513])
def test_bfloat16_input(backend, seqlen):
    """bfloat16 x with float32 weight and bias (computed in float32, as the reference's x.to(weight.dtype))."""
    inputs = make_inputs(2, 6, seqlen, 4, with_bias=True, seed=seqlen)
    inputs["x"] = inputs["x"].bfloat16().double()  # values exactly representable in bfloat16
    dtypes = {"x": torch.bfloat16, "weight": torch.float32, "bias": torch.float32}
    check_backend(backend, inputs, dtypes=dtypes, rtol={"out": 1e-5, "x": 8e-3, "weight": 1e-5, "bias": 1e-5})


def test_bfloat16_everywhere():
    """All-bfloat16 inputs: the cpu kernel computes in float32 and rounds its results to bfloat16."""
    inputs = {k: v.bfloat16().double() for k, v in make_inputs(2, 6, 200, 4, with_bias=True, seed=3).items()}
    check_backend("cpu", inputs, dtypes=dict.fromkeys(NAMES, torch.bfloat16), rtol=_uniform(2e-2))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["silu", None])
def test_gradcheck(with_bias, activation):
    """Finite differences in float64 at a tiny shape (L = 6 > W - 1 = 2, so both head and body are covered)."""
    inputs = make_inputs(2, 3, 6, 3, with_bias=with_bias, seed=1)
    leaves = [None if v is None else v.requires_grad_() for v in inputs.values()]

    def fn(x, weight, bias):
        return causal_conv1d(x, weight, bias, activation, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-9, rtol=1e-7)


def test_no_grad_path_and_saved_tensors():
    """Without autograd the same kernel gives the same numbers (exact: one kernel, one machine); with it, the graph
    keeps only x, weight and bias (the reference keeps the (B, E, L + W - 1) pre-activation as well)."""
    inputs = {k: v.float() for k, v in make_inputs(2, 4, 100, 4, with_bias=True, seed=5).items()}
    with torch.no_grad():
        out_ng = causal_conv1d(*inputs.values(), backend="cpu")
    leaves = [v.clone().requires_grad_() for v in inputs.values()]
    out = causal_conv1d(*leaves, backend="cpu")
    assert torch.equal(out_ng, out.detach()) and out.is_contiguous()
    saved = out.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(2, 4, 100), (4, 1, 4), (4,)]


def test_strided_input():
    """x may be a strided view (the faithful path's (B, 2E, L) chunk of a transposed projection)."""
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(2, 40, 12, generator=g).transpose(1, 2)  # (B, 2E, L) view of (B, L, 2E)
    x = xz.chunk(2, dim=1)[0]  # (B, E, L), strided
    weight, bias = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    want = causal_conv1d_reference(x.double(), weight.double(), bias.double(), "silu")
    assert_close_maxnorm(causal_conv1d(x, weight, bias, backend="cpu"), want, 1e-5, "out")


def test_auto_backend_choice(monkeypatch):
    """auto: the fused kernel on CPU, but the reference wherever the scan is forced to the reference (the faithful
    path reproduces the official arithmetic bit for bit)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    x = torch.zeros(1, 2, 3)
    assert resolve_conv_backend(x) == "cpu" and resolve_conv_backend(x, "reference") == "reference"
    with use_backend("reference"):
        assert resolve_conv_backend(x) == "reference"
        assert resolve_conv_backend(x, "cpu") == "cpu"  # an explicit argument wins
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_conv_backend(x) == "reference"
    inputs = {k: v.float() for k, v in make_inputs(1, 3, 9, 4, with_bias=True, seed=2).items()}
    assert torch.equal(causal_conv1d(*inputs.values()), causal_conv1d_reference(*inputs.values(), "silu"))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(weight=a["weight"][:-1]), "weight must be"),
        (lambda a: a.update(weight=a["weight"].expand(-1, 2, -1)), "weight must be"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias must be"),
        (lambda a: a.update(x=a["x"][0]), "x must be"),
        (lambda a: a.update(activation="relu"), "activation must be"),
    ],
)
def test_bad_inputs_are_errors(change, message):
    """The kernels do not bounds-check, so shapes are checked before them."""
    args = {k: v.float() for k, v in make_inputs(2, 4, 10, 4, with_bias=True, seed=0).items()}
    args["activation"] = "silu"
    change(args)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**args, backend="cpu")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown causal-conv1d backend 'cuda'"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 1, 4), backend="cuda")
