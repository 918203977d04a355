"""The non-finite step guard shared by every training loop (pretraining, fine-tuning incl. the linear probe and
k folds, HuBERT pretraining, CTC and reconstruction).

Why one guard: the three loops had drifted (pretraining skipped and counted, HuBERT raised a bare RuntimeError,
fine-tuning stepped the optimiser on a NaN loss and trained on garbage). The rule now lives here once:

* a step whose loss is NaN or inf never reaches the weights: its gradients are zeroed, the optimizer (and a
  GradScaler) is not stepped, the step is logged as ``{"step", "skipped": True, "reason", "skipped_steps"}``
  and counted;
* a good step resets the in-a-row count;
* ``max_bad_steps`` skipped steps in a row raise :class:`NonFiniteLossError` naming the cause, what to try,
  and the last checkpoint on disk (the CLI prints that one line and exits 2);
* :meth:`NonFiniteGuard.check_weights` runs before anything is written (checkpoint, best model), so a diverged
  model never overwrites a good checkpoint with NaN / inf weights.

Under DDP the loops give the guard the loss already averaged over processes, so every process takes the same
decision at the same step (a skip on one rank and a step on another would desynchronise the replicas).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ssamba.train.checkpoint import latest_checkpoint

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Training diverged: too many skipped steps (non-finite loss, or no usable item) in a row, or non-finite
    weights about to be saved. The message is one line naming the cause and what to do."""


class NonFiniteGuard:
    """Skip-and-count of non-finite steps; see the module docstring.

    max_bad_steps: skipped steps in a row that stop the run (the loops' ``train.max_bad_steps``; 0 or less
                   stops at the first, as 1 does).
    log:           called with the skipped step's entry (RUN/metrics.jsonl); None on non-main DDP ranks.
    checkpoints:   the run's checkpoint folder, named (with its newest checkpoint) in the error.
    """

    def __init__(self, max_bad_steps: int, log: Callable[[dict], None] | None = None,
                 checkpoints: Path | None = None):
        self.max_bad_steps = max(1, max_bad_steps)
        self.log = log
        self.checkpoints = checkpoints
        self.bad_in_row = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict:
        return {"bad_in_row": self.bad_in_row, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's state.json (checkpoints written before the guard hold neither key: zeros)."""
        self.bad_in_row = int(state.get("bad_in_row", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def check(self, loss: float, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """True: ``loss`` is finite, step the optimizer (the in-a-row count is reset). False: the step was
        skipped (see :meth:`skip`). ``step`` is the number the loop logs this step under."""
        if math.isfinite(loss):
            self.bad_in_row = 0
            return True
        self.skip(step, optimizer, f"non-finite loss {loss}")
        return False

    def skip(self, step: int, optimizer: torch.optim.Optimizer, reason: str) -> None:
        """Drop this step's gradients without an update, log and count it; raise after ``max_bad_steps`` in a
        row. The caller still consumes the batch (advances its sampler), so a resumed run skips it too."""
        optimizer.zero_grad(set_to_none=True)
        self.bad_in_row += 1
        self.skipped_steps += 1
        if self.log is not None:
            self.log({"step": step, "skipped": True, "reason": reason, "skipped_steps": self.skipped_steps})
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"training diverged: {self.bad_in_row} skipped steps in a row (step {step}, last: {reason}; "
                f"{self.skipped_steps} skipped in all); lower optim.lr, set optim.grad_clip, or check the data "
                f"(normalisation, bad files); {self._kept()}"
            )

    def check_weights(self, module: torch.nn.Module, step: int) -> None:
        """Raise before a save when any parameter or buffer is NaN / inf (a finite loss can still be followed
        by an update that overflows): nothing non-finite is ever written over a good checkpoint."""
        with torch.no_grad():
            for name, value in [*module.named_parameters(), *module.named_buffers()]:
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise NonFiniteLossError(
                        f"training diverged: weight {name} is NaN or infinite after step {step}; nothing saved; "
                        f"lower optim.lr or set optim.grad_clip; {self._kept()}"
                    )

    def _kept(self) -> str:
        last = latest_checkpoint(self.checkpoints) if self.checkpoints is not None else None
        return f"last good checkpoint: {last}" if last is not None else "no checkpoint was written"
