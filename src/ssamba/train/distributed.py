"""Process group set-up for ``torchrun`` and a resumable, rank-aware batch sampler.

Under torchrun (WORLD_SIZE > 1) the group uses NCCL on CUDA and gloo on CPU; multi-node runs use torchrun's
standard rendezvous flags (``--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT``), nothing here changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "ResumableBatchSampler", "setup_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over processes (identity in one process)."""
        if self.enabled:
            _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM), [t])
            t /= self.world
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped (n, ...) tensors of every rank in rank order."""
        if not self.enabled:
            return t
        out = [torch.empty_like(t) for _ in range(self.world)]
        _collective(lambda: dist.all_gather(out, t), [t, *out])
        return torch.cat(out)

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX), [t])
        return bool(t.item())

    def broadcast(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        _collective(lambda: dist.broadcast(t, src=0), [t])
        return float(t.item())


def _collective(op, tensors: list[torch.Tensor]) -> None:
    """Run the blocking collective ``op()`` and, on CPU (gloo), return only once gloo has let go of ``tensors``.

    Why: gloo's worker thread drops its references to a collective's tensors a moment *after* the caller's
    wait has returned (measured on 2 CPU processes: after ~40% of all_reduces the tensor was still held), and
    dropping the last C++ reference to a tensor made in Python takes the GIL (torch decrefs its PyObject). If
    the interpreter is finalizing by then, take_gil ends the thread with pthread_exit inside a noexcept
    destructor and the process aborts: "terminate called without an active exception" (core of an aborted
    rank: pt_gloo_runloop, ~AsyncBarrierWork -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject ->
    take_gil -> pthread_exit -> std::terminate; the main thread in Py_FinalizeEx). A dist.barrier() right
    after the last all_reduce can even keep that work alive until the barrier itself is freed on the worker,
    and destroy_process_group() does not stop gloo's threads. So wait, sleeping (GIL released), until each
    tensor's use count is back to what it was before the collective; NCCL (CUDA tensors) is left alone.
    """
    before = [t._use_count() for t in tensors] if _HAS_USE_COUNT else []
    op()
    if not before or tensors[0].device.type != "cpu":
        return
    deadline = time.monotonic() + 10.0  # never hang on this: it is teardown hygiene, not correctness
    while any(t._use_count() > n for t, n in zip(tensors, before, strict=True)) and time.monotonic() < deadline:
        time.sleep(1e-4)


_HAS_USE_COUNT = hasattr(torch.Tensor, "_use_count")


def setup_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


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
