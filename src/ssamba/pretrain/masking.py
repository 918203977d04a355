"""Which patches to mask for masked spectrogram patch modelling (SSAST ``ASTModel.gen_maskid_patch`` /
``gen_maskid_frame``, reused unchanged by SSAMBA).

Shape glossary
    B  batch      N  valid patches of an item (packed, frequency-major: index = f * Tg_b + t)
    Tg_b  time columns of item b     M  masked patches per item (the same for every item of a batch)

Official cluster masking, per clip: a cluster size c is drawn from {3, 4, 5}; random start patches s are
drawn from [0, N) one after another, each adding the c x c block ``s + Tg*i + j`` (i, j < c; a block may
spill into the next frequency row) restricted to 0 < idx < N - so patch 0 is never masked - until the
union holds more than M patches; the first M of ``list(set(ids))`` are kept. For the official grids
(N <= 512) CPython iterates such a set in ascending order, so that is "the M lowest". The vectorised
version below draws the same distribution from a ``torch.Generator``; ``official_cluster_mask`` is the
upstream algorithm verbatim (Python ``random``), which reproduces the conformance fixtures' indices.
Frame masking (for 128x2 frame tokens, Fg = 1): M distinct indices uniformly from [0, N) (patch 0 allowed,
as upstream ``random.sample(range(0, N), M)``).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

__all__ = ["cluster_patch_mask", "frame_mask", "mask_count", "official_cluster_mask"]

# SSAST/SSAMBA recipes: 400 of the 512 patches of a 1024-frame, 128-bin input (16x16 patches).
OFFICIAL_MASK_PATCH = 400
OFFICIAL_NUM_PATCHES = 512


def mask_count(num_patches: int, mask_patch: int = OFFICIAL_MASK_PATCH, reference: int = OFFICIAL_NUM_PATCHES) -> int:
    """Masked patches for clips of ``num_patches`` patches, scaled from ``mask_patch`` of ``reference``
    (official 400 of 512, ~78%) and capped at N - 2 so that cluster masking can always finish (it needs
    more than M candidates among patches 1..N-1). A 1 s clip (96 frames, 48 patches) gets 37."""
    if num_patches < 3:
        raise ValueError(f"masking needs at least 3 patches per clip, got {num_patches}")
    return max(1, min(num_patches - 2, mask_patch * num_patches // reference))


def official_cluster_mask(
    num_patches: int, mask_size: int, num_patch_t: int, rng: random.Random, cluster: int = 3
) -> Tensor:
    """Upstream ``gen_maskid_patch`` verbatim, with the module-level ``random`` replaced by ``rng``.
    Returns (M,) indices in upstream order (ascending for N <= 512)."""
    mask_id: list[int] = []
    cur_clus = rng.randrange(cluster) + 3  # cluster size in {3, 4, 5}
    while len(set(mask_id)) <= mask_size:
        start_id = rng.randrange(num_patches)
        for i in range(cur_clus):
            for j in range(cur_clus):
                cand = start_id + num_patch_t * i + j
                if 0 < cand < num_patches:
                    mask_id.append(cand)
    return torch.tensor(list(set(mask_id))[:mask_size])


def cluster_patch_mask(
    num_patches: Tensor, time_columns: Tensor, mask_size: int, generator: torch.Generator, chunk: int = 64
) -> Tensor:
    """Official cluster masking, vectorised over the batch.

    num_patches (B,) valid patches per item, time_columns (B,) their grid width -> (B, M) sorted indices.
    Starts are drawn ``chunk`` at a time for every item (on CPU, from ``generator``); an item is finished at
    the first start after which its union holds more than M patches, exactly like the upstream loop.
    """
    n = num_patches.to(torch.long).cpu()
    tg = time_columns.to(torch.long).cpu()
    batch, width = n.shape[0], int(n.max())
    if bool((n - 2 < mask_size).any()):
        raise ValueError(f"cannot mask {mask_size} patches of an item with {int(n.min())} (at most N - 2)")
    size = torch.randint(3, 6, (batch,), generator=generator)  # (B,) cluster size per clip
    offsets = torch.arange(5)
    union = torch.zeros(batch, width, dtype=torch.bool)  # (B, N_max) patches masked so far
    done = torch.zeros(batch, dtype=torch.bool)
    while not bool(done.all()):
        starts = (torch.rand(batch, chunk, generator=generator) * n[:, None]).long()  # (B, K) uniform in [0, N_b)
        # c x c block of each start: (B, K, 5, 5) candidates, those with i or j >= c switched off
        cand = starts[..., None, None] + tg[:, None, None, None] * offsets[:, None] + offsets
        inside = (offsets[:, None] < size[:, None, None, None]) & (offsets < size[:, None, None, None])
        valid = inside & (cand > 0) & (cand < n[:, None, None, None])
        cover = torch.zeros(batch, chunk, width + 1, dtype=torch.int32)  # column `width` collects invalid ones
        cover.scatter_(2, torch.where(valid, cand, width).flatten(2), 1)
        cover = cover[..., :width].cumsum(1).clamp_(max=1).bool() | union[:, None]  # (B, K, N) union after k
        count = cover.sum(-1)  # (B, K)
        over = count > mask_size
        reached = over.any(1)
        first = over.long().argmax(1)  # first k with more than M patches
        last = torch.where(reached, first, chunk - 1)
        new_union = cover[torch.arange(batch), last]
        union = torch.where(done[:, None], union, new_union)
        done |= reached
    keep = union & (union.cumsum(1) <= mask_size)  # the M lowest of each union
    return keep.nonzero()[:, 1].view(batch, mask_size)


def frame_mask(num_patches: Tensor, mask_size: int, generator: torch.Generator) -> Tensor:
    """Random frame masking: (B,) valid tokens -> (B, M) sorted distinct indices, uniform over [0, N_b)."""
    n = num_patches.to(torch.long).cpu()
    if bool((n < mask_size).any()):
        raise ValueError(f"cannot mask {mask_size} frames of an item with {int(n.min())}")
    score = torch.rand(n.shape[0], int(n.max()), generator=generator)  # (B, N_max)
    score[torch.arange(score.shape[1]) >= n[:, None]] = 2.0  # padding is never picked
    return score.topk(mask_size, dim=1, largest=False).indices.sort(dim=1).values
