"""Masked spectrogram patch pretraining, top to bottom (``ssamba pretrain``).

One optimizer step: load this process's ``grad_accum`` micro-batches of the global batch; gather every
item's valid patch count from all processes; draw the masks for the whole global batch from one seeded
generator (so 1 process and N processes use the same masks); forward/backward each micro-batch (DDP
all-reduces gradients on the last one); skip the step on a non-finite loss; clip, step, warm-up / plateau
learning rate; log; validate; checkpoint.

Shape glossary: B global batch, b micro-batch of one process, T frames, F mel bins, M masked patches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssamba.data.datasets import AudioDataset
from ssamba.models import create_model
from ssamba.pretrain.masking import cluster_patch_mask, frame_mask, mask_count
from ssamba.pretrain.mspm import MaskedPatchPretraining
from ssamba.train.config import PretrainConfig
from ssamba.train.engine import Engine, check_data
from ssamba.train.guard import NonFiniteLossError

__all__ = ["NonFiniteLossError", "pretrain"]


def _patch_counts(lengths: torch.Tensor, cfg: PretrainConfig, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid frames (B,) -> (patches per item (B,), time columns per item (B,)), as the encoder packs them."""
    c = encoder.config
    if not cfg.data.use_lengths:
        lengths = torch.full_like(lengths, cfg.data.target_length)
    t_cols = torch.div(lengths - c.tshape, c.tstride, rounding_mode="floor") + 1
    return t_cols * c.grid[0], t_cols


def _draw_masks(n: torch.Tensor, t_cols: torch.Tensor, cfg: PretrainConfig, frame: bool, gen: torch.Generator,
                two_pass: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Masks for a whole (global) batch, random frames for frame tokens, official clusters for patches: (B, M)
    mask indices for mpc, and for mpg (B, M) or None (single pass); M masked patches."""
    m = mask_count(int(n.min()), cfg.mask.mask_patch, cfg.mask.reference_patches)
    draw = lambda: frame_mask(n, m, gen) if frame else cluster_patch_mask(n, t_cols, m, gen)
    mpc = draw()
    return mpc, (draw() if two_pass else None), m


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
        mpc_mask, mpg_mask, m = _draw_masks(n, t_cols, cfg, frame, gen, two_pass=True)
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
    # every split's files from their headers, before anything is built: a bad file stops the run in seconds
    check_data({"train": cfg.data.train, "valid": cfg.data.valid}, cfg.data.skip_bad)
    eng = Engine(run, cfg, resume)
    ddp, device = eng.ddp, eng.device
    mask_gen = eng.gen

    # -- model: the encoder's position grid covers target_length frames
    overrides = {"input_tdim": cfg.data.target_length, **cfg.model.overrides}
    encoder = create_model(cfg.model.name, **overrides)
    objective = MaskedPatchPretraining(encoder, nce_orientation=cfg.mask.nce_orientation)
    frame = cfg.mask.kind == "frame" or (cfg.mask.kind == "auto" and encoder.config.grid[0] == 1)

    # -- data: fbank computed in DataLoader workers; the engine's sampler owns the (resumable) order
    def dataset(manifest: str) -> AudioDataset:
        return AudioDataset(manifest, target_length=cfg.data.target_length, mean=cfg.data.mean, std=cfg.data.std,
                            skip_bad=cfg.data.skip_bad)

    model = eng.prepare(objective, dataset(cfg.data.train), cfg.train.batch_size, cfg.train.grad_accum,
                        cfg.data.num_workers)
    valid_loader = None
    if cfg.data.valid and ddp.main:
        valid_set = dataset(cfg.data.valid)
        valid_loader = torch.utils.data.DataLoader(valid_set, batch_size=cfg.train.batch_size // cfg.train.grad_accum,
                                                   collate_fn=valid_set.collate, num_workers=cfg.data.num_workers)

    # -- optimisation: warm-up, then ReduceLROnPlateau on validation masked accuracy
    o = cfg.optim
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(eng.optimizer, mode="max", factor=o.plateau_factor,
                                                         patience=o.plateau_patience)

    def step_fn(step: int):
        # learning rate warm-up (official: lr = step/warmup * lr, updated every `warmup_every` steps; it
        # overrides a plateau reduction made during warm-up, as upstream)
        if step < o.warmup_steps and step % o.warmup_every == 0:
            eng.set_lr(o.lr * o.warmup_factor(step))
        micro = [eng.next_batch() for _ in range(cfg.train.grad_accum)]  # this process's share of the batch

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
        if total == 0:
            return None
        n, t_cols = _patch_counts(slots[present], cfg, encoder)  # (B_usable,)
        mpc_all, mpg_all, m = _draw_masks(n, t_cols, cfg, frame, mask_gen, cfg.mask.two_pass)

        sums = torch.zeros(4, dtype=torch.float64)  # loss, nce, mse, acc
        for a, batch in enumerate(micro):
            start = (a * ddp.world + ddp.rank) * per_micro
            offset, k = int(present[:start].sum()), batch["lengths"].shape[0]
            rows = slice(offset, offset + k)
            last = a == len(micro) - 1
            if k == 0 and (not last or not ddp.enabled):  # nothing to add to the gradients
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
            with eng.forward_context(last):
                out = model(x, mpc, mpg, item_lengths if cfg.data.use_lengths else None, cfg.mask.mpg_weight)
            eng.backward(out.loss * weight)
            sums += torch.stack([out.loss, out.nce, out.mse, out.acc]).detach().double().cpu() * weight
        loss, nce, mse, acc = sums.tolist()
        return loss, {"nce": nce, "mse": mse, "acc": acc, "mask_patch": m}

    def eval_fn(step: int) -> dict:
        # validation (rank 0), plateau on masked accuracy (every process steps it with rank 0's value)
        result = validate(objective, valid_loader, cfg, frame, device, eng.autocast) if ddp.main else {"acc": 0}
        if step > 0:  # not the untrained baseline
            plateau.step(ddp.broadcast(result["acc"], device))
        return result

    result = eng.fit(step_fn, cfg.train.steps, eval_fn if cfg.data.valid else None,
                     task_state=lambda: ({}, {"plateau": plateau.state_dict()}),
                     load_task_state=lambda tensors, state: plateau.load_state_dict(state["plateau"]))
    result["final"] = None
    if result["interrupted"] is None and ddp.main:
        metrics = {f"valid {k} (step {eng.step})": v for k, v in result["valid"].items()}  # the model card's
        card = {"command": f"ssamba pretrain --model {cfg.model.name} --train {cfg.data.train} --out {run} "
                           f"--config {run / 'config.json'}", "config": cfg.to_dict(), "metrics": metrics}
        result["final"] = str(objective.save_pretrained(run / "final", card))
    return result
