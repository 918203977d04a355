"""Masked spectrogram patch pretraining, top to bottom (``ssamba pretrain``).

One optimizer step: load this process's ``grad_accum`` micro-batches of the global batch; gather every
item's valid patch count from all processes; draw the masks for the whole global batch from one seeded
generator (so 1 process and N processes use the same masks); forward/backward each micro-batch (DDP
all-reduces gradients on the last one); skip the step on a non-finite loss; clip, step, warm-up / plateau
learning rate; log; validate; checkpoint.

Shape glossary: B global batch, b micro-batch of one process, T frames, F mel bins, M masked patches.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from ssamba.data.check import check_splits
from ssamba.data.datasets import AudioDataset
from ssamba.data.sampler import ResumableBatchSampler
from ssamba.models import create_model
from ssamba.pretrain.masking import cluster_patch_mask, frame_mask, mask_count
from ssamba.pretrain.mspm import MaskedPatchPretraining
from ssamba.train.checkpoint import (
    catch_stop_signals,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    restore_optimizer,
    restore_rng,
    rng_state,
)
from ssamba.train.checkpoint import save_checkpoint as write_checkpoint
from ssamba.train.config import PretrainConfig
from ssamba.train.distributed import setup_distributed
from ssamba.train.guard import NonFiniteGuard, NonFiniteLossError
from ssamba.train.logging import MetricsLog

__all__ = ["NonFiniteLossError", "pretrain"]


def _patch_counts(lengths: torch.Tensor, cfg: PretrainConfig, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid frames (B,) -> (patches per item (B,), time columns per item (B,)), as the encoder packs them."""
    c = encoder.config
    if not cfg.data.use_lengths:
        lengths = torch.full_like(lengths, cfg.data.target_length)
    t_cols = torch.div(lengths - c.tshape, c.tstride, rounding_mode="floor") + 1
    return t_cols * c.grid[0], t_cols


def _mask(n: torch.Tensor, t_cols: torch.Tensor, m: int, frame: bool, gen: torch.Generator) -> torch.Tensor:
    """(B, M) mask indices: random frames for frame tokens, official clusters for patches."""
    return frame_mask(n, m, gen) if frame else cluster_patch_mask(n, t_cols, m, gen)


def _draw_masks(n: torch.Tensor, t_cols: torch.Tensor, cfg: PretrainConfig, frame: bool,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Masks for a whole (global) batch: (B, M) for mpc, (B, M) or None (single pass) for mpg."""
    m = mask_count(int(n.min()), cfg.mask.mask_patch, cfg.mask.reference_patches)
    mpc = _mask(n, t_cols, m, frame, gen)
    return mpc, (_mask(n, t_cols, m, frame, gen) if cfg.mask.two_pass else None), m


@torch.no_grad()
def validate(objective: MaskedPatchPretraining, loader, cfg: PretrainConfig, frame: bool, device, autocast) -> dict:
    """Masked-patch accuracy, InfoNCE and MSE on the validation set; masks from a fixed seed, so every
    validation sees the same masks. Always two passes (mpc mask, mpg mask) like the official validatemask."""
    objective.eval()
    gen = torch.Generator().manual_seed(cfg.log.eval_mask_seed)
    totals = {"acc": 0.0, "nce": 0.0, "mse": 0.0, "chance": 0.0}
    batches = 0
    for batch in loader:
        if cfg.log.eval_batches and batches >= cfg.log.eval_batches:
            break
        if batch["lengths"].numel() == 0:  # every item of the batch left out by data.skip_bad
            continue
        n, t_cols = _patch_counts(batch["lengths"], cfg, objective.encoder)
        m = mask_count(int(n.min()), cfg.mask.mask_patch, cfg.mask.reference_patches)
        mpc_mask, mpg_mask = _mask(n, t_cols, m, frame, gen), _mask(n, t_cols, m, frame, gen)
        x = batch["features"].to(device)
        lengths = batch["lengths"].to(device) if cfg.data.use_lengths else None
        with autocast():
            c = objective.mpc(x, mpc_mask, lengths)
            g = objective.mpg(x, mpg_mask, lengths)
        for key, value in (("acc", c.acc), ("nce", c.nce), ("mse", g.mse), ("chance", 1.0 / m)):
            totals[key] += float(value)
        batches += 1
    objective.train()
    return {k: v / max(batches, 1) for k, v in totals.items()}


def pretrain(cfg: PretrainConfig, run: str | Path, resume: bool = False) -> dict:
    """Train until ``cfg.train.steps``; returns {"step", "interrupted", "final", ...}. See module docstring."""
    run = Path(run)
    device_kind = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ddp = setup_distributed(device_kind)
    device = torch.device(f"cuda:{ddp.local_rank}" if device_kind == "cuda" else "cpu")
    # every split's files from their headers, before anything is built: a bad file stops the run in seconds
    check_splits({"train": cfg.data.train, "valid": cfg.data.valid}, skip_bad=cfg.data.skip_bad,
                 log=print if ddp.main else None)
    ckpt_dir = run / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if ddp.main:
        if not resume and latest_checkpoint(ckpt_dir) is not None:
            raise FileExistsError(f"{run} already holds checkpoints; pass --resume to continue it or pick a new --out")
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    # -- seeds: every RNG the run touches; the checkpoint saves and restores all of them
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    mask_gen = torch.Generator().manual_seed(cfg.train.seed + 1)

    # -- model: the encoder's position grid covers target_length frames
    overrides = {"input_tdim": cfg.data.target_length, **cfg.model.overrides}
    encoder = create_model(cfg.model.name, **overrides)
    objective = MaskedPatchPretraining(encoder, nce_orientation=cfg.mask.nce_orientation).to(device)
    frame = cfg.mask.kind == "frame" or (cfg.mask.kind == "auto" and encoder.config.grid[0] == 1)
    model = objective
    if ddp.enabled:
        ids = None if device.index is None else [device.index]
        model = torch.nn.parallel.DistributedDataParallel(objective, device_ids=ids)

    # -- data: fbank computed in DataLoader workers; the sampler owns the (resumable) order
    def dataset(manifest: str) -> AudioDataset:
        return AudioDataset(manifest, target_length=cfg.data.target_length, mean=cfg.data.mean, std=cfg.data.std,
                            skip_bad=cfg.data.skip_bad)

    train_set = dataset(cfg.data.train)
    sampler = ResumableBatchSampler(len(train_set), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed,
                                    ddp.rank, ddp.world)
    workers = cfg.data.num_workers
    # own generator: creating a DataLoader iterator must not draw from the global torch RNG (resume exactness)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=train_set.collate,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator())  # fmt: skip
    valid_loader = None
    if cfg.data.valid and ddp.main:
        valid_set = dataset(cfg.data.valid)
        micro = cfg.train.batch_size // cfg.train.grad_accum
        valid_loader = torch.utils.data.DataLoader(valid_set, batch_size=micro, collate_fn=valid_set.collate,
                                                   num_workers=workers)

    # -- optimisation
    o = cfg.optim
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(objective.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.plateau_factor,
                                                         patience=o.plateau_patience)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device_kind == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device_kind != "cuda":
        raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device_kind, enabled=precision == "fp16")

    def autocast():
        return torch.autocast(device_kind, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # -- resume: model, optimizer, scheduler, scaler, step, RNGs, data position
    step = 0
    if latest is not None:
        tensors, state = load_checkpoint(latest)
        objective.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(optimizer, tensors, state["optimizer"])
        plateau.load_state_dict(state["plateau"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, state["rng"], mask_gen)
        step = state["step"]
        if ddp.main:
            print(f"resumed {run} from {latest.name} (step {step})")
    log = MetricsLog(run, cfg.log.tensorboard, resume_step=step if latest is not None else None) if ddp.main else None
    # non-finite losses: skipped, counted, the run stops after train.max_bad_steps in a row (ssamba.train.guard)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, log.log if log is not None else None, ckpt_dir)
    if latest is not None:
        guard.load_state_dict(state)

    def save_checkpoint() -> None:
        guard.check_weights(objective, step)  # every rank: they hold the same weights and must stop together
        if not ddp.main:
            return
        tensors = {f"model.{k}": v for k, v in objective.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(optimizer)
        rng_tensors, rng_meta = rng_state(mask_gen)
        state = {"step": step, "optimizer": opt_meta, "plateau": plateau.state_dict(), "scaler": scaler.state_dict(),
                 "sampler": sampler.state_dict(), "rng": rng_meta, **guard.state_dict(),
                 "config": cfg.to_dict()}  # fmt: skip
        write_checkpoint(ckpt_dir, step, {**tensors, **opt_tensors, **rng_tensors}, state, cfg.log.keep_last)

    # -- SIGINT / SIGTERM: finish the current step, save, exit
    stop, restore_signals = catch_stop_signals()

    bar = None
    if ddp.main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=step, unit="step", dynamic_ncols=True)
    if latest is None and valid_loader is not None:  # the untrained baseline, step 0
        log.log({"step": 0, "split": "valid", **validate(objective, valid_loader, cfg, frame, device, autocast)})
    batches = iter(loader)
    tick = time.perf_counter()
    last_valid: dict = {}  # the model card's metrics
    try:
        while step < cfg.train.steps:
            # learning rate warm-up (official: lr = step/warmup * lr, updated every `warmup_every` steps; it
            # overrides a plateau reduction made during warm-up, as upstream)
            if step < o.warmup_steps and step % o.warmup_every == 0:
                for group in optimizer.param_groups:
                    group["lr"] = o.lr * min(1.0, (step + o.warmup_every) / o.warmup_steps)

            # this process's micro-batches of the global batch
            micro = []
            for _ in range(cfg.train.grad_accum):
                try:
                    micro.append(next(batches))
                except StopIteration:  # epoch done: the sampler has moved on to the next one
                    batches = iter(loader)
                    micro.append(next(batches))

            # masks for the whole global batch (identical in every process). Each process sends its
            # micro-batches' lengths padded to the nominal size with -1 (items left out by data.skip_bad), so
            # the gather has equal shapes. all_gather is rank-major (W, A, b); the sampler's global order is
            # micro-batch-major (A, W, b): micro-batch a of rank r holds global slots (a * W + r) * b ... + b.
            per_micro = cfg.train.batch_size // (cfg.train.grad_accum * ddp.world)
            local = torch.full((len(micro), per_micro), -1, dtype=torch.long)  # (A, b)
            for a, batch in enumerate(micro):
                local[a, : batch["lengths"].shape[0]] = batch["lengths"]
            slots = ddp.gather(local.view(-1).to(device)).cpu().view(ddp.world, len(micro), per_micro)
            slots = slots.transpose(0, 1).reshape(-1)  # (B,) global order, -1 = left out
            present = slots >= 0
            total = int(present.sum())  # usable items in the global batch
            if total == 0:  # consume the batch without an update
                step += 1
                sampler.advance()
                guard.skip(step, optimizer, "no usable items in the batch")
                continue
            n, t_cols = _patch_counts(slots[present], cfg, encoder)  # (B_usable,)
            mpc_all, mpg_all, m = _draw_masks(n, t_cols, cfg, frame, mask_gen)

            sums = torch.zeros(4, dtype=torch.float64)  # loss, nce, mse, acc
            for a, batch in enumerate(micro):
                start = (a * ddp.world + ddp.rank) * per_micro
                offset, k = int(present[:start].sum()), batch["lengths"].shape[0]
                rows = slice(offset, offset + k)
                sync = a == len(micro) - 1 or not ddp.enabled
                if k == 0 and (not sync or not ddp.enabled):  # nothing to add to the gradients
                    continue
                if k == 0:  # every item left out, but DDP needs this process's gradients: a zero-weight pass
                    x = torch.zeros(1, cfg.data.target_length, encoder.config.input_fdim, device=device)
                    item_lengths = torch.full((1,), cfg.data.target_length, device=device)
                    mpc, mpg = torch.arange(m)[None], None if mpg_all is None else torch.arange(m)[None]
                else:
                    x = batch["features"].to(device, non_blocking=True)  # (b, T, F)
                    item_lengths = batch["lengths"].to(device)
                    mpc, mpg = mpc_all[rows], None if mpg_all is None else mpg_all[rows]
                # each item weighs 1 / total in the step's loss; DDP averages gradients over the W processes
                weight = k * ddp.world / total
                with model.no_sync() if not sync else contextlib.nullcontext(), autocast():
                    out = model(x, mpc, mpg, item_lengths if cfg.data.use_lengths else None, cfg.mask.mpg_weight)
                scaler.scale(out.loss * weight).backward()
                sums += torch.stack([out.loss, out.nce, out.mse, out.acc]).detach().double().cpu() * weight
            sums = ddp.mean(sums.to(device)).cpu()
            loss, nce, mse, acc = sums.tolist()

            step += 1
            sampler.advance()
            if not guard.check(loss, step, optimizer):  # gradients dropped, the optimizer and scaler untouched
                continue
            if o.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            now = time.perf_counter()
            samples_per_s = cfg.train.batch_size / (now - tick)
            tick = now
            lr = optimizer.param_groups[0]["lr"]
            if log is not None and (step % cfg.log.log_every == 0 or step == cfg.train.steps):
                log.log({"step": step, "loss": loss, "nce": nce, "mse": mse, "acc": acc, "lr": lr,
                         "mask_patch": m, "samples_per_s": samples_per_s})  # fmt: skip
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", mse=f"{mse:.3f}", sps=f"{samples_per_s:.1f}")
                bar.update(1)

            # validation (rank 0), plateau on masked accuracy (every process steps it with rank 0's value)
            at_eval = (cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.train.steps
            if at_eval and cfg.data.valid:
                result = validate(objective, valid_loader, cfg, frame, device, autocast) if ddp.main else {"acc": 0}
                plateau.step(ddp.broadcast(result["acc"], device))
                if log is not None:
                    log.log({"step": step, "split": "valid", **result})
                last_valid = {f"valid {k} (step {step})": v for k, v in result.items()}
                tick = time.perf_counter()  # validation time is not training throughput

            interrupted = ddp.any(stop["signal"] is not None, device)
            if step % cfg.log.ckpt_every == 0 or step == cfg.train.steps or interrupted:
                save_checkpoint()
                tick = time.perf_counter()
            if interrupted:
                return {"step": step, "interrupted": stop["signal"] or "peer", "final": None}
    finally:
        restore_signals()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    final = None
    guard.check_weights(objective, step)
    if ddp.main:
        card = {"command": f"ssamba pretrain --model {cfg.model.name} --train {cfg.data.train} --out {run} "
                           f"--config {run / 'config.json'}", "config": cfg.to_dict(), "metrics": last_valid}
        final = objective.save_pretrained(run / "final", card)
    return {"step": step, "interrupted": None, "final": str(final) if final else None,
            "skipped_steps": guard.skipped_steps}
