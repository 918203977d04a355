"""The fused CPU inference chain of the bidirectional mixer (ssamba.ops.bimamba_cpu) against the unfused fast path."""

from __future__ import annotations

import pytest
import torch

import ssamba
from ssamba.nn.mamba import InnerBiMamba
from ssamba.ops import use_backend
from tests.conftest import FP32_REORDER


def _mixer(dtype: torch.dtype, **kwargs) -> InnerBiMamba:
    torch.manual_seed(0)
    m = InnerBiMamba(32, **kwargs).to(dtype).eval()
    with torch.no_grad():  # away from the initialisation's symmetries (D = 1, A = -[1..N] in every channel)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _unfused(m: InnerBiMamba, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The same fast path through the separate kernels: autograd recording makes the mixer take it."""
    assert not m._fused_inference(x.requires_grad_())
    return m(x, lengths).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"d_state": 4, "divide_out": False}, {"d_state": 20, "bias": True},
                                    {"d_state": 8, "conv_bias": False, "d_conv": 6}],
                         ids=["tiny", "n4-no-halving", "n20-in-proj-bias", "no-conv-bias-w6"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_inference_agrees_with_the_unfused_fast_path(dtype, kwargs, padded):
    """Same conv and scan row code; dt_proj's rank-R sums and the gate's product are rounded in another order:
    float32 rounding of O(1) values through a few dozen operations, FP32_REORDER (tests/conftest.py). In float64 the
    same reorderings stay below 1e-12: the algebra (one gate after the direction sum, rev as a permutation, the
    in-place buffers) is the same function, not an approximation."""
    m = _mixer(dtype, **kwargs)
    x = torch.randn(3, 45, 32, dtype=dtype)
    lengths = torch.tensor([45, 30, 6]) if padded else None
    with torch.no_grad():
        assert m._fused_inference(x)
        fused = m(x, lengths)
    want = _unfused(m, x.clone(), lengths)
    tol = FP32_REORDER if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(fused, want, **tol)


def test_fused_inference_leaves_its_input_alone():
    m = _mixer(torch.float32)
    x = torch.randn(2, 20, 32)
    before = x.clone()
    with torch.no_grad():
        m(x)
    assert torch.equal(x, before)


def test_fused_chain_is_chosen_only_for_cpu_kernels_without_autograd():
    """The fused chain stands in for the cpu scan and conv backends on the fast path, and only when nothing needs
    a graph; the reference backends and the faithful path keep their own ops."""
    m = _mixer(torch.float32)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert m._fused_inference(x)
        with use_backend("reference"):
            assert not m._fused_inference(x)
        assert not _mixer(torch.float32, fast_path=False)._fused_inference(x)
        assert not m._fused_inference(x.to(torch.bfloat16))  # computed in float32 by the unfused kernels
    assert not m._fused_inference(x)  # grad mode with trainable weights
    for p in m.parameters():
        p.requires_grad_(False)
    assert m._fused_inference(x)  # frozen encoder, plain input: nothing to record


def test_ssamba_model_inference_agrees_with_its_training_path():
    """A whole (small) SSAMBA encoder, padded batch: inference (fused chain, and the backbone's early release of
    dead tensors) against the same model with autograd recording. Float32 reorderings through 4 layers:
    FP32_REORDER."""
    torch.manual_seed(0)
    model = ssamba.create_model("ssamba_tiny", embed_dim=48, depth=4, input_tdim=64, num_classes=5).eval()
    x = torch.randn(2, 64, 128)
    lengths = torch.tensor([64, 40])
    with torch.no_grad():
        fused = model(x, lengths)
    torch.testing.assert_close(fused, model(x, lengths).detach(), **FP32_REORDER)


def test_fused_inference_under_bf16_autocast():
    """Opt-in mixed precision: under torch.autocast(bfloat16) in_proj runs in bf16 and its results come back to the
    kernels' float32; the unfused path also runs x_proj and dt_proj in bf16. Both round the GEMM outputs to bf16
    (unit roundoff 2^-9 = 2e-3) a few times over O(1) values, so they agree to about 1e-2, and the fused path's
    output is bf16, as autocast's GEMMs make it."""
    m = _mixer(torch.float32)
    x = torch.randn(2, 30, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert m._fused_inference(x)
            fused = m(x)
        want = m(x).detach()
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), want.float(), rtol=2e-2, atol=2e-2)
