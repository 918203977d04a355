"""Mamba-HuBERT masked-prediction pretraining (``ssamba hubert pretrain``) on the engine (``ssamba.train.engine``),
and what the HuBERT-family tasks share (the CTC and reconstruction tasks of ``ssamba.tasks`` build on it): the
config sections, the engine's set-up, the learning-rate schedule and the per-step mask generator. (Their waveform
dataset is ``ssamba.data.waveform.WaveformSet``.)

A step: AdamW (decay on matrices only) with linear warm-up and linear decay (fairseq ``polynomial_decay``, power 1),
gradient clipping, ``grad_accum`` micro-batches. Span masks are drawn from a generator seeded by (seed, step, rank,
micro-batch), so a resumed or multi-process run draws exactly the masks of an uninterrupted one without saving
mask state.

Shape glossary: B batch, S samples, T frames (50 Hz), U transcript characters, F fbank frames, M mel bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssamba.data.waveform import WaveformSet
from ssamba.models.hubert import create_hubert
from ssamba.pretrain.hubert_loss import IGNORE, HuBERTPretraining, downsample_labels, span_mask
from ssamba.pretrain.kmeans import read_labels_for
from ssamba.train.config import DataSection, LogSection, OptimSection, RunConfig, TrainSection
from ssamba.train.engine import Engine, check_data

__all__ = ["HuBERTDataSection", "HuBERTModelSection", "HuBERTOptimSection", "HuBERTPretrainConfig", "HuBERTRun",
           "SpanMaskSection", "hubert_engine", "lr_at", "mask_generator", "prepare", "pretrain_hubert"]


# --------------------------------------------------------------------------------------------------- config


@dataclass
class HuBERTModelSection:
    # encoder: transformer | extbimamba | innbimamba | conbimamba
    encoder: str = "extbimamba"
    # preset: base (HuBERT-base sizes), small (CPU demo), tiny (tests)
    size: str = "small"
    # HuBERTConfig overrides, e.g. {depth = 6, combine = "concat", use_ffn = false}
    overrides: dict = field(default_factory=dict)


@dataclass
class HuBERTDataSection(DataSection):
    # label folder written by `ssamba hubert labels` (holds <manifest stem>.km for train and valid)
    labels: str = ""
    # clips longer than this are cut (labels cut with them); HuBERT: 250000. Pretraining cuts at a random
    # offset on the 20 ms frame grid (HuBERT's random crop), fine-tuning keeps the start
    max_samples: int = 250000


@dataclass
class SpanMaskSection:
    # span masks of the input frames: HuBERT's mask_prob 0.8, span 10 frames (200 ms), overlapping spans, at least
    # min_masks spans per item (pretraining: an equal masked count per batch)
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
class HuBERTOptimSection(OptimSection):
    # HuBERT base: Adam(0.9, 0.98), eps 1e-6, wd 0.01 (not on biases, norms, _no_weight_decay), peak 5e-4,
    # 8% warm-up, clip 10
    decay: str = "matrices"
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float = 10.0
    # linear decay to final_lr_scale * lr at the last step (1.0 = constant after warm-up)
    final_lr_scale: float = 0.0


@dataclass
class HuBERTRun(RunConfig):
    """The sections every HuBERT-family run config has (pretraining here, CTC and reconstruction in
    ``ssamba.tasks``) and their validation: the encoder, size and overrides build a model config."""

    model: HuBERTModelSection = field(default_factory=HuBERTModelSection)
    data: HuBERTDataSection = field(default_factory=HuBERTDataSection)
    optim: HuBERTOptimSection = field(default_factory=HuBERTOptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        super().validate()
        if self.train.steps < 1:
            raise ValueError("train.steps must be positive")
        # building the model config checks encoder, size and overrides
        from ssamba.models.hubert import HuBERTConfig, hubert_presets

        presets = hubert_presets()
        if self.model.size not in presets:
            raise ValueError(f"model.size must be one of {', '.join(presets)}, got {self.model.size!r}")
        HuBERTConfig.from_dict({**presets[self.model.size], "encoder": self.model.encoder, **self.model.overrides})


@dataclass
class HuBERTPretrainConfig(HuBERTRun):
    mask: SpanMaskSection = field(default_factory=SpanMaskSection)
    loss: LossSection = field(default_factory=LossSection)


# ----------------------------------------------------------------------------------------------------- step


def lr_at(step: int, o: HuBERTOptimSection, total: int) -> float:
    """Linear warm-up to lr over warmup_steps, then linear decay to final_lr_scale * lr at ``total``."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    return o.lr * (1.0 - (1.0 - o.final_lr_scale) * min(frac, 1.0))


def mask_generator(eng: Engine, step: int, micro: int) -> torch.Generator:
    """The generator of micro-batch ``micro`` of ``step``, seeded by train.seed, the step and the global micro-batch
    index ``micro * world + rank`` (the sampler's order), so that one process with grad_accum = W and W processes
    draw the same masks for the same items."""
    seed, ddp = eng.cfg.train.seed, eng.ddp
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10007 + micro * ddp.world + ddp.rank)


def hubert_engine(cfg: HuBERTRun, run: str | Path, resume: bool, test: str = "") -> Engine:
    """A HuBERT-family run's engine: the config validated and every split's files checked, before anything is built."""
    cfg.validate()
    check_data({"train": cfg.data.train, "valid": cfg.data.valid, "test": test}, cfg.data.skip_bad)
    return Engine(run, cfg, resume)


def prepare(eng: Engine, module: torch.nn.Module, train_set) -> None:
    """``eng.prepare`` as every HuBERT-family run does it (DDP tolerates parameters a step leaves unused)."""
    cfg = eng.cfg
    eng.prepare(module, train_set, cfg.train.batch_size, cfg.train.grad_accum, cfg.data.num_workers, find_unused=True)


# ------------------------------------------------------------------------------------------------ pretraining


def pretrain_hubert(cfg: HuBERTPretrainConfig, run: str | Path, resume: bool = False) -> dict:
    """HuBERT masked prediction on k-means targets. Writes RUN/final (``save_pretrained``: the encoder, loadable
    by ``ssamba.models.load_pretrained``) and RUN/final/hubert_heads.safetensors (final_proj, label_embs)."""
    run = Path(run)
    if not cfg.data.labels:
        raise ValueError("data.labels: a label folder from `ssamba hubert labels` is required")
    eng = hubert_engine(cfg, run, resume)
    train_labels, meta = read_labels_for(cfg.data.labels, cfg.data.train)
    model = create_hubert(cfg.model.encoder, cfg.model.size, **cfg.model.overrides)
    if meta.get("conv") is not None and meta["label_rate"] != model.config.frame_rate:
        raise ValueError(f"labels at {meta['label_rate']} Hz do not fit the model's {model.config.frame_rate} Hz")
    L = cfg.loss
    objective = HuBERTPretraining(model, meta["k"], L.final_dim, L.logit_temp, L.masked_weight, L.unmasked_weight,
                                  L.feature_pen_weight)
    rate = meta["label_rate"]
    majority = int(torch.bincount(torch.cat(train_labels), minlength=meta["k"]).argmax())
    prepare(eng, objective, WaveformSet(cfg.data.train, cfg.data.max_samples, cfg.data.skip_bad, train_labels, rate,
                                        random_crop=True, hop=model.config.hop, label_pad=IGNORE))
    valid_set = None
    if cfg.data.valid:
        valid_labels, _ = read_labels_for(cfg.data.labels, cfg.data.valid)
        valid_set = WaveformSet(cfg.data.valid, cfg.data.max_samples, cfg.data.skip_bad, valid_labels, rate,
                                label_pad=IGNORE)
    m = cfg.mask

    def forward(obj, batch: dict, gen: torch.Generator) -> Any:
        """obj: the objective or its DDP wrapper (called, so that DDP sees the forward)."""
        wave, lengths = batch["features"].to(eng.device), batch["lengths"].to(eng.device)
        frames = model.frame_lengths(lengths)
        t = int(model.frame_lengths(torch.tensor([wave.shape[1]]))[0])
        mask = span_mask(frames.cpu(), t, m.prob, m.span, m.min_masks, generator=gen)
        targets = downsample_labels(batch["targets"], rate, model.config.frame_rate, t)
        out = obj(wave, lengths, targets, mask)
        out.masked_targets = targets[mask & (torch.arange(t)[None, :] < frames.cpu()[:, None])]  # for the prior
        return out

    def micro(step: int):
        def fn(batch: dict, a: int):
            out = forward(eng.model, batch, mask_generator(eng, step, a))
            return out.loss, {"loss_m": out.loss_m, "loss_u": out.loss_u, "acc_m": out.acc_m, "acc_u": out.acc_u,
                              "feature_pen": out.feature_pen}
        return fn

    def step_fn(step: int):
        eng.set_lr(lr_at(step, cfg.optim, cfg.train.steps))
        return eng.accumulate(micro(step), cfg.train.grad_accum)

    @torch.no_grad()
    def eval_fn(step: int) -> dict:
        if not eng.ddp.main:
            return {}
        objective.eval()
        loader = torch.utils.data.DataLoader(valid_set, batch_size=cfg.train.batch_size, collate_fn=valid_set.collate)
        gen = torch.Generator().manual_seed(1234)  # the same masks at every validation
        tot = {"loss_m": 0.0, "acc_m": 0.0, "acc_u": 0.0, "prior": 0.0}
        n_m = n_u = 0
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            out = forward(objective, batch, gen)
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

    result = eng.fit(step_fn, cfg.train.steps, eval_fn if valid_set is not None else None)
    if result["interrupted"] is None and result["main"]:
        from safetensors.torch import save_file

        final = model.save_pretrained(run / "final", {
            "command": f"ssamba hubert pretrain --train {cfg.data.train} --labels {cfg.data.labels} --out {run} "
                       f"--config {run / 'config.json'}", "config": cfg.to_dict(),
            "metrics": {f"valid {k}": v for k, v in result["valid"].items()}})
        heads = {k: v.detach().contiguous() for k, v in objective.state_dict().items() if not k.startswith("model.")}
        save_file(heads, str(final / "hubert_heads.safetensors"))  # final_proj, label_embs: all but the encoder
        result["final"] = str(final)
    return result

