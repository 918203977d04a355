"""The one training engine under every task: pretraining, fine-tuning (the linear probe and k folds too), HuBERT
pretraining, CTC and reconstruction. A readable loop in nanoGPT's manner, not a framework: a task builds its model,
data and optimizer on an :class:`Engine`, then hands :meth:`Engine.fit` a step function and an eval function.

What the engine owns, so that no task repeats it:

* the run folder (one that holds checkpoints needs ``resume``) and its resolved ``config.json`` (rank 0);
* seeds of every RNG (torch, numpy, python) and the run's own generator ``gen`` (masks, augmentation);
* DDP under torchrun (gloo on CPU, NCCL on CUDA) with rank-0 I/O; the resumable sampler and its DataLoader;
* precision (``train.precision``): fp32, or bf16 / fp16 autocast with a GradScaler for fp16, on CPU and CUDA;
* gradient accumulation (``forward_context``: DDP's ``no_sync`` on all but the last micro-batch) and clipping;
* the non-finite guard (``ssamba.train.guard``), metrics.jsonl + TensorBoard, a progress bar;
* atomic safetensors + JSON checkpoints (model, optimizer, scaler, sampler position, every RNG, the guard, the
  task's own state), so that a resumed run continues exactly; SIGINT / SIGTERM finish the step, save and stop;
* the validation hook, and the untrained baseline at step 0.

One optimizer step of :meth:`Engine.fit`: ``step_fn(step)`` sets the learning rate and runs forward / backward over
its micro-batches -> the loss and metrics averaged over processes -> the guard (a non-finite loss: no update) ->
unscale, clip, step -> log -> validate -> checkpoint -> stop on a signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssamba.data.check import check_splits
from ssamba.data.sampler import ResumableBatchSampler
from ssamba.train.checkpoint import (
    catch_stop_signals,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from ssamba.train.distributed import setup_distributed
from ssamba.train.guard import NonFiniteGuard
from ssamba.train.logging import MetricsLog

__all__ = ["Engine", "check_data", "make_optimizer"]


def check_data(splits: dict, skip_bad: bool, log=None) -> None:
    """Every split's files from their headers, before anything is built (``ssamba.data.check``): a bad file stops
    the run in seconds; with ``skip_bad`` the counts are printed (by rank 0 under torchrun)."""
    main = int(os.environ.get("RANK", "0")) == 0
    check_splits({k: v for k, v in splits.items() if v}, skip_bad=skip_bad, log=(log or print) if main else None)


def make_optimizer(module: torch.nn.Module, o, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """Adam or AdamW (``o.name``) over the trainable parameters of ``module``, with the one weight-decay policy:
    ``o.decay = "all"`` decays every tensor (the official SSAST / SSAMBA recipes: ``weight_decay`` on all
    parameters), ``"matrices"`` leaves out biases, norm gains and tensors marked ``_no_weight_decay`` (mamba_ssm's
    A_log and D; fairseq's HuBERT). ``lr_scale(name)`` multiplies a tensor's learning rate (the official head_lr);
    every group carries its ``lr_scale`` for :meth:`Engine.set_lr`. Groups: scale 1 first, decaying first."""
    groups: dict[tuple, list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            decay = o.decay == "all" or (p.dim() >= 2 and not getattr(p, "_no_weight_decay", False))
            groups.setdefault((lr_scale(name) if lr_scale else 1.0, decay), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, not k[1]))  # stable: first appearance among equals
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls([{"params": groups[k], "lr_scale": k[0], "weight_decay": o.weight_decay if k[1] else 0.0}
                for k in order], lr=o.lr, betas=tuple(o.betas), eps=o.eps)  # fmt: skip


class Engine:
    """A run: ``Engine(run, cfg, resume)``, then ``prepare(module, dataset, ...)``, then ``fit(step_fn, ...)``.
    ``cfg`` is a sectioned config (``ssamba.train.config.RunConfig``) with ``train`` (seed, device, precision,
    batch_size, max_bad_steps), ``optim`` (name, lr, betas, eps, weight_decay, decay, grad_clip) and ``log``
    (log_every, eval_every, ckpt_every, keep_last, tensorboard, progress) sections."""

    def __init__(self, run: str | os.PathLike, cfg: Any, resume: bool = False):
        self.run, self.cfg = Path(run), cfg
        t = cfg.train
        kind = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.ddp = setup_distributed(kind)
        self.device = torch.device(f"cuda:{self.ddp.local_rank}" if kind == "cuda" else "cpu")
        self.ckpt_dir = self.run / "checkpoints"
        self.latest = latest_checkpoint(self.ckpt_dir) if resume else None  # the checkpoint resumed from
        if self.ddp.main:
            if not resume and latest_checkpoint(self.ckpt_dir) is not None:
                raise FileExistsError(f"{run} already holds checkpoints; pass --resume to continue it or pick a "
                                      "new --out")  # fmt: skip
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        # seeds: every RNG the run touches; checkpoints save and restore all of them
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)
        self.gen = torch.Generator().manual_seed(t.seed + 1)  # the run's own draws (masks, augmentation)
        precision = t.precision
        if precision == "auto":
            precision = "bf16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp16" and kind != "cuda":
            raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on CPU")
        self.kind, self.precision = kind, precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(kind, enabled=precision == "fp16")
        self.step, self.last_eval, self.train_seconds = 0, {}, 0.0
        self.log = None

    # ------------------------------------------------------------------------------------------ set-up

    def prepare(self, module: torch.nn.Module, dataset, batch_size: int, grad_accum: int = 1, workers: int = 0,
                lr_scale: Callable[[str], float] | None = None, find_unused: bool = False) -> torch.nn.Module:
        """``module`` on the device, wrapped by DDP under torchrun (``self.model``, what a step calls; ``self.module``
        is the module itself); the resumable sampler of global batches of ``dataset`` (this process's share of each
        micro-batch) and its loader; the optimizer (:func:`make_optimizer`). Returns ``self.model``."""
        self.module = self.model = module.to(self.device)
        if self.ddp.enabled:
            ids = None if self.device.index is None else [self.device.index]
            self.model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                                   find_unused_parameters=find_unused)
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, grad_accum, self.cfg.train.seed,
                                             self.ddp.rank, self.ddp.world)  # fmt: skip
        # own generator: creating a DataLoader iterator must not draw from the global torch RNG (resume exactness)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=dataset.collate,
                                                  num_workers=workers, persistent_workers=workers > 0,
                                                  generator=torch.Generator())  # fmt: skip
        self._batches = self._last_batch = None
        self.optimizer = make_optimizer(module, self.cfg.optim, lr_scale)
        return self.model

    def next_batch(self) -> dict:
        """The next micro-batch; at the end of an epoch the sampler has moved on to the next one."""
        if self._batches is None:  # first call: iterate from the sampler's (possibly resumed) position
            self._batches = iter(self.loader)
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def autocast(self):
        return torch.autocast(self.kind, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def forward_context(self, last: bool = True):
        """Around a micro-batch's forward: autocast, and DDP's ``no_sync`` unless it is the step's last one."""
        stack = contextlib.ExitStack()
        if self.ddp.enabled and not last:
            stack.enter_context(self.model.no_sync())
        stack.enter_context(self.autocast())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def accumulate(self, micro_fn: Callable[[dict, int], tuple[torch.Tensor, dict]], grad_accum: int = 1):
        """Forward / backward of this process's ``grad_accum`` micro-batches of a step, each weighing 1 / grad_accum;
        ``micro_fn(batch, a) -> (loss, {metric: value})`` calls ``self.model``. Returns (mean loss, mean metrics).
        A micro-batch whose items were all left out (``data.skip_bad``) repeats the previous one at weight 0, so that
        this process still joins DDP's gradient all-reduce (a rank that skipped its backward would leave its peers
        waiting) and adds nothing; before any usable micro-batch exists, the next one is drawn instead."""
        loss_sum, sums = 0.0, {}
        for a in range(grad_accum):
            batch = self.next_batch()
            while batch["lengths"].numel() == 0 and self._last_batch is None:
                batch = self.next_batch()
            empty = batch["lengths"].numel() == 0
            batch = self._last_batch = self._last_batch if empty else batch
            with self.forward_context(a == grad_accum - 1):
                loss, metrics = micro_fn(batch, a)
            self.backward(loss * 0.0 if empty else loss / grad_accum)
            if not empty:
                loss_sum += float(loss.detach()) / grad_accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / grad_accum
        return loss_sum, sums

    def set_lr(self, lr: float, factor: float = 1.0) -> None:
        """Every group's learning rate: ``lr`` times its ``lr_scale`` times ``factor`` (a schedule's)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * factor

    # ------------------------------------------------------------------------------------------ checkpoints

    def _save(self, task_state: Callable[[], tuple[dict, dict]] | None) -> None:
        self.guard.check_weights(self.module, self.step)  # every rank: the same weights, they stop together
        if not self.ddp.main:
            return
        tensors = {f"model.{k}": v for k, v in self.module.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        rng_tensors, rng_meta = rng_state(self.gen)
        extra_tensors, extra = task_state() if task_state else ({}, {})
        state = {"step": self.step, "optimizer": opt_meta, "scaler": self.scaler.state_dict(),
                 "sampler": self.sampler.state_dict(), "rng": rng_meta, "last_eval": self.last_eval,
                 **self.guard.state_dict(), **extra, "config": self.cfg.to_dict()}  # fmt: skip
        save_checkpoint(self.ckpt_dir, self.step, {**tensors, **opt_tensors, **rng_tensors, **extra_tensors}, state,
                        self.cfg.log.keep_last)

    def _restore(self, load_task_state: Callable[[dict, dict], None] | None) -> None:
        tensors, state = load_checkpoint(self.latest)
        self.module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(self.optimizer, tensors, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, state["rng"], self.gen)
        self.step, self.last_eval = state["step"], state.get("last_eval", {})
        self.guard.load_state_dict(state)
        if load_task_state is not None:
            load_task_state(tensors, state)
        if self.ddp.main:
            print(f"resumed {self.run} from {self.latest.name} (step {self.step})")

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self, step_fn: Callable[[int], tuple[float, dict] | None], total: int,
            eval_fn: Callable[[int], dict] | None = None, eval_at: Callable[[int], bool] | None = None,
            after_step: Callable[[int, bool], None] | None = None, task_state=None, load_task_state=None,
            baseline: bool = True, desc: str | None = None) -> dict:
        """Train until ``total`` steps. ``step_fn(step)`` (``step`` = updates done) sets the learning rate, runs
        forward (in ``forward_context``) and ``backward`` over its micro-batches and returns this process's share
        of the step's mean loss and metrics (floats are averaged over processes; ints are logged as they are),
        or None when the step has no usable item. ``eval_fn(step)`` runs on every process at ``eval_at(step)``
        (default: every ``log.eval_every`` steps and at the end) and returns rank 0's result (logged as
        ``split: valid``). ``after_step(step, skipped)`` follows every step; ``task_state() -> (tensors, meta)``
        and ``load_task_state(tensors, state)`` carry the task's own state in checkpoints. Returns {"step",
        "interrupted", "valid": the last validation, "skipped_steps", "main"}."""
        cfg, ddp, o = self.cfg, self.ddp, self.cfg.optim
        every = cfg.log.eval_every
        eval_at = eval_at or (lambda s: (every > 0 and s % every == 0) or s == total)
        # non-finite losses: skipped, counted, the run stops after train.max_bad_steps in a row
        self.guard = guard = NonFiniteGuard(cfg.train.max_bad_steps, None, self.ckpt_dir)
        resumed = self.latest is not None
        if resumed:
            self._restore(load_task_state)
        self.log = MetricsLog(self.run, cfg.log.tensorboard, self.step if resumed else None) if ddp.main else None
        guard.log = self.log.log if self.log is not None else None
        stop, restore_signals = catch_stop_signals()  # SIGINT / SIGTERM: finish the step, save, exit
        bar = None
        if ddp.main and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc=desc)
        params = [p for p in self.module.parameters() if p.requires_grad]
        try:
            if not resumed and baseline and eval_fn is not None:  # the untrained baseline, step 0
                self._evaluate(eval_fn)
            self.module.train()
            tick = time.perf_counter()
            while self.step < total:
                out = step_fn(self.step)
                self.step += 1
                step = self.step
                self.sampler.advance()
                if out is None:  # consume the batch without an update
                    guard.skip(step, self.optimizer, "no usable items in the batch")
                    skipped = True
                else:
                    loss, metrics = out
                    floats = [k for k, v in metrics.items() if isinstance(v, float)]
                    mean = ddp.mean(torch.tensor([loss, *(metrics[k] for k in floats)], dtype=torch.float64,
                                                 device=self.device)).tolist()  # fmt: skip
                    loss, metrics = mean[0], {**metrics, **dict(zip(floats, mean[1:], strict=True))}
                    skipped = not guard.check(loss, step, self.optimizer)  # gradients dropped, no update
                if not skipped:
                    if o.grad_clip > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    now = time.perf_counter()
                    self.train_seconds += now - tick
                    sps = cfg.train.batch_size / (now - tick)
                    tick = now
                    if self.log is not None and (step % cfg.log.log_every == 0 or step == total):
                        self.log.log({"step": step, "loss": loss, **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                                      "epoch": self.sampler.epoch, "samples_per_s": sps})  # fmt: skip
                    if bar is not None:
                        shown = {k: f"{v:.3f}" for k, v in list(metrics.items())[:3] if isinstance(v, float)}
                        bar.set_postfix(loss=f"{loss:.3f}", **shown, sps=f"{sps:.1f}")
                if bar is not None:
                    bar.update(1)
                if after_step is not None:
                    after_step(step, skipped)
                interrupted = ddp.any(stop["signal"] is not None, self.device)
                if skipped and step < total and not interrupted:  # nothing is evaluated or written after a skip
                    tick = time.perf_counter()
                    continue
                if eval_fn is not None and eval_at(step):
                    self._evaluate(eval_fn)
                if step % cfg.log.ckpt_every == 0 or step == total or interrupted:
                    self._save(task_state)
                tick = time.perf_counter()  # validation and checkpoint time is not training throughput
                if interrupted:
                    return {"step": step, "interrupted": stop["signal"] or "peer", "valid": self.last_eval,
                            "skipped_steps": guard.skipped_steps, "main": ddp.main}  # fmt: skip
        finally:
            restore_signals()
            if bar is not None:
                bar.close()
            if self.log is not None:
                self.log.close()
        guard.check_weights(self.module, self.step)  # the task saves its final model next
        return {"step": self.step, "interrupted": None, "valid": self.last_eval, "skipped_steps": guard.skipped_steps,
                "main": ddp.main}

    def _evaluate(self, eval_fn: Callable[[int], dict]) -> None:
        self.guard.check_weights(self.module, self.step)  # eval_fn may save the model (a best checkpoint)
        was_training = self.module.training
        result = eval_fn(self.step)
        self.module.train(was_training)
        if self.ddp.main:
            self.log.log({"step": self.step, "split": "valid", **result})
            self.last_eval = result
