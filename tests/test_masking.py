"""Mask generators: official cluster masking (fixture indices), vectorised version's invariants, frame masking."""

import json
import random

import pytest
import torch

from ssamba.pretrain.masking import cluster_patch_mask, frame_mask, mask_count, official_cluster_mask
from tests.conftest import conformance_dir


@pytest.mark.parametrize("name", ["ssamba_a", "ssast_a"])
def test_official_algorithm_reproduces_fixture_indices(name):
    folder = conformance_dir(name)
    config = json.loads((folder / "config.json").read_text())
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    for objective in ("mpc", "mpg"):
        rng = random.Random(config[f"python_random_seed_before_{objective}"])
        got = torch.stack([official_cluster_mask(128, config["mask_patch"], 16, rng) for _ in range(config["batch"])])
        assert torch.equal(got, outputs[f"{objective}_mask_index"])


def test_cluster_mask_invariants():
    n = torch.tensor([128, 96, 48, 128])
    tg = n // 8
    m = mask_count(48)
    assert m == 37
    mask = cluster_patch_mask(n, tg, m, torch.Generator().manual_seed(0))
    assert mask.shape == (4, m)
    for row, count in zip(mask, n.tolist(), strict=True):
        assert len(set(row.tolist())) == m  # unique, exact count
        assert row.min() > 0 and row.max() < count  # patch 0 never masked, only valid patches
        assert torch.equal(row, row.sort().values)
    again = cluster_patch_mask(n, tg, m, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, cluster_patch_mask(n, tg, m, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="at most N - 2"):
        cluster_patch_mask(n, tg, 47, torch.Generator())


def test_cluster_mask_forms_clusters():
    """Masked patches come in blocks: most have a masked right or lower neighbour (random picks would not)."""
    n, tg, m = torch.full((16,), 512), torch.full((16,), 64), 100
    mask = cluster_patch_mask(n, tg, m, torch.Generator().manual_seed(3))
    dense = torch.zeros(16, 512, dtype=torch.bool)
    dense.scatter_(1, mask, True)
    grid = dense.view(16, 8, 64)
    neighbour = grid[:, :, :-1] & (grid[:, :, 1:])
    share = neighbour.sum() / grid.sum()
    assert share > 0.6  # uniform random masking of 100/512 gives ~0.19


def test_cluster_mask_matches_official_distribution():
    """Mean index and per-row spread agree with the upstream algorithm (same M, same grid)."""
    rng = random.Random(0)
    official = torch.stack([official_cluster_mask(128, 64, 16, rng) for _ in range(300)]).float()
    ours = cluster_patch_mask(torch.full((300,), 128), torch.full((300,), 16), 64, torch.Generator().manual_seed(0))
    assert abs(official.mean() - ours.float().mean()) < 1.0
    assert abs(official.max(1).values.mean() - ours.float().max(1).values.mean()) < 2.0


def test_frame_mask():
    n = torch.tensor([64, 40])
    mask = frame_mask(n, 30, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 30)
    assert all(len(set(r.tolist())) == 30 for r in mask) and mask[1].max() < 40
    assert torch.equal(mask, frame_mask(n, 30, torch.Generator().manual_seed(0)))
