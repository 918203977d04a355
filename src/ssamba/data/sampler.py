"""The resumable, rank-aware batch sampler every training loop uses: the data order of a run is a function of its
seed and position, so a resumed run or one on W processes sees exactly the batches of one uninterrupted process."""

from __future__ import annotations

import torch

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler:
    """Shuffled global batches, split into micro-batches and across ranks, resumable mid-epoch.

    Each epoch is a permutation of the dataset from ``seed + epoch`` (drop-last). A global batch of
    ``batch_size`` indices is cut into ``micro`` chunks; chunk a is cut into ``world`` contiguous slices and
    rank r gets slice r. So any world size sees the same global batches, which makes one process with
    ``grad_accum = W`` and W processes the same computation. ``advance()`` is called by the training loop
    once per consumed global batch (not by iteration: the DataLoader prefetches), and ``state_dict()``
    records {epoch, batch}, the position to resume from.
    """

    def __init__(self, num_items: int, batch_size: int, micro: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % (micro * world):
            raise ValueError(f"batch_size {batch_size} must divide by grad_accum * processes = {micro * world}")
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} items, fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.micro = num_items, batch_size, micro
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.batch) * self.micro

    def __iter__(self):
        epoch, start = self.epoch, self.batch  # fixed when the DataLoader starts iterating
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        per_micro = self.batch_size // self.micro
        per_rank = per_micro // self.world
        for g in range(start, self.batches_per_epoch):
            batch = order[g * self.batch_size : (g + 1) * self.batch_size]
            for a in range(self.micro):
                chunk = batch[a * per_micro : (a + 1) * per_micro]
                yield chunk[self.rank * per_rank : (self.rank + 1) * per_rank]

    def advance(self) -> None:
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.seed = state["epoch"], state["batch"], state["seed"]
