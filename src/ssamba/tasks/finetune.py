"""Downstream fine-tuning and evaluation (``ssamba finetune`` / ``ssamba evaluate``), top to bottom.

Two modes over any spectrogram encoder (SSAMBA or SSAST; pretrained, imported or from scratch):

* ``finetune``: the whole encoder plus its official ``avgtok`` head (LayerNorm + Linear on the mean of the
  final patch tokens), trained with the task's official recipe (``ssamba.tasks.recipes``): Adam, a head
  learning-rate multiplier, warm-up, per-epoch MultiStepLR, SpecAugment, mixup, noise, weight averaging.
* ``probe``: SUPERB-style frozen encoder, a learnable softmax-weighted sum of every layer's (LayerNormed)
  tokens, mean pooling over the valid patch tokens, one Linear layer. Only the layer weights and the
  linear layer train. The frozen encoder is run once per split and its per-layer vectors cached (exact,
  because LayerNorm is per token and the weighted sum and the mean are linear).

One optimizer step: next batch from the resumable sampler (seeded permutation per epoch), augmentation
from the run's own generator, forward, loss, backward, step; the learning rate is recomputed from
(step, epochs done). Validation at each epoch end (or every ``log.eval_every`` steps) keeps the best
model by the task metric in ``RUN/best``; checkpoints (``RUN/checkpoints/step_N``, atomic safetensors +
JSON) hold the model, optimizer, sampler position, best-so-far, weight-average sums and every RNG, so a
resumed run continues exactly. At the end the best (or weight-averaged) model is scored on valid and
test: ``RUN/metrics.json``, ``RUN/results.md``, ``RUN/confusion.png`` (single-label tasks).

Shape glossary: B batch, T frames, F mel bins, K tokens, S special tokens, C width, L layers, Q classes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba import features as feats
from ssamba.data.check import check_splits
from ssamba.data.datasets import AudioDataset
from ssamba.data.manifest import Example, LabelSet, read_manifest
from ssamba.data.sampler import ResumableBatchSampler
from ssamba.models.spectrogram import FAMILIES, create_model, load_pretrained
from ssamba.nn.layers import lengths_to_mask
from ssamba.tasks.metrics import confusion_matrix, markdown_table, plot_confusion, task_metrics
from ssamba.tasks.recipes import FinetuneConfig
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
from ssamba.train.guard import NonFiniteGuard
from ssamba.train.logging import MetricsLog

__all__ = [
    "InitSource",
    "WeightedSumProbe",
    "build_classifier",
    "evaluate",
    "finetune",
    "load_classifier",
    "resolve_init",
    "save_classifier",
]

META_FILE = "finetune.json"
PROBE_FILE = "probe.safetensors"


# ------------------------------------------------------------------------------------------------- models


class WeightedSumProbe(nn.Module):
    """Frozen encoder -> softmax(w)-weighted sum over layers of LayerNorm(tokens) -> mean over the valid
    patch tokens -> Linear (SUPERB's featurizer + a linear utterance classifier).

    ``layer_logits`` (L,) start at zero (equal weights). Only ``layer_logits`` and ``head`` are trainable;
    the encoder stays in eval mode (no dropout / stochastic depth) even when the probe trains. Before the
    weighted sum each layer's pooled vector is standardised with fixed training-set statistics
    (``feature_mean`` / ``feature_std`` (L, C) buffers, ``fit_standardization``), as a linear probe's
    affine-free BatchNorm (MAE): pooled LayerNormed tokens vary little between clips, and without it a
    short probe budget barely moves the classifier.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        c = encoder.config
        with torch.no_grad():  # layer count of any family: one tiny forward pass
            probe_in = torch.zeros(1, c.tshape, c.input_fdim)
            num_layers = len(encoder.extract_features(probe_in)[0])
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.head = nn.Linear(c.embed_dim, num_classes)
        self.register_buffer("feature_mean", torch.zeros(num_layers, c.embed_dim))
        self.register_buffer("feature_std", torch.ones(num_layers, c.embed_dim))

    @torch.no_grad()
    def fit_standardization(self, pooled: Tensor) -> None:
        """Per-layer, per-channel mean / std of training vectors (N, L, C)."""
        self.feature_mean.copy_(pooled.mean(0))
        self.feature_std.copy_(pooled.std(0, unbiased=False).clamp_min(1e-5))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def pooled_layers(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """fbank (B, T, F), lengths (B,) -> per-layer pooled vectors (B, L, C) (what the cache stores)."""
        hidden, token_lengths = self.encoder.extract_features(x, lengths)  # L x (B, K, C)
        s = self.encoder.num_special_tokens
        k = hidden[0].shape[1]
        valid = lengths_to_mask(token_lengths, k)  # (B, K)
        valid[:, :s] = False  # patch tokens only, as the avgtok head
        weights = (valid.float() / valid.sum(1, keepdim=True))[..., None]  # (B, K, 1)
        return torch.stack([(F.layer_norm(h, h.shape[-1:]) * weights).sum(1) for h in hidden], dim=1)

    def forward_pooled(self, pooled: Tensor) -> Tensor:
        """(B, L, C) -> logits (B, Q)."""
        w = torch.softmax(self.layer_logits, dim=0)
        pooled = (pooled - self.feature_mean) / self.feature_std
        return self.head(torch.einsum("l,blc->bc", w, pooled))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.forward_pooled(self.pooled_layers(x, lengths))

    @property
    def layer_weights(self) -> list[float]:
        return torch.softmax(self.layer_logits.detach(), dim=0).tolist()


@dataclass
class InitSource:
    """Where encoder weights come from. kind: "none", "folder" (save_pretrained) or "checkpoint"
    (a pretraining checkpoint step folder); ``pretrain`` is the pretraining run's config when known."""

    kind: str
    path: Path | None = None
    pretrain: dict | None = None

    @property
    def norm(self) -> tuple[float, float] | None:
        """(mean, std) the encoder was pretrained with, when known."""
        data = (self.pretrain or {}).get("data") or {}
        return (data["mean"], data["std"]) if "mean" in data and "std" in data else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_init(init: str | os.PathLike | None) -> InitSource:
    """``none`` | pretraining run folder (RUN/final) | save_pretrained folder | RUN/checkpoints/step_N."""
    if init is None or str(init) == "none":
        return InitSource("none")
    p = Path(init)
    if (p / "final" / "config.json").exists():
        return InitSource("folder", p / "final", _read_json(p / "config.json"))
    meta = _read_json(p / "config.json")
    if meta is not None and "family" in meta:
        run_cfg = _read_json(p.parent / "config.json")  # RUN/final -> RUN/config.json
        return InitSource("folder", p, run_cfg if run_cfg and "data" in run_cfg else None)
    if (p / "state.json").exists() and (p / "tensors.safetensors").exists():
        state = _read_json(p / "state.json") or {}
        if "config" not in state or "model" not in state["config"]:
            raise ValueError(f"{p}: a checkpoint without its run config; cannot rebuild the encoder")
        return InitSource("checkpoint", p, state["config"])
    raise FileNotFoundError(
        f"--init {p}: not a pretraining run (RUN/final), a save_pretrained folder (config.json + "
        "model.safetensors) or a checkpoint folder (state.json + tensors.safetensors)"
    )


def _encoder_overrides(cfg: FinetuneConfig, num_classes: int) -> dict:
    m = cfg.model
    overrides = {"input_tdim": cfg.data.target_length, "num_classes": num_classes, "pool": m.pool, **m.overrides}
    if m.fstride:
        overrides["fstride"] = m.fstride
    if m.tstride:
        overrides["tstride"] = m.tstride
    return overrides


def build_classifier(cfg: FinetuneConfig, num_classes: int, init: InitSource | None = None) -> nn.Module:
    """The model a run trains: the encoder with a ``num_classes`` head (finetune) or a WeightedSumProbe."""
    init = init or resolve_init(cfg.model.init)
    probe = cfg.task.mode == "probe"
    overrides = _encoder_overrides(cfg, 0 if probe else num_classes)
    if init.kind == "none":
        encoder = create_model(cfg.model.name, **overrides)
    elif init.kind == "folder":
        encoder = load_pretrained(init.path, **overrides)
    else:  # pretraining checkpoint: rebuild the pretraining encoder, then adapt its weights to this grid
        from safetensors.torch import load_file

        pm = init.pretrain["model"]
        source = create_model(pm["name"], **{"input_tdim": init.pretrain["data"]["target_length"], **pm["overrides"]})
        state = {k[len("model.encoder."):]: v for k, v in load_file(str(init.path / "tensors.safetensors")).items()
                 if k.startswith("model.encoder.")}  # fmt: skip
        cls = type(source)
        encoder = cls(cls.config_class.from_dict({**source.config.to_dict(), **overrides}))
        encoder.load_adapted_state_dict(state, source.config)
    family = cfg.model.name.split("_")[0]
    if family in FAMILIES and encoder.family != family:
        raise ValueError(f"--model {cfg.model.name} is a {family} model but --init {init.path} holds a "
                         f"{encoder.family} encoder")  # fmt: skip
    return WeightedSumProbe(encoder, num_classes) if probe else encoder


def _encoder(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, WeightedSumProbe) else model


def save_classifier(model: nn.Module, directory: Path, meta: dict) -> Path:
    """``directory``: the encoder's save_pretrained files (with its head when fine-tuned), ``probe.safetensors``
    for a probe, and ``finetune.json`` (mode, labels, input length and normalisation)."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _encoder(model).save_pretrained(tmp, {"notes": (
        f"Fine-tuned by `ssamba finetune` (task {meta.get('task')}, {meta.get('mode')}; the checkpoint of the best "
        f"validation, step {meta.get('step')}); labels and normalisation are in `{META_FILE}`, load it with "
        "`ssamba.tasks.finetune.load_classifier`.")})
    if isinstance(model, WeightedSumProbe):
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not k.startswith("encoder.")}  # fmt: skip
        save_file(state, str(tmp / PROBE_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_classifier(directory: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Inverse of :func:`save_classifier`; accepts a fine-tuning run folder (uses RUN/best)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / META_FILE).exists() and (directory / "best" / META_FILE).exists():
        directory = directory / "best"
    meta = _read_json(directory / META_FILE)
    if meta is None:
        raise FileNotFoundError(f"{directory}: no {META_FILE}; expected a fine-tuning run or its best/ folder")
    encoder = load_pretrained(directory)
    if meta["mode"] == "probe":
        model = WeightedSumProbe(encoder, len(meta["labels"]["mids"]))
        model.load_state_dict({**load_file(str(directory / PROBE_FILE)),
                               **{"encoder." + k: v for k, v in encoder.state_dict().items()}})  # fmt: skip
    else:
        model = encoder
    return model.eval(), meta


# ------------------------------------------------------------------------------------------- augmentation


def _augment(x: Tensor, lengths: Tensor, y: Tensor, cfg: FinetuneConfig, pad_value: float,
             gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Official training-time augmentation on a normalised fbank batch (B, T, F), in the official order.

    mixup: with probability p an item is mixed with another item of the batch, lambda ~ Beta(10, 10), labels
    mixed alike (official ``AudioDataset``: waveform mixing with a random dataset item; here fbank mixing with
    a random batch item, so it needs no second decode). SpecAugment: one frequency and one time mask per
    item of width U{0..m-1} (torchaudio ``FrequencyMasking`` / ``TimeMasking``), filled with what zero
    becomes after normalisation (upstream masks before normalising). noise: + U(0,1)*U(0,1)/10, then roll
    the time axis by U{-10..9} frames (official ``noise``).
    """
    a = cfg.augment
    x, lengths, y = x.clone(), lengths.clone(), y.clone()
    b, t, f = x.shape
    if a.mixup > 0:
        partner = torch.randint(0, b, (b,), generator=gen)
        mix = torch.rand(b, generator=gen) < a.mixup
        lam = _beta(b, gen)
        lam = torch.where(mix, lam, torch.ones_like(lam))
        x = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
        y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
        lengths = torch.where(mix, torch.maximum(lengths, lengths[partner]), lengths)
    for width, axis, size in ((a.freqm, 2, f), (a.timem, 1, t)):
        if width <= 0:
            continue
        w = (torch.rand(b, generator=gen) * width).long()  # U{0..width-1}
        start = (torch.rand(b, generator=gen) * (size - w + 1).float()).long()
        pos = torch.arange(size)[None, :]
        band = (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (B, size)
        x = x.masked_fill(band[:, None, :] if axis == 2 else band[:, :, None], pad_value)
    if a.noise:
        scale = torch.rand(b, 1, 1, generator=gen) / 10
        x = x + torch.rand(x.shape, generator=gen) * scale
        shifts = torch.randint(-10, 10, (b,), generator=gen).tolist()
        x = torch.stack([torch.roll(row, s, dims=0) for row, s in zip(x, shifts, strict=True)])
    return x, lengths, y


def _beta(n: int, gen: torch.Generator, alpha: float = 10.0) -> Tensor:
    """Beta(alpha, alpha) samples from the run's generator (ratio of Gamma variates via sums of
    exponentials: alpha is an integer here, so Gamma(alpha) = sum of alpha Exp(1))."""
    e = -torch.log(torch.rand(n, 2, int(alpha), generator=gen).clamp_min(1e-12)).sum(-1)
    return e[:, 0] / e.sum(-1)


# --------------------------------------------------------------------------------------------------- data


class MemoDataset(AudioDataset):
    """An AudioDataset whose decoded, normalised fbank is kept in a shared in-process memo keyed by
    (file, target_length, mean, std), so several runs over the same clips (the comparison table, k folds,
    a second epoch) compute each clip's fbank once. Labels are encoded per dataset, so tasks that share
    audio (keywords / speakers) share features too. Memory: clips x target_length x 128 x 4 bytes."""

    memo: dict = {}

    def __getitem__(self, index: int) -> dict | None:
        key = (str(self.examples[index].path), self.target_length, self.mean, self.std)
        hit = self.memo.get(key)
        if hit is None:
            item = super().__getitem__(index)
            if item is None:
                return None
            self.memo[key] = (item["features"], item["length"])
            return item
        item = {"index": index, "features": hit[0], "length": hit[1]}
        if self.labels is not None:
            item["labels"] = self.labels.encode(self.examples[index].labels)
        return item


def _dataset(source, labels: LabelSet, cfg: FinetuneConfig, mean: float, std: float) -> AudioDataset:
    cls = MemoDataset if cfg.data.cache_features else AudioDataset
    return cls(source, labels, target_length=cfg.data.target_length, mean=mean, std=std, skip_bad=cfg.data.skip_bad)


def _loader(ds: AudioDataset, batch_size: int, workers: int, sampler=None):
    # own generator: building a DataLoader iterator must not draw from the global RNG (resume exactness)
    kwargs = {"batch_sampler": sampler} if sampler is not None else {"batch_size": batch_size, "shuffle": False}
    return torch.utils.data.DataLoader(ds, collate_fn=ds.collate, num_workers=workers,
                                       persistent_workers=workers > 0 and sampler is not None,
                                       generator=torch.Generator(), **kwargs)  # fmt: skip


@torch.no_grad()
def _predict(model: nn.Module, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, Q) and targets (N, Q) over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in loader:
        if batch["features"].numel() == 0:
            continue
        scores.append(model(batch["features"].to(device), batch["lengths"].to(device)).float().cpu())
        targets.append(batch["labels"])
    model.train(was_training)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


_POOLED_MEMO: dict = {}


def _fingerprint(module: nn.Module) -> tuple:
    """Identifies an encoder's weights (float64 sums and shapes of every tensor) for the pooled-vector memo."""
    with torch.no_grad():
        return tuple((k, tuple(v.shape), float(v.double().sum()), float(v.double().abs().sum()))
                     for k, v in module.state_dict().items())  # fmt: skip


@torch.no_grad()
def _cache_pooled(probe: WeightedSumProbe, ds: AudioDataset, loader, device) -> tuple[Tensor, Tensor]:
    """Per-layer pooled vectors (N, L, C) and targets (N, Q) of a whole split. With a MemoDataset the vectors
    are also kept per (encoder weights, file, input), so probes of one encoder over tasks that share audio
    (keywords / speakers) run the encoder once per clip."""
    memo = isinstance(ds, MemoDataset)
    tag = (_fingerprint(probe.encoder), ds.target_length, ds.mean, ds.std) if memo else None
    keys = [(tag, str(e.path)) for e in ds.examples] if memo else []
    if memo and all(k in _POOLED_MEMO for k in keys):
        targets = torch.stack([ds.labels.encode(e.labels) for e in ds.examples])
        return torch.stack([_POOLED_MEMO[k] for k in keys]), targets
    pooled, targets = [], []
    for batch in loader:
        if batch["features"].numel() == 0:
            continue
        vectors = probe.pooled_layers(batch["features"].to(device), batch["lengths"].to(device)).cpu()
        pooled.append(vectors)
        targets.append(batch["labels"])
        if memo:
            for i, v in zip(batch["indices"].tolist(), vectors, strict=True):
                _POOLED_MEMO[keys[i]] = v
    return torch.cat(pooled), torch.cat(targets)


# ------------------------------------------------------------------------------------------- the run


def _loss(logits: Tensor, targets: Tensor, kind: str) -> Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()  # CE with (mixed) soft targets


def _lr_factor(cfg: FinetuneConfig, step: int, epochs_done: int) -> float:
    """Warm-up (the pretraining loop's form of the official one: lr * step/warmup, updated every
    warmup_every steps) times the per-epoch MultiStepLR decay (milestones lr_start, lr_start + lr_step, ...)."""
    o = cfg.optim
    factor = 1.0
    if o.warmup_steps > 0 and step < o.warmup_steps:
        factor = min(1.0, (step - step % o.warmup_every + o.warmup_every) / o.warmup_steps)
    if o.lr_decay != 1.0 and epochs_done >= o.lr_start:
        factor *= o.lr_decay ** ((epochs_done - o.lr_start) // o.lr_step + 1)
    return factor


def _param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Head parameters at lr * head_lr (the official ``mlp_list``), the rest at lr; frozen ones left out."""
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith("head.") or name == "layer_logits" else body).append(p)
    groups = [{"params": body, "lr_scale": 1.0}] if body else []
    return groups + [{"params": head, "lr_scale": cfg.optim.head_lr}]


def _splits(cfg: FinetuneConfig) -> dict:
    d = cfg.data
    if not d.train or not d.valid:
        raise ValueError("fine-tuning needs data.train and data.valid (--train, --valid)")
    return {"train": d.train, "valid": d.valid, **({"test": d.test} if d.test else {})}


def finetune(cfg: FinetuneConfig, run: str | os.PathLike, resume: bool = False, log=print) -> dict:
    """Run the fine-tuning ``cfg`` describes in ``run`` (k folds when ``data.folds`` > 0); returns the
    metrics.json dict (plus "interrupted" when stopped by a signal)."""
    cfg.validate()
    if not cfg.data.labels:
        raise ValueError("fine-tuning needs data.labels (--labels CSV)")
    # every split's files from their headers, before anything is built (k folds: the train manifest holds them all)
    check_splits({"train": cfg.data.train} if cfg.data.folds > 0 else _splits(cfg), skip_bad=cfg.data.skip_bad,
                 log=log)
    if cfg.data.folds > 0:
        return _finetune_folds(cfg, Path(run), resume, log)
    return _finetune_once(cfg, Path(run), _splits(cfg), resume, log)


def _finetune_folds(cfg: FinetuneConfig, run: Path, resume: bool, log) -> dict:
    """k-fold cross-validation over the train manifest: fold i is validation and test of run RUN/fold_i
    (the official ESC-50 protocol: valid = eval fold); metrics are means over folds."""
    k = cfg.data.folds
    examples = read_manifest(cfg.data.train)
    keyed = [e.extra.get(cfg.data.fold_key) for e in examples]
    if all(v is not None for v in keyed):
        names = sorted({str(v) for v in keyed})
        if len(names) != k:
            raise ValueError(f"{cfg.data.train}: data.folds = {k} but entries carry {len(names)} distinct "
                             f"{cfg.data.fold_key!r} values ({', '.join(names)})")  # fmt: skip
        fold_of = [names.index(str(v)) for v in keyed]
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        fold_of = [0] * len(examples)
        for rank, i in enumerate(order):
            fold_of[i] = rank % k
    results = []
    for i in range(k):
        held: list[Example] = [e for e, f in zip(examples, fold_of, strict=True) if f == i]
        rest: list[Example] = [e for e, f in zip(examples, fold_of, strict=True) if f != i]
        sub = copy.deepcopy(cfg)
        sub.data.folds = 0
        log(f"fold {i + 1}/{k}: {len(rest)} train, {len(held)} held out")
        result = _finetune_once(sub, run / f"fold_{i + 1}", {"train": rest, "valid": held, "test": held}, resume, log)
        if result.get("interrupted"):
            return result
        results.append(result)
    summary = {key: results[0][key] for key in ("task", "metric", "mode", "model", "init")}
    for split in ("valid", "test"):
        values = [r[split] for r in results]
        summary[split], summary[f"{split}_std"] = float(np.mean(values)), float(np.std(values))
    summary["folds"] = [{"fold": i + 1, "valid": r["valid"], "test": r["test"]} for i, r in enumerate(results)]
    summary["skipped_steps"] = sum(r["skipped_steps"] for r in results)
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = [{"fold": f["fold"], cfg.task.metric: f["test"]} for f in summary["folds"]]
    rows.append({"fold": "mean", cfg.task.metric: summary["test"]})
    (run / "results.md").write_text(markdown_table(rows, ["fold", cfg.task.metric]))
    return summary


def _finetune_once(cfg: FinetuneConfig, run: Path, splits: dict, resume: bool, log) -> dict:
    ckpt_dir = run / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if not resume and latest_checkpoint(ckpt_dir) is not None:
        raise FileExistsError(f"{run} already holds checkpoints; pass --resume to continue it or pick a new --out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    device_kind = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_kind)

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    aug_gen = torch.Generator().manual_seed(cfg.train.seed + 1)

    # -- labels, normalisation, model
    labels = LabelSet.from_csv(cfg.data.labels)
    init = resolve_init(cfg.model.init)
    norm = init.norm or (feats.AUDIOSET_LIBRISPEECH_MEAN, feats.AUDIOSET_LIBRISPEECH_STD)
    mean = cfg.data.mean if cfg.data.mean is not None else norm[0]
    std = cfg.data.std if cfg.data.std is not None else norm[1]
    model = build_classifier(cfg, len(labels), init).to(device)
    probe = isinstance(model, WeightedSumProbe)

    datasets = {name: _dataset(src, labels, cfg, mean, std) for name, src in splits.items()}
    train_set = datasets["train"]
    bs = cfg.train.batch_size
    sampler = ResumableBatchSampler(len(train_set), min(bs, len(train_set)), 1, cfg.train.seed)
    augmenting = cfg.augment.mixup > 0 or cfg.augment.freqm > 0 or cfg.augment.timem > 0 or cfg.augment.noise
    cached = probe and cfg.train.cache_probe_features and not augmenting
    workers = cfg.data.num_workers
    eval_loaders = {name: _loader(ds, bs, workers) for name, ds in datasets.items() if name != "train"}
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    if cached:  # one pass of the frozen encoder per split
        tick = time.perf_counter()
        cache = {name: _cache_pooled(model, ds, _loader(ds, bs, workers), device) for name, ds in datasets.items()}
        log(f"probe: cached per-layer vectors of {sum(len(v[0]) for v in cache.values())} clips in "
            f"{time.perf_counter() - tick:.1f} s")  # fmt: skip
    loader = None if cached else _loader(train_set, bs, workers, sampler)
    if probe and latest is None:  # fixed standardisation statistics from the (un-augmented) training split
        train_pooled = cache["train"][0] if cached else _cache_pooled(model, train_set, _loader(train_set, bs, workers),
                                                                      device)[0]  # fmt: skip
        model.fit_standardization(train_pooled.to(device))

    # -- optimisation
    o = cfg.optim
    groups = _param_groups(model, cfg)
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(groups, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    bpe = sampler.batches_per_epoch
    total = cfg.train.steps if cfg.train.steps > 0 else cfg.train.epochs * bpe
    wa_on = o.wa_start > 0 and o.wa_end >= o.wa_start
    wa_sum: dict[str, Tensor] = {}
    wa_count = 0
    step, best, best_step, first_loss = 0, -math.inf, 0, None

    if latest is not None:
        tensors, state = load_checkpoint(latest)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(optimizer, tensors, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(tensors, state["rng"], aug_gen)
        wa_sum = {k[len("wa."):]: v for k, v in tensors.items() if k.startswith("wa.")}
        wa_count, step, best, best_step = state["wa_count"], state["step"], state["best"], state["best_step"]
        first_loss = state["first_loss"]
        log(f"resumed {run} from {latest.name} (step {step})")
    metrics_log = MetricsLog(run, cfg.log.tensorboard, resume_step=step if latest is not None else None)
    # non-finite losses: skipped (no update), counted, the run stops after train.max_bad_steps in a row
    guard = NonFiniteGuard(cfg.train.max_bad_steps, metrics_log.log, ckpt_dir)
    if latest is not None:
        guard.load_state_dict(state)

    meta = {"mode": cfg.task.mode, "task": cfg.task.name, "model": cfg.model.name, "init": cfg.model.init,
            "labels": {"mids": labels.mids, "names": labels.names}, "target_length": cfg.data.target_length,
            "mean": mean, "std": std, "loss": cfg.task.loss, "metric": cfg.task.metric,
            "multilabel": cfg.task.multilabel}  # fmt: skip

    def scores_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        if cached:
            with torch.no_grad():
                return model.forward_pooled(cache[split][0].to(device)).cpu().numpy(), cache[split][1].numpy()
        return _predict(model, eval_loaders[split], device)

    last_valid: dict = {}

    def validate() -> dict:
        nonlocal best, best_step
        guard.check_weights(model, step)  # a new best is saved below
        s, t = scores_of("valid")
        last_valid.update(step=step, scores=(s, t))
        result = task_metrics(s, t, cfg.task.multilabel)
        if result[cfg.task.metric] > best:
            best, best_step = result[cfg.task.metric], step
            save_classifier(model, run / "best", {**meta, "step": step})
        metrics_log.log({"step": step, "split": "valid", **result, "best": best})
        return result

    def save_checkpoint() -> None:
        guard.check_weights(model, step)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"wa.{k}": v for k, v in wa_sum.items()})
        opt_tensors, opt_meta = optimizer_state(optimizer)
        rng_tensors, rng_meta = rng_state(aug_gen)
        state = {"step": step, "optimizer": opt_meta, "sampler": sampler.state_dict(), "rng": rng_meta,
                 "wa_count": wa_count, "best": best, "best_step": best_step, "first_loss": first_loss,
                 **guard.state_dict(), "config": cfg.to_dict()}  # fmt: skip
        write_checkpoint(ckpt_dir, step, {**tensors, **opt_tensors, **rng_tensors}, state, cfg.log.keep_last)

    stop, restore_signals = catch_stop_signals()
    bar = None
    if cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc=f"{cfg.task.name} {cfg.task.mode}")
    batches = None if cached else iter(loader)
    order_cache: list = []
    model.train()
    tick = time.perf_counter()
    train_seconds = 0.0
    loss_value = float("nan")
    try:
        while step < total:
            # -- learning rate of this step
            factor = _lr_factor(cfg, step, sampler.epoch)
            for g in optimizer.param_groups:
                g["lr"] = o.lr * g["lr_scale"] * factor
            # -- batch
            if cached:
                if not order_cache:
                    order_cache = list(iter(sampler))
                rows = torch.tensor(order_cache.pop(0))
                x, y = cache["train"][0][rows].to(device), cache["train"][1][rows].to(device)
                logits = model.forward_pooled(x)
            else:
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                x, lengths, y = batch["features"], batch["lengths"], batch["labels"]
                if augmenting:
                    x, lengths, y = _augment(x, lengths, y, cfg, train_set.pad_value, aug_gen)
                logits = model(x.to(device), lengths.to(device))
                y = y.to(device)
            loss = _loss(logits, y, cfg.task.loss)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # a NaN / inf loss is skipped (ssamba.train.guard): no backward, no update; its batch is consumed
            skipped = not guard.check(float(loss.detach()), step, optimizer)
            if not skipped:
                loss.backward()
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], o.grad_clip)
                optimizer.step()
                loss_value = float(loss.detach())
                if first_loss is None:
                    first_loss = loss_value
            sampler.advance()
            epoch_end = sampler.batch == 0
            if cached and epoch_end:
                order_cache = []
            now = time.perf_counter()
            train_seconds += now - tick
            # -- weight averaging of end-of-epoch weights (official wa: epochs wa_start..wa_end); a skipped step
            # left the weights as they were, so they still count
            if wa_on and epoch_end and o.wa_start <= sampler.epoch <= o.wa_end:
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        wa_sum[k] = wa_sum.get(k, torch.zeros_like(v, device="cpu")) + v.detach().cpu()
                wa_count += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", best=f"{best:.3f}")
                bar.update(1)
            if skipped and step < total and stop["signal"] is None:
                # nothing is evaluated or written after a skipped step (as pretraining)
                tick = time.perf_counter()
                continue
            if not skipped and (step % cfg.log.log_every == 0 or step == total):
                metrics_log.log({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                 "epoch": sampler.epoch})  # fmt: skip
            at_eval = step == total or (epoch_end if cfg.log.eval_every == 0 else step % cfg.log.eval_every == 0)
            if at_eval:
                validate()
            interrupted = stop["signal"] is not None
            if step % cfg.log.ckpt_every == 0 or step == total or interrupted:
                save_checkpoint()
            tick = time.perf_counter()
            if interrupted:
                return {"interrupted": stop["signal"], "step": step}
    finally:
        restore_signals()
        if bar is not None:
            bar.close()
        metrics_log.close()

    # -- final model: weight average when configured, else the best by validation
    if wa_on and wa_count:
        state = model.state_dict()
        state.update({k: (v / wa_count).to(state[k].dtype) for k, v in wa_sum.items()})
        model.load_state_dict(state)
        guard.check_weights(model, step)
        save_classifier(model, run / "best", {**meta, "step": step, "weight_averaged": wa_count})
        chosen = "weight average"
    else:
        final, _ = load_classifier(run / "best")
        model.load_state_dict(final.state_dict())
        chosen = f"best valid (step {best_step})"
    # the chosen model's predictions (the last validation's, when that is the chosen model: no second pass)
    final_scores = {}
    for name in ("valid", "test"):
        if name == "valid" and not (wa_on and wa_count) and last_valid.get("step") == best_step == step:
            final_scores[name] = last_valid["scores"]
        elif name in datasets:
            final_scores[name] = scores_of(name)
    results = {name: task_metrics(*st, cfg.task.multilabel) for name, st in final_scores.items()}
    metric = cfg.task.metric
    out = {"task": cfg.task.name, "metric": metric, "valid": results["valid"][metric],
           "test": results["test"][metric] if "test" in results else None, "mode": cfg.task.mode,
           "model": cfg.model.name, "init": cfg.model.init, "chosen": chosen, "best_step": best_step,
           "steps": step, "epochs": round(step / bpe, 3), "batch_size": sampler.batch_size,
           "train_items": len(train_set), "num_classes": len(labels), "first_loss": first_loss,
           "last_loss": loss_value, "train_seconds": round(train_seconds, 2),
           "skipped_steps": guard.skipped_steps, "splits": results}  # fmt: skip
    if probe:
        out["layer_weights"] = model.layer_weights
    split = "test" if "test" in results else "valid"
    if not cfg.task.multilabel:
        matrix = confusion_matrix(*final_scores[split], len(labels))
        (run / "confusion.json").write_text(json.dumps({"split": split, "labels": labels.mids,
                                                        "matrix": matrix.tolist()}) + "\n")  # fmt: skip
        title = f"{cfg.model.name} {cfg.task.mode} on {cfg.task.name} ({split})"
        png = plot_confusion(matrix, labels.names if len(labels) <= 40 else labels.mids, run / "confusion.png", title)
        out["confusion"] = png.name if png else None
    (run / "metrics.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = [{"split": name, **values} for name, values in results.items()]
    columns = ["split", *results["valid"].keys()]
    header = (f"{cfg.model.name} ({cfg.task.mode}, init {cfg.model.init}) on {cfg.task.name}: {step} steps of "
              f"{sampler.batch_size}; model = {chosen}\n\n")  # fmt: skip
    (run / "results.md").write_text(header + markdown_table(rows, columns))
    return out


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate(ckpt: str | os.PathLike, test: str | os.PathLike, labels: str | os.PathLike | None = None,
             batch_size: int = 32, skip_bad: bool = False, device: str = "cpu") -> dict:
    """Score a fine-tuned model (a run folder or its best/) on a manifest: {"metric", "value", ...}."""
    model, meta = load_classifier(ckpt)
    saved = LabelSet(meta["labels"]["mids"], meta["labels"]["names"])
    label_set = saved
    if labels is not None:
        label_set = LabelSet.from_csv(labels)
        if label_set.mids != saved.mids:
            raise ValueError(f"{labels}: label set differs from the one {ckpt} was trained with "
                             f"({len(label_set)} vs {len(saved)} classes or another order)")  # fmt: skip
    unusable = check_splits({"test": test}, skip_bad=skip_bad, log=None, hint="pass --skip-bad")["test"]
    ds = AudioDataset(test, label_set, target_length=meta["target_length"], mean=meta["mean"], std=meta["std"],
                      skip_bad=skip_bad)  # fmt: skip
    model.to(device)
    scores, targets = _predict(model, _loader(ds, batch_size, 0), torch.device(device))
    result = task_metrics(scores, targets, meta["multilabel"])
    return {"task": meta["task"], "metric": meta["metric"], "value": result[meta["metric"]], "items": len(targets),
            "unusable_files": unusable, "mode": meta["mode"], "model": meta["model"], **result}

