"""The HEAR 2021 API (ssamba.hear): attributes, shapes, dtypes, timestamps in ms, batch consistency, long sounds."""

import pytest
import torch

from ssamba import hear
from ssamba.models import create_model
from tests.conftest import FP32_REORDER


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hear") / "m"
    torch.manual_seed(0)
    create_model("ssamba_tiny", input_tdim=128, embed_dim=32, depth=2).save_pretrained(folder)
    return hear.load_model(str(folder))


def test_model_attributes(model):
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 32
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(ValueError, match="model folder"):
        hear.load_model("")


def test_timestamp_embeddings_shapes_spacing_and_batch_consistency(model):
    gen = torch.Generator().manual_seed(0)
    audio = (torch.rand(3, 16000 * 2, generator=gen) * 2 - 1) * 0.3  # 2 s, within one window (1.28 s: 2 windows)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    columns = ((1 + (32000 - 400) // 160) - 16) // 16 + 1
    assert emb.shape == (3, columns, 32) and ts.shape == (3, columns)
    assert emb.dtype == torch.float32 and ts.dtype == torch.float32
    assert torch.allclose(ts[0, :2], torch.tensor([87.5, 247.5]))  # column centres, milliseconds
    assert torch.allclose(ts.diff(dim=1), torch.full((3, columns - 1), 160.0))
    assert torch.equal(ts[0], ts[2])
    alone, _ = hear.get_timestamp_embeddings(audio[1:2], model)
    torch.testing.assert_close(emb[1:2], alone, **FP32_REORDER)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 32) and scene.dtype == torch.float32
    torch.testing.assert_close(scene, emb.mean(1))
    assert not torch.allclose(scene[0], scene[1])  # different sounds, different embeddings


def test_long_sounds_and_layers(model, tmp_path):
    audio = torch.sin(torch.arange(16000 * 30) * 0.07)[None] * 0.2  # 30 s: 23 windows of the 1.28 s model
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape[1] == ts.shape[1] and 30000 - 160 < float(ts[0, -1]) + 87.5 <= 30000
    assert torch.isfinite(emb).all()
    first = hear.load_model(model.encoder.save_pretrained(tmp_path / "again"), layer=0)
    emb0, ts0 = hear.get_timestamp_embeddings(audio[:, :16000], first)
    assert emb0.shape[-1] == 32 and not torch.allclose(emb0, hear.get_timestamp_embeddings(audio[:, :16000], model)[0])
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_timestamp_embeddings(audio[0], model)
