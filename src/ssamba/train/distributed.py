"""Process group set-up for ``torchrun`` (the rank-aware, resumable batch sampler is ``ssamba.data.sampler``).

Under torchrun (WORLD_SIZE > 1) the group uses NCCL on CUDA and gloo on CPU; multi-node runs use torchrun's
standard rendezvous flags (``--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT``), nothing here changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed"]


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
