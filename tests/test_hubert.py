"""HuBERT / Mamba-HuBERT model, span masking and masked-prediction loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssamba.models import load_pretrained
from ssamba.models.hubert import HuBERTConfig, HuBERTModel, conv_frames, create_hubert
from ssamba.nn.conformer import ConformerBlock
from ssamba.pretrain.hubert_loss import IGNORE, HuBERTPretraining, downsample_labels, span_mask
from tests.conftest import FP32_REORDER, FP32_REORDER_DEEP

VARIANTS = [
    ("transformer", {}),
    ("extbimamba", {}),
    ("extbimamba", {"combine": "concat", "use_ffn": False}),
    ("innbimamba", {}),
    ("conbimamba", {}),
    ("conbimamba", {"use_ffn": False}),
]


def _model(encoder: str, **overrides) -> HuBERTModel:
    torch.manual_seed(0)
    return create_hubert(encoder, "tiny", **overrides).eval()


def test_frame_count_formula_and_20ms_hop():
    c = HuBERTConfig()
    assert c.hop == 320 and c.frame_rate == 50.0
    assert conv_frames(16000, c.conv_kernels, c.conv_strides) == 49  # floor((16000 - 400) / 320) + 1
    for s in (400, 719, 720, 16000, 23456):
        assert conv_frames(s, c.conv_kernels, c.conv_strides) == (s - 400) // 320 + 1
    assert conv_frames(torch.tensor([399, 400, 720]), c.conv_kernels, c.conv_strides).tolist() == [0, 1, 2]


@pytest.mark.parametrize("samples", [400, 1000, 8000])
def test_output_shapes_match_the_formula(samples):
    model = _model("extbimamba")
    outputs, lengths = model.extract_features(torch.randn(2, samples))
    t = (samples - 400) // 320 + 1
    assert len(outputs) == model.config.depth
    assert all(o.shape == (2, t, model.config.embed_dim) for o in outputs)
    assert lengths.tolist() == [t, t]


def test_too_short_waveform_is_an_error():
    with pytest.raises(ValueError, match="receptive field"):
        _model("transformer").extract_features(torch.randn(1, 399))


@pytest.mark.parametrize("encoder,overrides", VARIANTS)
def test_padding_invariance(encoder, overrides):
    """A padded batch gives, on each item's valid frames and at every layer, what the item alone gives."""
    model = _model(encoder, **overrides)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4800, 3200, 2000])
    x = torch.randn(3, 4800, generator=gen)
    x[1, 3200:] = 100.0  # garbage in the padding must not matter
    x[2, 2000:] = -7.0
    with torch.no_grad():
        outs, frames = model.extract_features(x, lengths)
        for b in range(3):
            alone, f1 = model.extract_features(x[b : b + 1, : lengths[b]], lengths[b : b + 1])
            n = int(f1[0])
            assert int(frames[b]) == n
            for layer, (o_batch, o_alone) in enumerate(zip(outs, alone, strict=True)):
                torch.testing.assert_close(o_batch[b, :n], o_alone[0], **FP32_REORDER_DEEP,
                                           msg=lambda m, layer=layer: f"layer {layer}: {m}")
                assert bool((o_batch[b, n:] == 0).all())


def test_masked_group_norm_equals_group_norm_without_padding():
    model = _model("transformer")
    x = torch.randn(2, 32, 50)
    ref = F.group_norm(x, 32, model.feature_extractor.norm.weight, model.feature_extractor.norm.bias, 1e-5)
    torch.testing.assert_close(model.feature_extractor.norm(x, torch.tensor([50, 50])), ref, **FP32_REORDER)


def test_conformer_attention_block_padding_invariance():
    torch.manual_seed(0)
    block = ConformerBlock(16, "attention", num_heads=2, kernel_size=5).eval()
    x = torch.randn(2, 12, 16)
    lengths = torch.tensor([12, 7])
    with torch.no_grad():
        y = block(x, lengths)
        alone = block(x[1:, :7], None)
    torch.testing.assert_close(y[1, :7], alone[0], **FP32_REORDER)


def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = _model("conbimamba", combine="concat")
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, HuBERTModel) and loaded.input_kind == "waveform"
    assert loaded.config == model.config
    loaded.eval()
    x = torch.randn(1, 4000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="depht"):
        HuBERTConfig.from_dict({"depht": 3})
    with pytest.raises(ValueError, match="encoder must be"):
        HuBERTConfig(encoder="lstm")


# ------------------------------------------------------------------------------------------------- masking


def _runs(row: torch.Tensor) -> list[int]:
    runs, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_span_mask_statistics():
    gen = torch.Generator().manual_seed(0)
    t, span, p = 500, 10, 0.8
    fractions = []
    for _ in range(200):
        m = span_mask(torch.tensor([t]), t, p, span, generator=gen)
        fractions.append(float(m.float().mean()))
        assert min(_runs(m[0])) >= span  # unions of whole spans (one item: nothing is thinned)
    # n = 40 spans of 10 among 491 starts, overlapping: expected coverage ~ 1 - (1 - 10/491)^40 = 0.56
    expected = 1 - (1 - span / (t - span + 1)) ** (p * t / span)
    assert abs(sum(fractions) / len(fractions) - expected) < 0.03
    assert max(fractions) < p  # overlap keeps it under mask_prob


def test_span_mask_padding_and_equal_counts():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([100, 60, 35])
    m = span_mask(lengths, 100, generator=gen)
    assert not bool(m[1, 60:].any()) and not bool(m[2, 35:].any())
    counts = m.sum(1)
    assert bool((counts == counts[0]).all()) and int(counts[0]) > 0
    free = span_mask(lengths, 100, generator=gen, same_count=False)
    assert not bool(free[2, 35:].any())
    assert not bool(span_mask(lengths, 100, mask_prob=0.0).any())
    a = span_mask(lengths, 100, generator=torch.Generator().manual_seed(5))
    b = span_mask(lengths, 100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_downsample_labels_100hz_to_50hz():
    labels = torch.arange(10)[None, :]
    assert downsample_labels(labels, 100, 50, 5).tolist() == [[0, 2, 4, 6, 8]]
    assert downsample_labels(labels, 100, 50, 6).tolist() == [[0, 2, 4, 6, 8, IGNORE]]
    assert downsample_labels(labels, 50, 50, 3).tolist() == [[0, 1, 2]]


# ------------------------------------------------------------------------------------------------- loss


def test_cosine_logits_and_cross_entropy_by_hand():
    model = _model("transformer", embed_dim=4, num_heads=2, pos_conv_groups=2)
    obj = HuBERTPretraining(model, num_classes=3, final_dim=2, logit_temp=0.1)
    with torch.no_grad():
        obj.final_proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        obj.final_proj.bias.zero_()
        obj.label_embs.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    h = torch.tensor([[3.0, 4.0, 9.0, 9.0]])  # projects to (3, 4), |.| = 5
    logits = obj.logits(h)[0].tolist()
    cos = [3 / 5, 4 / 5, (3 + 4) / (5 * math.sqrt(2))]
    assert logits == pytest.approx([c / 0.1 for c in cos], abs=1e-5)  # float32 cosines / 0.1: ~10 u of 10
    target = 1
    ce = -math.log(math.exp(cos[target] / 0.1) / sum(math.exp(c / 0.1) for c in cos))
    got = F.cross_entropy(obj.logits(h), torch.tensor([target])).detach()
    assert got.item() == pytest.approx(ce, abs=1e-5)  # a float32 log-sum-exp of O(10) logits vs float64


def test_loss_uses_masked_frames_and_feature_penalty():
    torch.manual_seed(0)
    model = create_hubert("extbimamba", "tiny")
    model.eval()  # no dropout: the recomputation below must see the same numbers
    obj = HuBERTPretraining(model, num_classes=5, unmasked_weight=0.5, feature_pen_weight=10.0)
    wave, lengths = torch.randn(2, 4000), torch.tensor([4000, 3000])
    t = int(model.frame_lengths(torch.tensor([4000]))[0])
    targets = torch.randint(0, 5, (2, t))
    targets[0, 3] = IGNORE
    mask = span_mask(model.frame_lengths(lengths), t, generator=torch.Generator().manual_seed(0))
    out = obj(wave, lengths, targets, mask)
    feats, frames = model.cnn_features(wave, lengths)
    _, hidden = model.encode(feats, frames, mask)
    valid = torch.arange(t)[None] < frames[:, None]
    sel_m = valid & mask & (targets != IGNORE)
    sel_u = valid & ~mask & (targets != IGNORE)
    ce_m = F.cross_entropy(obj.logits(hidden[sel_m]), targets[sel_m])
    ce_u = F.cross_entropy(obj.logits(hidden[sel_u]), targets[sel_u])
    pen = feats.pow(2).mean()
    # the same float32 terms summed in another order: relative rounding of a few u
    assert out.loss.item() == pytest.approx((ce_m + 0.5 * ce_u + 10 * pen).item(), rel=1e-5)
    assert out.n_masked == int(sel_m.sum()) and out.n_unmasked == int(sel_u.sum())
    assert 0.0 <= float(out.acc_m) <= 1.0


@pytest.mark.parametrize("encoder", ["transformer", "extbimamba"])
def test_a_few_training_steps_lower_the_loss(encoder):
    torch.manual_seed(0)
    model = create_hubert(encoder, "tiny")
    obj = HuBERTPretraining(model, num_classes=4)
    wave = torch.randn(2, 6400)
    lengths = torch.tensor([6400, 6400])
    t = int(model.frame_lengths(torch.tensor([6400]))[0])
    targets = (torch.arange(t)[None].repeat(2, 1) // 5) % 4  # a learnable pattern of positions
    mask = span_mask(torch.tensor([t, t]), t, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = obj(wave, lengths, targets, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss_m))
    assert losses[-1] < 0.7 * losses[0]
