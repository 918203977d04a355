"""s3prl-style upstream: shapes, downsample rate, padding invariance, loading from folders."""

import pytest
import torch

from ssamba.models import create_model
from ssamba.tasks.upstream import UpstreamExpert
from tests.conftest import FP32_REORDER_DEEP


def columns(samples: int, tshape: int, tstride: int) -> int:
    frames = 1 + (samples - 400) // 160  # Kaldi fbank: 25 ms window, 10 ms shift, snip_edges
    return (frames - tshape) // tstride + 1


@pytest.mark.parametrize("name,kw,layers", [("ssamba_tiny", {"embed_dim": 32, "depth": 4}, 2),
                                            ("ssast_tiny", {"embed_dim": 32, "depth": 3, "num_heads": 2}, 3)])
def test_shapes_rate_and_padding_invariance(name, kw, layers):
    torch.manual_seed(0)
    model = create_model(name, input_tdim=128, tstride=8, **kw)
    up = UpstreamExpert(model=model)
    assert up.get_downsample_rates("hidden_states") == 160 * 8
    wavs = [torch.randn(n) * 0.1 for n in (16000, 9000, 12345)]
    with torch.no_grad():
        out = up(wavs)
        alone = [up([w]) for w in wavs]
    hs = out["hidden_states"]
    want = [columns(len(w), 16, 8) for w in wavs]
    assert len(hs) == layers and out["lengths"].tolist() == want
    assert all(h.shape == (3, max(want), 32) for h in hs)
    torch.testing.assert_close(out["last_hidden_state"], hs[-1])
    for b, n in enumerate(want):
        for layer in range(layers):
            got, ref = hs[layer][b, :n], alone[b]["hidden_states"][layer][0]
            assert ref.shape == (n, 32)
            torch.testing.assert_close(got, ref, **FP32_REORDER_DEEP)
            assert bool((hs[layer][b, n:] == 0).all())  # padding frames are zero


def test_loads_folders_and_rejects_bad_input(tmp_path):
    model = create_model("ssast_tiny", input_tdim=64, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    model.save_pretrained(tmp_path / "m")
    up = UpstreamExpert(tmp_path / "m", input_tdim=256)  # longer inputs: position embedding converted
    assert up.model.config.input_tdim == 256 and up.model.head is None
    with torch.no_grad():
        assert up([torch.randn(24000) * 0.1])["hidden_states"][0].shape[1] == columns(24000, 16, 16)
    with pytest.raises(ValueError, match="fewer than one patch"):
        up([torch.randn(1000)])
    with pytest.raises(ValueError, match="1-D"):
        up([torch.randn(2, 16000)])
    with pytest.raises(ValueError, match="exactly one"):
        UpstreamExpert()


def test_embed_pooled_and_tokens(tmp_path):
    import json

    import numpy as np
    from safetensors.torch import load_file

    from ssamba.audio import save_audio
    from ssamba.cli import main

    model = create_model("ssamba_tiny", input_tdim=64, embed_dim=32, depth=2)
    model.save_pretrained(tmp_path / "m")
    files = []
    for i, n in enumerate((8000, 6000)):
        files.append(tmp_path / f"c{i}.wav")
        save_audio(files[-1], (0.1 * np.random.default_rng(i).standard_normal(n)).astype(np.float32))
    assert main(["embed", "--model", str(tmp_path / "m"), *map(str, files), "--out", str(tmp_path / "e.npy")]) == 0
    pooled = np.load(tmp_path / "e.npy")
    summary = json.loads((tmp_path / "e.json").read_text())
    assert pooled.shape == (2, 2, 32) and summary["layers"] == 2 and summary["files"] == list(map(str, files))
    assert main(["embed", "--model", str(tmp_path / "m"), *map(str, files), "--out", str(tmp_path / "t"),
                 "--pool", "none", "--format", "safetensors"]) == 0  # fmt: skip
    tokens = load_file(str(tmp_path / "t.safetensors"))
    frames = 1 + (6000 - 400) // 160
    assert tokens["clip1"].shape == (2, 1 + 8 * ((frames - 16) // 16 + 1), 32)
    # pooled = mean of the valid patch tokens (special token excluded)
    np.testing.assert_allclose(pooled[1], tokens["clip1"][:, 1:].mean(1).numpy(), atol=1e-5)
