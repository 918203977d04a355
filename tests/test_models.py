"""Spectrogram encoders: presets, forward/backward, padding consistency, checkpoints, configs, MSPM."""

import json

import pytest
import torch

from ssamba.models import SSAMBAModel, SSASTModel, create_model, list_models, load_pretrained, model_family
from ssamba.nn import TransformerBlock, official_resize_pos_embed
from ssamba.pretrain import MaskedPatchPretraining
from tests.conftest import FP32_REORDER

SMALL = dict(depth=2, input_tdim=48)


SPECTROGRAM_MODELS = [n for n in list_models() if model_family(n) in ("ssamba", "ssast")]
HUBERT_MODELS = [n for n in list_models() if model_family(n) == "hubert"]


def test_registry_lists_the_presets():
    assert set(SPECTROGRAM_MODELS) == {f"{f}_{s}" for f in ("ssamba", "ssast") for s in ("tiny", "small", "base")}
    assert set(HUBERT_MODELS) == {f"hubert_{e}_{s}" for e in ("transformer", "extbimamba", "innbimamba", "conbimamba")
                                  for s in ("base", "small", "tiny")}  # fmt: skip
    assert set(list_models()) == set(SPECTROGRAM_MODELS) | set(HUBERT_MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")


@pytest.mark.parametrize("name", HUBERT_MODELS)
def test_hubert_preset_builds_and_round_trips(name, tmp_path):
    """Every HuBERT preset through the registry: its sizes, one layer of it forward, and save -> load alone."""
    from ssamba.models import HuBERTModel
    from ssamba.models.hubert import hubert_presets

    _, encoder, size = name.split("_")
    model = create_model(name, depth=1)  # one layer keeps the base sizes quick to build
    assert isinstance(model, HuBERTModel) and model.config.encoder == encoder
    assert model.config.embed_dim == hubert_presets()[size].get("embed_dim", 768)
    loaded = load_pretrained(model.save_pretrained(tmp_path / name))
    wave = torch.randn(1, 3200)
    with torch.no_grad():  # exact by construction: the same weights, input and kernels on this machine
        torch.testing.assert_close(loaded.eval().extract_features(wave)[0][-1],
                                   model.eval().extract_features(wave)[0][-1], rtol=0, atol=0)


@pytest.mark.parametrize("name", SPECTROGRAM_MODELS)
def test_preset_builds_at_full_size(name):
    model = create_model(name)
    dim = {"tiny": 192, "small": 384, "base": 768}[name.split("_")[1]]
    assert model.config.embed_dim == dim
    assert model.config.depth == (24 if name.startswith("ssamba") else 12)
    assert model.pos_embed.shape == (1, model.num_special_tokens + 8 * 64, dim)  # 1024 frames, 16x16 patches


@pytest.mark.parametrize("name", SPECTROGRAM_MODELS)
def test_preset_forward_backward_small(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **SMALL)
    x = torch.randn(2, 48, 128)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    layers, token_lengths = model.extract_features(x)
    expected_layers = 1 if name.startswith("ssamba") else 2  # SSAMBA: one entry per layer pair
    assert len(layers) == expected_layers
    assert layers[0].shape == (2, model.num_special_tokens + 8 * 3, model.config.embed_dim)
    assert token_lengths.tolist() == [model.num_special_tokens + 24] * 2


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("ssamba_tiny", dict(depth=4, input_tdim=96, fstride=10, tstride=10)),
        ("ssast_tiny", dict(depth=2, input_tdim=96, fstride=10, tstride=10)),
        ("ssast_tiny", dict(depth=2, input_tdim=96, fstride=10, tstride=10, attn_impl="sdpa")),
        ("ssamba_tiny", dict(depth=2, input_tdim=64, fshape=128, tshape=2, fstride=128, tstride=2)),
    ],
    ids=["ssamba-s10", "ssast-s10", "ssast-sdpa", "ssamba-frames"],
)
def test_padded_items_equal_items_alone(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **overrides).eval()
    frames = overrides["input_tdim"]
    lengths = torch.tensor([frames, frames // 2 + 3, 17])
    x = torch.randn(3, frames, 128)
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 50.0  # padding frames with a loud value
    with torch.no_grad():
        layers, token_lengths = model.extract_features(x, lengths)
        tokens, _ = model.forward_features(x, lengths)
        logits = model(x, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = x[b : b + 1, :n]
            layers_alone, k = model.extract_features(alone)
            assert token_lengths[b] == k[0]
            k = int(k[0])
            for got, want in zip(layers, layers_alone, strict=True):
                torch.testing.assert_close(got[b, :k], want[0], **FP32_REORDER)
                if k < got.shape[1]:
                    assert got[b, k:].abs().max() == 0  # padding positions are zeroed
            torch.testing.assert_close(tokens[b, :k], model.forward_features(alone)[0][0], **FP32_REORDER)
            torch.testing.assert_close(logits[b], model(alone)[0], **FP32_REORDER)


def test_sdpa_matches_explicit_attention():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, attn_impl="explicit").eval()
    sdpa = TransformerBlock(32, 4, attn_impl="sdpa").eval()
    sdpa.load_state_dict(block.state_dict())
    x = torch.randn(3, 11, 32)
    lengths = torch.tensor([11, 6, 2])
    mask = torch.arange(11)[None, :] < lengths[:, None]
    for valid in (None, lengths):
        out_e, out_s = block(x, valid), sdpa(x, valid)
        rows = torch.ones_like(mask) if valid is None else mask
        torch.testing.assert_close(out_s[rows], out_e[rows], **FP32_REORDER)


@pytest.mark.parametrize("name", SPECTROGRAM_MODELS)
def test_every_spectrogram_preset_round_trips(name, tmp_path):
    """Every registered SSAMBA / SSAST preset saves and loads back through ``load_pretrained`` alone (the family is
    read from config.json), at its own width (two layers keep it quick)."""
    model = create_model(name, depth=2, input_tdim=48).eval()
    loaded = load_pretrained(model.save_pretrained(tmp_path / name)).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    x = torch.randn(1, 48, 128)
    with torch.no_grad():  # exact by construction: the same weights, input and kernels on this machine
        torch.testing.assert_close(loaded.extract_features(x)[0][-1], model.extract_features(x)[0][-1], rtol=0, atol=0)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    for name in ("ssamba_tiny", "ssast_tiny"):
        model = create_model(name, num_classes=5, **SMALL).eval()
        out = model.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        meta = json.loads((out / "config.json").read_text())
        assert meta["family"] == name.split("_")[0] and meta["config"]["num_classes"] == 5
        cls = SSAMBAModel if name.startswith("ssamba") else SSASTModel
        loaded = cls.from_pretrained(out).eval()
        x = torch.randn(2, 48, 128)
        with torch.no_grad():
            # exact by construction: the same weights, input and kernels on this machine
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        other = SSASTModel if cls is SSAMBAModel else SSAMBAModel
        with pytest.raises(ValueError, match="holds a"):
            other.from_pretrained(out)


def test_from_pretrained_with_new_grid_and_head(tmp_path):
    torch.manual_seed(0)
    model = create_model("ssast_tiny", **SMALL)
    model.save_pretrained(tmp_path)
    tuned = SSASTModel.from_pretrained(tmp_path, fstride=10, tstride=10, input_tdim=32, num_classes=7)
    want = official_resize_pos_embed(model.pos_embed, 2, (8, 3), (12, 2))
    torch.testing.assert_close(tuned.pos_embed.detach(), want)
    assert tuned.head.fc.out_features == 7
    torch.testing.assert_close(tuned.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


def test_config_errors():
    with pytest.raises(ValueError, match="bogus_key"):
        create_model("ssamba_tiny", bogus_key=1)
    with pytest.raises(ValueError, match="num_heads"):
        create_model("ssamba_tiny", num_heads=3)  # an SSAST field is unknown to SSAMBA
    with pytest.raises(ValueError, match="even"):
        create_model("ssamba_tiny", depth=3)
    with pytest.raises(ValueError, match="pool"):
        create_model("ssast_tiny", pool="max")
    model = create_model("ssast_tiny", **SMALL)
    with pytest.raises(ValueError, match="input_tdim"):
        model(torch.randn(1, 64, 128))
    with pytest.raises(ValueError, match="tshape"):
        model(torch.randn(2, 48, 128), torch.tensor([48, 10]))
    with pytest.raises(ValueError, match="128"):
        model(torch.randn(1, 48, 64))


@pytest.mark.parametrize("name", ["ssamba_tiny", "ssast_tiny"])
def test_mspm_objective(name):
    torch.manual_seed(0)
    objective = MaskedPatchPretraining(create_model(name, **SMALL)).eval()
    x = torch.randn(3, 48, 128)
    lengths = torch.tensor([48, 32, 20])  # 24, 16 and 8 patches
    mask = torch.stack([torch.randperm(8)[:5] for _ in range(3)])
    with torch.no_grad():
        out = objective.mpc(x, mask, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = objective.mpc(x[b : b + 1, :n], mask[b : b + 1])
            torch.testing.assert_close(out.pred[b], alone.pred[0], **FP32_REORDER)
        assert 0 <= out.acc <= 1 and out.nce > 0
    objective.train()
    step = objective(x, mask, mask.flip(1), lengths)
    step.loss.backward()
    torch.testing.assert_close(step.loss, step.nce + 10 * step.mse)
    assert objective.mask_embed.grad.abs().sum() > 0
    assert objective.cpredlayer[0].weight.grad is not None and objective.gpredlayer[2].weight.grad is not None
    with pytest.raises(ValueError, match="outside"):
        objective.mpg(x, torch.full((3, 2), 9), lengths)
