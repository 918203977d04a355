"""Mamba-HuBERT training: masked-prediction pretraining (``ssamba hubert pretrain``), CTC fine-tuning
(``ssamba hubert finetune``) and the fbank reconstruction / denoising probe (``ssamba hubert reconstruct``).

All three share one resumable loop (:func:`_run_loop`): steps over global batches from a
:class:`ResumableBatchSampler` (DDP under torchrun; micro-batches for gradient accumulation), AdamW with linear
warm-up and linear decay (fairseq ``polynomial_decay``, power 1), gradient clipping, skipped non-finite steps,
RUN/metrics.jsonl (+ TensorBoard), atomic safetensors checkpoints with every RNG and the data position, SIGINT /
SIGTERM -> save and stop. Span masks are drawn from a generator seeded by (seed, step, rank, micro-batch), so a
resumed or multi-process run draws exactly the masks of an uninterrupted one without saving mask state.

Shape glossary: B batch, S samples, T frames (50 Hz), U transcript characters, F fbank frames, M mel bins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssamba import features as feats
from ssamba.data.check import check_splits
from ssamba.data.datasets import AudioDataset, pad_collate
from ssamba.data.manifest import read_manifest
from ssamba.data.sampler import ResumableBatchSampler
from ssamba.models.hubert import HuBERTModel, create_hubert
from ssamba.pretrain.hubert_loss import IGNORE, HuBERTPretraining, downsample_labels, span_mask
from ssamba.pretrain.kmeans import read_labels_for
from ssamba.tasks.ctc import (
    HEAD_WEIGHTS,
    CharVocab,
    CTCHead,
    ReconstructionHead,
    error_rates,
    greedy_decode,
    save_head,
)
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
from ssamba.train.config import merge_sections
from ssamba.train.distributed import setup_distributed
from ssamba.train.guard import NonFiniteGuard
from ssamba.train.logging import MetricsLog

__all__ = [
    "CTCConfig",
    "HuBERTPretrainConfig",
    "ReconstructConfig",
    "finetune_ctc",
    "pretrain_hubert",
    "reconstruct",
]


# --------------------------------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    # encoder: transformer | extbimamba | innbimamba | conbimamba
    encoder: str = "extbimamba"
    # preset: base (HuBERT-base sizes), small (CPU demo), tiny (tests)
    size: str = "small"
    # HuBERTConfig overrides, e.g. {depth = 6, combine = "concat", use_ffn = false}
    overrides: dict = field(default_factory=dict)


@dataclass
class DataSection:
    train: str = ""
    valid: str = ""
    # label folder written by `ssamba hubert labels` (holds <manifest stem>.km for train and valid)
    labels: str = ""
    # clips longer than this are cut (labels cut with them); HuBERT: 250000. Pretraining cuts at a random
    # offset on the 20 ms frame grid (HuBERT's random crop), fine-tuning keeps the start
    max_samples: int = 250000
    num_workers: int = 0
    skip_bad: bool = False


@dataclass
class MaskSection:
    # HuBERT: mask_prob 0.8, span 10 frames (200 ms), overlapping spans, equal masked count per batch
    prob: float = 0.8
    span: int = 10
    min_masks: int = 2


@dataclass
class LossSection:
    final_dim: int = 256
    logit_temp: float = 0.1
    masked_weight: float = 1.0
    # HuBERT-base: 0 (masked-only); >0 adds the unmasked-frame prediction loss
    unmasked_weight: float = 0.0
    feature_pen_weight: float = 10.0


@dataclass
class OptimSection:
    # HuBERT base: Adam(0.9, 0.98), eps 1e-6, wd 0.01, peak 5e-4, 8% warm-up, clip 10
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    # linear decay to final_lr_scale * lr at the last step (1.0 = constant after warm-up)
    final_lr_scale: float = 0.0
    grad_clip: float = 10.0


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    max_bad_steps: int = 5


@dataclass
class LogSection:
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 200
    keep_last: int = 2
    tensorboard: bool = False
    progress: bool = True


@dataclass
class HeadSection:
    # encoder layer fed to the head (1-based); 0 = the last layer after the final norm
    layer: int = 0
    # attention Conformer blocks between the encoder and the output layer (0 = linear head on the features)
    conformer_layers: int = 0
    conformer_dim: int = 144
    conformer_heads: int = 4
    conformer_kernel: int = 15
    dropout: float = 0.1
    # CTC units: "chars" (the transcript's characters) or "phonemes" (espeak-ng IPA symbols of the transcript)
    units: str = "chars"


@dataclass
class FinetuneSection:
    # pretrained model folder (`save_pretrained`, e.g. RUN/final) or "none" (random init of model.*)
    init: str = "none"
    # the CNN stays frozen (HuBERT fine-tuning); the encoder trains after freeze_encoder_steps (HuBERT 10k)
    freeze_cnn: bool = True
    freeze_encoder_steps: int = 0
    # freeze the encoder for the whole run (a probe of the chosen layer)
    freeze_encoder: bool = False
    # span masking of the input frames as augmentation (HuBERT fine-tuning: 0.65; 0 = none)
    mask_prob: float = 0.3
    mask_span: int = 10


@dataclass
class ReconSection:
    # fbank target: mel bins, normalisation (x - mean) / (2 std) (the corpus's `ssamba data stats`)
    num_mel_bins: int = 80
    mean: float = -6.0
    std: float = 4.0
    # additive white noise on the input at this SNR in dB (denoising); None = clean reconstruction
    noise_snr_db: float | None = None
    # hidden width of the probe MLP (0 = linear probe)
    hidden: int = 0


class _Config:
    """Shared ``update`` / ``to_dict`` of the section dataclasses below (``merge_sections``: typed values,
    unknown keys raise naming them); ``--set`` flags go through ``ssamba.train.config.apply_overrides``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, values: dict[str, Any], source: str = "config") -> None:
        merge_sections(self, values, source)

    def validate(self) -> None:
        t = self.train
        if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1:
            raise ValueError("train.steps, train.batch_size and train.grad_accum must be positive")
        # building the model config checks encoder, size and overrides
        from ssamba.models.hubert import HuBERTConfig, hubert_presets

        presets = hubert_presets()
        if self.model.size not in presets:
            raise ValueError(f"model.size must be one of {', '.join(presets)}, got {self.model.size!r}")
        HuBERTConfig.from_dict({**presets[self.model.size], "encoder": self.model.encoder, **self.model.overrides})


@dataclass
class HuBERTPretrainConfig(_Config):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    mask: MaskSection = field(default_factory=MaskSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)


@dataclass
class CTCConfig(_Config):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    head: HeadSection = field(default_factory=HeadSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, weight_decay=0.0, warmup_steps=50))
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    # test manifest, evaluated with the checkpoint of the best validation CER
    test: str = ""


@dataclass
class ReconstructConfig(_Config):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    head: HeadSection = field(default_factory=HeadSection)
    finetune: FinetuneSection = field(default_factory=lambda: FinetuneSection(freeze_encoder=True, mask_prob=0.0))
    recon: ReconSection = field(default_factory=ReconSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, weight_decay=0.0, warmup_steps=20))
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    test: str = ""


# ----------------------------------------------------------------------------------------------------- data


class WaveformSet(torch.utils.data.Dataset):
    """Waveforms of a manifest (cut to ``max_samples`` from the start) with optional frame labels (cut at the
    same time point) and transcripts. Items: {"features": (S,), "length", "index", ["targets": (T_label,)],
    ["text": str]}."""

    def __init__(self, manifest: str, max_samples: int, skip_bad: bool = False, labels: list | None = None,
                 label_rate: float = 100.0, transcripts: bool = False, random_crop: bool = False, hop: int = 320):
        self.base = AudioDataset(manifest, kind="waveform", skip_bad=skip_bad)
        self.max_samples, self.labels, self.label_rate = max_samples, labels, label_rate
        # random crops start on the model's frame grid (a multiple of `hop` samples), which is also a whole
        # number of label frames at 50 and 100 Hz; drawn from python's `random` (seeded, saved on resume)
        self.random_crop, self.hop = random_crop, hop
        self.transcripts = transcripts
        self.text_map: Callable[[str], str] | None = None  # e.g. phonemize, applied once per transcript
        if transcripts:
            missing = [i for i, ex in enumerate(self.base.examples) if "transcript" not in ex.extra]
            if missing:
                raise ValueError(f"{manifest}: entries {missing[:5]} have no \"transcript\" key")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict | None:
        item = self.base[index]
        if item is None:
            return None
        offset = 0
        if item["length"] > self.max_samples:
            if self.random_crop:
                offset = random.randint(0, (item["length"] - self.max_samples) // self.hop) * self.hop
            item["features"] = item["features"][offset : offset + self.max_samples]
            item["length"] = self.max_samples
        if self.labels is not None:
            lab = self.labels[index]
            # label frame f starts at f * 16000 / rate samples: keep those starting inside the crop
            first = round(offset * self.label_rate / 16000)
            keep = math.ceil(item["length"] * self.label_rate / 16000)
            item["targets"] = lab[first : first + keep]
        if self.transcripts:
            item["text"] = self.base.examples[index].extra["transcript"]
            if self.text_map is not None:
                item["text"] = self.text_map(item["text"])
        return item

    def collate(self, items: list) -> dict:
        batch = pad_collate([{k: v for k, v in it.items() if k in ("features", "length", "index")} if it else None
                             for it in items])
        kept = [it for it in items if it is not None]
        if kept and "targets" in kept[0]:
            longest = max(it["targets"].numel() for it in kept)
            batch["targets"] = torch.full((len(kept), longest), IGNORE, dtype=torch.long)
            for row, it in zip(batch["targets"], kept, strict=True):
                row[: it["targets"].numel()] = it["targets"]
        if kept and "text" in kept[0]:
            batch["text"] = [it["text"] for it in kept]
        return batch


# ----------------------------------------------------------------------------------------------------- loop


def _device(kind: str) -> str:
    return kind if kind != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _lr_at(step: int, o: OptimSection, total: int) -> float:
    """Linear warm-up to lr over warmup_steps, then linear decay to final_lr_scale * lr at ``total``."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    return o.lr * (1.0 - (1.0 - o.final_lr_scale) * min(frac, 1.0))


def _mask_generator(seed: int, step: int, rank: int, micro: int, world: int | None = None) -> torch.Generator:
    """Seeded by the global micro-batch index ``micro * world + rank`` (the sampler's order), so that one
    process with grad_accum = W and W processes draw the same masks for the same items."""
    if world is None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10007 + micro * world + rank)


def _run_loop(run: Path, cfg: _Config, module: torch.nn.Module, train_set, step_fn: Callable,
              eval_fn: Callable | None, resume: bool, params=None) -> dict:
    """The shared loop; ``step_fn(model, batch, step, micro_index, rank, device) -> (loss, {metric: float})``,
    ``eval_fn(module, step) -> {metric: float}`` (rank 0). Returns {"step", "interrupted", "valid": last eval}."""
    device_kind = _device(cfg.train.device)
    ddp = setup_distributed(device_kind)
    device = torch.device(f"cuda:{ddp.local_rank}" if device_kind == "cuda" else "cpu")
    ckpt_dir = run / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if ddp.main:
        if not resume and latest_checkpoint(ckpt_dir) is not None:
            raise FileExistsError(f"{run} already holds checkpoints; pass --resume to continue it or pick a new --out")
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    module.to(device)
    model = module
    if ddp.enabled:
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=None if device.index is None
                                                          else [device.index], find_unused_parameters=True)
    t = cfg.train
    sampler = ResumableBatchSampler(len(train_set), t.batch_size, t.grad_accum, t.seed, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=train_set.collate,
                                         num_workers=cfg.data.num_workers, generator=torch.Generator())
    o = cfg.optim
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "_no_weight_decay", False)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    step, last_eval = 0, {}
    if latest is not None:
        tensors, state = load_checkpoint(latest)
        module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(optimizer, tensors, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, state["rng"], torch.Generator())
        step, last_eval = state["step"], state.get("last_eval", {})
        if ddp.main:
            print(f"resumed {run} from {latest.name} (step {step})")
    log = MetricsLog(run, cfg.log.tensorboard, resume_step=step if latest is not None else None) if ddp.main else None
    # non-finite losses: skipped, counted, the run stops after train.max_bad_steps in a row (ssamba.train.guard)
    guard = NonFiniteGuard(t.max_bad_steps, log.log if log is not None else None, ckpt_dir)
    if latest is not None:
        guard.load_state_dict(state)

    def checkpoint() -> None:
        guard.check_weights(module, step)  # every rank: they hold the same weights and must stop together
        if ddp.main:
            tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
            opt_t, opt_meta = optimizer_state(optimizer)
            rng_t, rng_meta = rng_state(torch.Generator())
            state = {"step": step, "optimizer": opt_meta, "sampler": sampler.state_dict(), "rng": rng_meta,
                     "last_eval": last_eval, **guard.state_dict(), "config": cfg.to_dict()}
            save_checkpoint(ckpt_dir, step, {**tensors, **opt_t, **rng_t}, state, cfg.log.keep_last)

    stop, restore_signals = catch_stop_signals()
    bar = None
    if ddp.main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True)
    if latest is None and eval_fn is not None and ddp.main:  # the untrained baseline, step 0
        log.log({"step": 0, "split": "valid", **eval_fn(module, 0)})
    batches = iter(loader)
    last_batch = None
    tick = time.perf_counter()
    try:
        while step < t.steps:
            lr = _lr_at(step, o, t.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            module.train()
            sums: dict[str, float] = {}
            loss_sum = torch.zeros((), dtype=torch.float64)
            for a in range(t.grad_accum):
                batch = None
                while batch is None or (batch["lengths"].numel() == 0 and last_batch is None):
                    try:
                        batch = next(batches)
                    except StopIteration:
                        batches = iter(loader)
                        batch = next(batches)
                # Every item of this micro-batch was left out by data.skip_bad: the previous micro-batch again with
                # weight 0, so that this process still joins DDP's gradient all-reduce (a rank that skipped its
                # backward would leave its peers waiting) and adds nothing to the step. Before any usable
                # micro-batch exists, the next one is drawn instead.
                empty = batch["lengths"].numel() == 0
                batch = last_batch if empty else batch
                last_batch = batch
                sync = a == t.grad_accum - 1 or not ddp.enabled
                with model.no_sync() if not sync else contextlib.nullcontext():
                    loss, metrics = step_fn(model, batch, step, a, ddp.rank, device)
                    (loss * 0.0 if empty else loss / t.grad_accum).backward()
                if empty:
                    continue
                loss_sum += float(loss.detach()) / t.grad_accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / t.grad_accum
            loss_value = float(ddp.mean(loss_sum.to(device)).cpu())
            step += 1
            sampler.advance()
            if not guard.check(loss_value, step, optimizer):  # gradients dropped, no update
                continue
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            sps = t.batch_size / (now - tick)
            tick = now
            if log is not None and (step % cfg.log.log_every == 0 or step == t.steps):
                log.log({"step": step, "loss": loss_value, **sums, "lr": lr, "samples_per_s": sps})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", **{k: f"{v:.3f}" for k, v in list(sums.items())[:2]})
                bar.update(1)
            if eval_fn is not None and ddp.main and (step % cfg.log.eval_every == 0 or step == t.steps):
                guard.check_weights(module, step)  # eval_fn may save the model (CTC's best head)
                last_eval = eval_fn(module, step)
                log.log({"step": step, "split": "valid", **last_eval})
                tick = time.perf_counter()
            interrupted = ddp.any(stop["signal"] is not None, device)
            if step % cfg.log.ckpt_every == 0 or step == t.steps or interrupted:
                checkpoint()
                tick = time.perf_counter()
            if interrupted:
                return {"step": step, "interrupted": stop["signal"] or "peer", "valid": last_eval}
    finally:
        restore_signals()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    guard.check_weights(module, step)  # the callers save the final model next
    return {"step": step, "interrupted": None, "valid": last_eval, "main": ddp.main,
            "skipped_steps": guard.skipped_steps}


# ------------------------------------------------------------------------------------------------ pretraining


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _check_data(cfg: _Config, test: str = "") -> None:
    """Every split's files from their headers, before anything is built or labelled (ssamba.data.check): a bad
    file stops the run in seconds; with data.skip_bad the counts are printed (by rank 0 under torchrun)."""
    main = int(os.environ.get("RANK", "0")) == 0
    check_splits({"train": cfg.data.train, "valid": cfg.data.valid, "test": test}, skip_bad=cfg.data.skip_bad,
                 log=print if main else None)


def pretrain_hubert(cfg: HuBERTPretrainConfig, run: str | Path, resume: bool = False) -> dict:
    """HuBERT masked prediction on k-means targets. Writes RUN/final (``save_pretrained``: the encoder, loadable
    by ``ssamba.models.load_pretrained``) and RUN/final/hubert_heads.safetensors (final_proj, label_embs)."""
    run = Path(run)
    cfg.validate()
    if not cfg.data.labels:
        raise ValueError("data.labels: a label folder from `ssamba hubert labels` is required")
    _check_data(cfg)
    _seed(cfg.train.seed)
    train_labels, meta = read_labels_for(cfg.data.labels, cfg.data.train)
    model = create_hubert(cfg.model.encoder, cfg.model.size, **cfg.model.overrides)
    if meta.get("conv") is not None and meta["label_rate"] != model.config.frame_rate:
        raise ValueError(f"labels at {meta['label_rate']} Hz do not fit the model's {model.config.frame_rate} Hz")
    L = cfg.loss
    objective = HuBERTPretraining(model, meta["k"], L.final_dim, L.logit_temp, L.masked_weight, L.unmasked_weight,
                                  L.feature_pen_weight)
    rate = meta["label_rate"]
    majority = int(torch.bincount(torch.cat(train_labels), minlength=meta["k"]).argmax())
    train_set = WaveformSet(cfg.data.train, cfg.data.max_samples, cfg.data.skip_bad, train_labels, rate,
                            random_crop=True, hop=model.config.hop)
    valid_set = None
    if cfg.data.valid:
        valid_labels, _ = read_labels_for(cfg.data.labels, cfg.data.valid)
        valid_set = WaveformSet(cfg.data.valid, cfg.data.max_samples, cfg.data.skip_bad, valid_labels, rate)
    m = cfg.mask

    def forward(obj, batch: dict, gen: torch.Generator, device) -> Any:
        """obj: the objective or its DDP wrapper (called, so that DDP sees the forward)."""
        net = obj.module if hasattr(obj, "module") else obj
        wave, lengths = batch["features"].to(device), batch["lengths"].to(device)
        frames = net.model.frame_lengths(lengths)
        t = int(net.model.frame_lengths(torch.tensor([wave.shape[1]]))[0])
        mask = span_mask(frames.cpu(), t, m.prob, m.span, m.min_masks, generator=gen)
        targets = downsample_labels(batch["targets"], rate, net.model.config.frame_rate, t)
        out = obj(wave, lengths, targets, mask)
        out.masked_targets = targets[mask & (torch.arange(t)[None, :] < frames.cpu()[:, None])]  # for the prior
        return out

    def step_fn(model, batch, step, micro, rank, device):
        out = forward(model, batch, _mask_generator(cfg.train.seed, step, rank, micro), device)
        return out.loss, {"loss_m": out.loss_m, "loss_u": out.loss_u, "acc_m": out.acc_m, "acc_u": out.acc_u,
                          "feature_pen": out.feature_pen}

    @torch.no_grad()
    def eval_fn(obj, step):
        obj.eval()
        loader = torch.utils.data.DataLoader(valid_set, batch_size=cfg.train.batch_size, collate_fn=valid_set.collate)
        gen = torch.Generator().manual_seed(1234)  # the same masks at every validation
        tot = {"loss_m": 0.0, "acc_m": 0.0, "acc_u": 0.0, "prior": 0.0}
        n_m = n_u = 0
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            out = forward(obj, batch, gen, next(obj.parameters()).device)
            tgt = out.masked_targets
            tot["prior"] += float((tgt[tgt != IGNORE] == majority).sum())
            tot["loss_m"] += float(out.loss_m) * out.n_masked
            tot["acc_m"] += float(out.acc_m) * out.n_masked
            tot["acc_u"] += float(out.acc_u) * out.n_unmasked
            n_m, n_u = n_m + out.n_masked, n_u + out.n_unmasked
        return {"loss_m": tot["loss_m"] / max(n_m, 1), "acc_m": tot["acc_m"] / max(n_m, 1),
                "acc_u": tot["acc_u"] / max(n_u, 1), "chance": 1.0 / meta["k"],
                # accuracy of always predicting the most frequent training cluster: the bar a model that only
                # learnt the label prior reaches (1/K is far below it for k-means labels)
                "prior_acc_m": tot["prior"] / max(n_m, 1)}

    result = _run_loop(run, cfg, objective, train_set, step_fn, eval_fn if valid_set is not None else None, resume)
    if result["interrupted"] is None and result["main"]:
        from safetensors.torch import save_file

        final = model.save_pretrained(run / "final", {
            "command": f"ssamba hubert pretrain --train {cfg.data.train} --labels {cfg.data.labels} --out {run} "
                       f"--config {run / 'config.json'}", "config": cfg.to_dict(),
            "metrics": {f"valid {k}": v for k, v in result["valid"].items()}})
        save_file({"final_proj.weight": objective.final_proj.weight.detach().contiguous(),
                   "final_proj.bias": objective.final_proj.bias.detach().contiguous(),
                   "label_embs": objective.label_embs.detach().contiguous()}, str(final / "hubert_heads.safetensors"))
        result["final"] = str(final)
    return result


# ------------------------------------------------------------------------------------------------ fine-tuning


def _encoder(cfg: _Config) -> HuBERTModel:
    init = cfg.finetune.init
    if init and init != "none":
        from ssamba.models import load_pretrained

        model = load_pretrained(init)
        if not isinstance(model, HuBERTModel):
            raise ValueError(f"{init}: holds a {model.family} model; HuBERT fine-tuning needs a HuBERT one")
        return model
    return create_hubert(cfg.model.encoder, cfg.model.size, **cfg.model.overrides)


def _encoder_params(head: torch.nn.Module, ft: FinetuneSection) -> list:
    enc = head.encoder
    if ft.freeze_cnn:
        enc.config.feature_grad_mult = 0.0  # cnn_features then runs under no_grad
        for p in enc.feature_extractor.parameters():
            p.requires_grad_(False)
    if ft.freeze_encoder:
        for p in enc.parameters():
            p.requires_grad_(False)
    return [p for p in head.parameters() if p.requires_grad]


def finetune_ctc(cfg: CTCConfig, run: str | Path, resume: bool = False) -> dict:
    """CTC over characters from a chosen layer (optionally through a Conformer downstream); evaluates valid CER
    every eval_every steps, keeps the best head (RUN/best), reports its test CER / WER in RUN/metrics.json."""
    run = Path(run)
    cfg.validate()
    _check_data(cfg, cfg.test)
    _seed(cfg.train.seed)
    h = cfg.head
    if h.units not in ("chars", "phonemes"):
        raise ValueError(f"head.units must be chars or phonemes, got {h.units!r}")
    text_map = None
    if h.units == "phonemes":
        from functools import lru_cache

        from ssamba.tasks.ctc import phonemize

        text_map = lru_cache(maxsize=None)(phonemize)

    def waveset(manifest: str) -> WaveformSet:
        ds = WaveformSet(manifest, cfg.data.max_samples, cfg.data.skip_bad, transcripts=True)
        ds.text_map = text_map
        return ds

    train_set = waveset(cfg.data.train)
    # the unit inventory (not the labels) of every split given, so that a valid/test character unseen in the
    # small training set is an error count, not a crash
    texts = [ex.extra.get("transcript", "") for ex in train_set.base.examples]
    for extra in (cfg.data.valid, cfg.test):
        if extra:
            texts += [ex.extra.get("transcript", "") for ex in read_manifest(extra)]
    vocab = CharVocab.from_transcripts([text_map(t) for t in texts] if text_map else texts)
    encoder = _encoder(cfg)
    head = CTCHead(encoder, len(vocab), h.layer or None, h.conformer_layers, h.conformer_dim, h.conformer_heads,
                   h.conformer_kernel, h.dropout)
    params = _encoder_params(head, cfg.finetune)
    ft = cfg.finetune
    valid_set = waveset(cfg.data.valid) if cfg.data.valid else None

    def targets_of(texts):
        enc = [vocab.encode(t) for t in texts]
        return torch.cat(enc), torch.tensor([e.numel() for e in enc])

    def step_fn(model, batch, step, micro, rank, device):
        net = model.module if hasattr(model, "module") else model
        frozen = ft.freeze_encoder or step < ft.freeze_encoder_steps
        for p in net.encoder.layers.parameters():
            p.requires_grad_(not frozen)
        wave, lengths = batch["features"].to(device), batch["lengths"].to(device)
        mask = None
        if ft.mask_prob > 0:
            frames = net.encoder.frame_lengths(lengths).cpu()
            t = int(net.encoder.frame_lengths(torch.tensor([wave.shape[1]]))[0])
            gen = _mask_generator(cfg.train.seed, step, rank, micro)
            mask = span_mask(frames, t, ft.mask_prob, ft.mask_span, 0, generator=gen, same_count=False).to(device)
        log_probs, frames = model(wave, lengths, mask)  # called through DDP when distributed
        tgt, tgt_len = targets_of(batch["text"])
        loss = net.ctc_loss(log_probs, frames, tgt.to(device), tgt_len.to(device))
        return loss, {}

    @torch.no_grad()
    def evaluate(net, dataset) -> dict:
        net.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=dataset.collate)
        refs, hyps, loss, n = [], [], 0.0, 0
        device = next(net.parameters()).device
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            log_probs, frames = net(batch["features"].to(device), batch["lengths"].to(device))
            tgt, tgt_len = targets_of(batch["text"])
            loss += float(net.ctc_loss(log_probs, frames, tgt.to(device), tgt_len.to(device))) * len(batch["text"])
            n += len(batch["text"])
            refs += [vocab.normalize(t) for t in batch["text"]]
            hyps += [vocab.decode(ids) for ids in greedy_decode(log_probs, frames)]
        return {**error_rates(refs, hyps), "ctc": loss / max(n, 1), "examples": list(zip(refs[:3], hyps[:3],
                                                                                         strict=True))}

    best = {"cer": math.inf}

    def eval_fn(net, step):
        result = evaluate(net, valid_set)
        if result["cer"] < best["cer"]:
            best.update(cer=result["cer"], step=step)
            save_head(net, run / "best", vocab)
        return {k: v for k, v in result.items() if k != "examples"} | {"best_cer": best["cer"]}

    result = _run_loop(run, cfg, head, train_set, step_fn, eval_fn if valid_set is not None else None, resume,
                       params=params)
    if result["interrupted"] is not None or not result["main"]:
        return result
    if valid_set is not None and (run / "best").exists():
        _load_head(head, run / "best")
    else:
        save_head(head, run / "best", vocab)
    summary = {"task": "ctc", "metric": "cer" if h.units == "chars" else "per", "units": h.units,
               "init": cfg.finetune.init, "layer": h.layer or "last",
               "conformer_layers": h.conformer_layers, "steps": result["step"],
               "skipped_steps": result["skipped_steps"], "vocab": vocab.chars}
    if valid_set is not None:
        v = evaluate(head, valid_set)
        summary.update(valid=v["cer"], valid_wer=v["wer"], best_step=best.get("step"))
    if cfg.test:
        test_set = waveset(cfg.test)
        r = evaluate(head, test_set)
        summary.update(test=r["cer"], test_wer=r["wer"], test_examples=r["examples"])
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**result, **summary}


def _load_head(net: torch.nn.Module, folder: Path) -> None:
    """The weights ``save_head`` wrote, into the head being trained (the best checkpoint, at the end)."""
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))


# ------------------------------------------------------------------------------------------------ reconstruction


def reconstruct(cfg: ReconstructConfig, run: str | Path, resume: bool = False) -> dict:
    """Fbank reconstruction (or denoising, ``recon.noise_snr_db``) from one layer of a (by default frozen)
    encoder; reports MSE and R^2 = 1 - MSE / variance of the normalised target on valid and test."""
    run = Path(run)
    cfg.validate()
    _check_data(cfg, cfg.test)
    _seed(cfg.train.seed)
    r = cfg.recon
    encoder = _encoder(cfg)
    head = ReconstructionHead(encoder, r.num_mel_bins, cfg.head.layer or None, hidden=r.hidden)
    params = _encoder_params(head, cfg.finetune)
    train_set = WaveformSet(cfg.data.train, cfg.data.max_samples, cfg.data.skip_bad)

    def batch_loss(net, batch, device, gen: torch.Generator | None):
        """net: the head or its DDP wrapper (called for the forward)."""
        wave, lengths = batch["features"].to(device), batch["lengths"].to(device)
        target, t_frames = feats.batch_fbank(wave, lengths, num_mel_bins=r.num_mel_bins)  # (B, F, M), clean
        target = feats.normalize(target, r.mean, r.std)
        x = wave
        if r.noise_snr_db is not None:
            valid = torch.arange(wave.shape[1], device=device)[None, :] < lengths[:, None]
            power = (wave.pow(2) * valid).sum(1, keepdim=True) / lengths[:, None]
            noise = torch.randn(wave.shape, generator=gen).to(device) * (power / 10 ** (r.noise_snr_db / 10)).sqrt()
            x = wave + noise * valid
        pred, p_frames = net(x, lengths)  # (B, 2T, M)
        n = min(pred.shape[1], target.shape[1])
        frames = torch.minimum(p_frames, t_frames).clamp(max=n)
        sel = torch.arange(n, device=device)[None, :] < frames[:, None]  # (B, n)
        err = (pred[:, :n] - target[:, :n]).pow(2)[sel]  # (N, M)
        tgt = target[:, :n][sel]
        return err.mean(), err.sum().item(), tgt, int(sel.sum())

    def step_fn(model, batch, step, micro, rank, device):
        loss, *_ = batch_loss(model, batch, device, _mask_generator(cfg.train.seed, step, rank, micro))
        return loss, {}

    @torch.no_grad()
    def evaluate(net, manifest) -> dict:
        net.eval()
        ds = WaveformSet(manifest, cfg.data.max_samples, cfg.data.skip_bad)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, collate_fn=ds.collate)
        gen = torch.Generator().manual_seed(4321)
        sq, cells, targets = 0.0, 0, []
        device = next(net.parameters()).device
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            _, s, tgt, _ = batch_loss(net, batch, device, gen)
            sq, cells = sq + s, cells + tgt.numel()
            targets.append(tgt.double().cpu())
        allt = torch.cat(targets)
        var = float((allt - allt.mean(0)).pow(2).mean())  # per-bin-mean predictor's MSE
        mse = sq / max(cells, 1)
        return {"mse": mse, "r2": 1.0 - mse / var, "baseline_mse": var}

    def eval_fn(net, step):
        return evaluate(net, cfg.data.valid)

    result = _run_loop(run, cfg, head, train_set, step_fn, eval_fn if cfg.data.valid else None, resume, params=params)
    if result["interrupted"] is not None or not result["main"]:
        return result
    summary = {"task": "reconstruct" if r.noise_snr_db is None else "denoise", "metric": "r2",
               "init": cfg.finetune.init, "layer": cfg.head.layer or "last", "steps": result["step"],
               "skipped_steps": result["skipped_steps"]}
    if cfg.data.valid:
        summary["valid"] = evaluate(head, cfg.data.valid)
    if cfg.test:
        summary["test"] = evaluate(head, cfg.test)
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**result, **summary}
