"""The fused CPU fast path of the Mamba mixers (ssamba.ops.mamba_inner_cpu) against the faithful path: outputs and
every gradient, for one direction (Mamba) and two (InnerBiMamba), with and without padding, training and inference."""

from __future__ import annotations

import pytest
import torch

import ssamba
from ssamba.nn.mamba import InnerBiMamba, Mamba
from ssamba.ops import use_backend
from ssamba.ops.mamba_infer_cpu import CHECKPOINT_STEPS
from tests.conftest import FP32_REORDER

CONFIGS = [{}, {"d_state": 4, "divide_out": False}, {"d_state": 20, "bias": True},
           {"d_state": 8, "conv_bias": False, "d_conv": 6}]  # fmt: skip
CONFIG_IDS = ["tiny", "n4-no-halving", "n20-two-state-blocks-biases", "no-conv-bias-w6"]


def _mixer(cls: type, dtype: torch.dtype, d_model: int = 32, **kwargs) -> Mamba:
    if cls is Mamba:
        kwargs.pop("divide_out", None)
    torch.manual_seed(0)
    m = cls(d_model, **kwargs).to(dtype)
    with torch.no_grad():  # away from the initialisation's symmetries (D = 1, A = -[1..N] in every channel)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _faithful(m: Mamba, x: torch.Tensor, lengths: torch.Tensor | None, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (x, then every parameter) of the same weights on the faithful path."""
    ref = type(m)(m.in_proj.in_features, fast_path=False, **_kwargs(m)).to(x.dtype)
    ref.load_state_dict(m.state_dict())
    x = x.detach().requires_grad_()
    out = ref(x, lengths)
    return [out.detach(), *torch.autograd.grad(out, [x, *ref.parameters()], grad)]


def _kwargs(m: Mamba) -> dict:
    kw = {"d_state": m.d_state, "d_conv": m.d_conv, "bias": m.in_proj.bias is not None,
          "conv_bias": m.conv1d.bias is not None}  # fmt: skip
    if isinstance(m, InnerBiMamba):
        kw["divide_out"] = m.divide_out
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("cls", [Mamba, InnerBiMamba])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_training_agrees_with_the_faithful_path(cls, dtype, kwargs, padded):
    """Outputs and the gradients of the input and of every parameter. What differs from the faithful path is the
    order of float32 sums (the GEMMs over all B*L tokens against per-token F.linear, dt_proj's rank-R sum as a
    loop, the taps of the conv, the readout, dB and dC over channel blocks, the sums over time in float32 per chunk
    and float64 across chunks): rounding of O(1) values through a few dozen operations, so
    FP32_REORDER (tests/conftest.py) relative to each tensor's largest entry. In float64 the same reorderings stay
    below 1e-12: the fused backward is the exact gradient, not an approximation."""
    m = _mixer(cls, dtype, **kwargs)
    x = torch.randn(3, 45, 32, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([45, 30, 6]) if padded else None
    assert m._fused(x)
    out = m(x, lengths)
    grad = torch.randn_like(out)
    got = [out.detach(), *torch.autograd.grad(out, [x, *m.parameters()], grad)]
    want = _faithful(m, x, lengths, grad)
    names = ["output", "input", *(n for n, _ in m.named_parameters())]
    rtol = FP32_REORDER["rtol"] if dtype == torch.float32 else 1e-12
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)
    with torch.no_grad():  # inference: ops/mamba_infer_cpu's token-major kernels
        torch.testing.assert_close(m(x, lengths), got[0], rtol=rtol, atol=rtol * got[0].abs().max().item())


@pytest.mark.parametrize("seqlen", [CHECKPOINT_STEPS, CHECKPOINT_STEPS + 1, 2 * CHECKPOINT_STEPS + 7])
def test_fused_training_across_checkpoint_chunks(seqlen):
    """The scan's backward recomputes each chunk of CHECKPOINT_STEPS steps from the forward's checkpoint (none for
    the first chunk): one chunk exactly, one step past it, and three chunks, padded, in float64, where the fused
    gradients equal the faithful ones to 1e-12."""
    m = _mixer(InnerBiMamba, torch.float64)
    x = torch.randn(2, seqlen, 32, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([seqlen, seqlen - 3])
    out = m(x, lengths)
    grad = torch.randn_like(out)
    got = [out.detach(), *torch.autograd.grad(out, [x, *m.parameters()], grad)]
    want = _faithful(m, x, lengths, grad)
    for name, a, b in zip(["output", "input", *(n for n, _ in m.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("d_model", [12, 40], ids=["E24", "E80"])
@pytest.mark.parametrize("cls", [Mamba, InnerBiMamba])
def test_inference_agrees_with_the_faithful_path_on_partial_channel_blocks(cls, d_model):
    """The token-major inference scans blocks of mamba_infer_cpu._CHANNELS = 64 channels, a last partial block in
    its own compiled loop: E = 24 is one partial block, E = 80 a full one and a partial one. Padded batch, the same
    tolerance as above."""
    m = _mixer(cls, torch.float32, d_model=d_model)
    x = torch.randn(3, 37, d_model)
    lengths = torch.tensor([37, 20, 1])
    with torch.no_grad():
        got = m(x, lengths)
    want = _faithful(m, x, lengths, torch.zeros(3, 37, d_model))[0]
    rtol = FP32_REORDER["rtol"]
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_fused_path_leaves_its_input_alone():
    m = _mixer(InnerBiMamba, torch.float32)
    x = torch.randn(2, 20, 32)
    before = x.clone()
    with torch.no_grad():
        m(x)
    m(x.requires_grad_()).sum().backward()
    assert torch.equal(x.detach(), before)


def test_fused_path_checks_lengths():
    """The kernels index with the lengths unchecked, so the glue checks them."""
    m = _mixer(InnerBiMamba, torch.float32)
    with pytest.raises(ValueError, match="valid lengths"):
        m(torch.randn(2, 10, 32), torch.tensor([10, 11]))


def test_fused_backward_runs_again_with_a_retained_graph():
    """The backward doubles up its own gradient buffers but never writes a saved tensor, so a retained graph gives
    the same gradients twice (gradcheck, in tests/test_mamba.py, relies on it)."""
    m = _mixer(InnerBiMamba, torch.float32)
    out = m(torch.randn(2, 10, 32)).sum()
    first = torch.autograd.grad(out, list(m.parameters()), retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(out, list(m.parameters())), strict=True):
        assert torch.equal(a, b)


def test_fused_chain_is_chosen_only_for_the_cpu_kernels_on_the_fast_path():
    """The fused chain stands in for the cpu scan and conv backends on the fast path; the reference backends, the
    faithful path, half-precision inputs and autocast training keep the unfused ops."""
    m = _mixer(InnerBiMamba, torch.float32)
    x = torch.randn(2, 10, 32)
    assert m._fused(x)
    with use_backend("reference"):
        assert not m._fused(x)
    assert not _mixer(Mamba, torch.float32, fast_path=False)._fused(x)
    assert not m._fused(x.to(torch.bfloat16))  # computed in float32 by the unfused kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m._fused(x)  # mixed-precision training
        with torch.no_grad():
            assert m._fused(x)


def test_ssamba_model_inference_agrees_with_its_training_path():
    """A whole (small) SSAMBA encoder, padded batch: inference (the token-major kernels, and the backbone's early
    release of dead tensors) against the same model with autograd recording. Float32 reorderings through 4 layers:
    FP32_REORDER."""
    torch.manual_seed(0)
    model = ssamba.create_model("ssamba_tiny", embed_dim=48, depth=4, input_tdim=64, num_classes=5).eval()
    x = torch.randn(2, 64, 128)
    lengths = torch.tensor([64, 40])
    with torch.no_grad():
        fused = model(x, lengths)
    torch.testing.assert_close(fused, model(x, lengths).detach(), **FP32_REORDER)


def test_fused_inference_under_bf16_autocast():
    """Opt-in mixed precision: under torch.autocast(bfloat16) in_proj and out_proj run in bf16 and in_proj's results
    come back to the kernels' float32; the unfused path (the reference backends) also runs x_proj and dt_proj in
    bf16. Both round GEMM outputs to bf16 (unit roundoff 2^-9 = 2e-3) a few times over O(1) values, so they agree to
    about 1e-2, and the fused path's output is bf16, as autocast's GEMMs make it."""
    m = _mixer(InnerBiMamba, torch.float32)
    x = torch.randn(2, 30, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert m._fused(x)
        fused = m(x)
        with use_backend("reference"):
            want = m(x)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), want.float(), rtol=2e-2, atol=2e-2)
