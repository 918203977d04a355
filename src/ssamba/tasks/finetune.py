"""Downstream fine-tuning and evaluation (``ssamba finetune`` / ``ssamba evaluate``), top to bottom.

Two modes over any spectrogram encoder (SSAMBA or SSAST; pretrained, imported or from scratch):

* ``finetune``: the whole encoder plus its official ``avgtok`` head (LayerNorm + Linear on the mean of the
  final patch tokens), trained with the task's official recipe (``ssamba.tasks.recipes``): Adam, a head
  learning-rate multiplier, warm-up, per-epoch MultiStepLR, SpecAugment, mixup, noise, weight averaging.
* ``probe``: SUPERB-style frozen encoder, a learnable softmax-weighted sum of every layer's (LayerNormed)
  tokens, mean pooling over the valid patch tokens (or ``task.probe_pool = "row_stats"``: mean and std per
  frequency row), one Linear layer. Only the layer weights and the linear layer train. The frozen encoder is
  run once per split and its per-layer pooled vectors cached (exact: the probe pools each layer before the
  weighted sum, cached or not).

A step function and an eval function on the engine (``ssamba.train.engine``: DDP under torchrun, bf16 / fp16,
gradient accumulation, the non-finite guard, exact resume). One optimizer step: the next batch from the resumable
sampler (seeded permutation per epoch), augmentation from the run's own generator, forward, loss, backward, step;
the learning rate is recomputed from (step, epochs done). Validation at each epoch end (or every
``log.eval_every`` steps) keeps the best model by the task metric in ``RUN/best``; checkpoints
(``RUN/checkpoints/step_N``, atomic safetensors + JSON) hold the model, optimizer, sampler position, best-so-far,
weight-average sums and every RNG, so a resumed run continues exactly. At the end the best (or weight-averaged)
model is scored on valid and test: ``RUN/metrics.json``, ``RUN/results.md``, ``RUN/confusion.png`` (single-label
tasks).

Shape glossary: B batch, T frames, F mel bins, K tokens, S special tokens, C width, L layers, Q classes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba import features as feats
from ssamba.data.augment import augment_batch
from ssamba.data.check import check_splits
from ssamba.data.datasets import AudioDataset, FeatureSet, MemoDataset
from ssamba.data.manifest import Example, LabelSet, read_manifest
from ssamba.models.heads import PROBE_POOLS, WeightedSumProbe, load_classifier, save_classifier
from ssamba.models.io import InitSource, load_pretrained, resolve_init
from ssamba.models.registry import create_model, model_family
from ssamba.tasks.metrics import confusion_matrix, markdown_table, plot_confusion, task_metrics
from ssamba.tasks.recipes import FinetuneConfig
from ssamba.train.engine import Engine

__all__ = ["build_classifier", "evaluate", "finetune"]


# ------------------------------------------------------------------------------------------------- models


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
    family = model_family(cfg.model.name)
    if family is not None and encoder.family != family:
        raise ValueError(f"--model {cfg.model.name} is a {family} model but --init {init.path} holds a "
                         f"{encoder.family} encoder")  # fmt: skip
    return WeightedSumProbe(encoder, num_classes, cfg.task.probe_pool) if probe else encoder


# --------------------------------------------------------------------------------------------------- data


def _dataset(source, labels: LabelSet, cfg: FinetuneConfig, mean: float, std: float) -> AudioDataset:
    cls = MemoDataset if cfg.data.cache_features else AudioDataset
    return cls(source, labels, target_length=cfg.data.target_length, mean=mean, std=std, skip_bad=cfg.data.skip_bad)


def _loader(ds: AudioDataset, batch_size: int, workers: int):
    # own generator: building a DataLoader iterator must not draw from the global RNG (resume exactness)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate, num_workers=workers,
                                       generator=torch.Generator())


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
    """Per-layer pooled vectors (N, L, P) and targets (N, Q) of a whole split. With a MemoDataset the vectors of
    every pooling (PROBE_POOLS) are also kept per (encoder weights, file, input), so probes of one encoder over tasks
    that share audio (keywords / speakers), with either pooling, run the encoder once per clip."""
    memo = isinstance(ds, MemoDataset)
    tag = (_fingerprint(probe.encoder), ds.target_length, ds.mean, ds.std) if memo else None
    keys = [(tag, str(e.path)) for e in ds.examples] if memo else []
    if memo and all((*k, probe.pool) in _POOLED_MEMO for k in keys):
        targets = torch.stack([ds.labels.encode(e.labels) for e in ds.examples])
        return torch.stack([_POOLED_MEMO[(*k, probe.pool)] for k in keys]), targets
    pooled, targets = [], []
    for batch in loader:
        if batch["features"].numel() == 0:
            continue
        hidden = probe.encoder.extract_features(batch["features"].to(device), batch["lengths"].to(device))
        for pool in PROBE_POOLS if memo else (probe.pool,):
            vectors = probe.pool_layers(*hidden, pool).cpu()
            if pool == probe.pool:
                pooled.append(vectors)
            if memo:
                for i, v in zip(batch["indices"].tolist(), vectors, strict=True):
                    _POOLED_MEMO[(*keys[i], pool)] = v
        targets.append(batch["labels"])
    return torch.cat(pooled), torch.cat(targets)


# ------------------------------------------------------------------------------------------- the run


def _loss(logits: Tensor, targets: Tensor, kind: str) -> Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()  # CE with (mixed) soft targets


def _lr_factor(cfg: FinetuneConfig, step: int, epochs_done: int) -> float:
    """The official warm-up (as in pretraining) times the per-epoch MultiStepLR decay (milestones lr_start,
    lr_start + lr_step, ...)."""
    o = cfg.optim
    factor = o.warmup_factor(step)
    if o.lr_decay != 1.0 and epochs_done >= o.lr_start:
        factor *= o.lr_decay ** ((epochs_done - o.lr_start) // o.lr_step + 1)
    return factor


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
    if "valid" not in results[0]:  # a torchrun process other than rank 0: rank 0 summarises
        return results[-1]
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
    eng = Engine(run, cfg, resume)
    device = eng.device

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
    augmenting = cfg.augment.mixup > 0 or cfg.augment.freqm > 0 or cfg.augment.timem > 0 or cfg.augment.noise
    # (under torchrun the probe trains on its encoder's outputs through DDP, not on cached vectors)
    cached = probe and cfg.train.cache_probe_features and not augmenting and not eng.ddp.enabled
    workers = cfg.data.num_workers
    eval_loaders = {name: _loader(ds, bs, workers) for name, ds in datasets.items() if name != "train"}
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    if cached:  # one pass of the frozen encoder per split
        tick = time.perf_counter()
        cache = {name: _cache_pooled(model, ds, _loader(ds, bs, workers), device) for name, ds in datasets.items()}
        log(f"probe: cached per-layer vectors of {sum(len(v[0]) for v in cache.values())} clips in "
            f"{time.perf_counter() - tick:.1f} s")  # fmt: skip
    o = cfg.optim  # the head (and the probe's layer weights) at lr * head_lr, the official mlp_list
    net = eng.prepare(model, FeatureSet(*cache["train"]) if cached else train_set, min(bs, len(train_set)),
                      cfg.train.grad_accum, 0 if cached else workers,
                      lambda name: o.head_lr if name.startswith("head.") or name == "layer_logits" else 1.0)
    sampler = eng.sampler
    if probe and eng.latest is None:  # fixed standardisation statistics from the (un-augmented) training split
        train_pooled = cache["train"][0] if cached else _cache_pooled(model, train_set, _loader(train_set, bs, workers),
                                                                      device)[0]  # fmt: skip
        model.fit_standardization(train_pooled.to(device))
    bpe = sampler.batches_per_epoch
    total = cfg.train.steps if cfg.train.steps > 0 else cfg.train.epochs * bpe
    wa_on = o.wa_start > 0 and o.wa_end >= o.wa_start
    wa_sum: dict[str, Tensor] = {}
    s = {"wa_count": 0, "best": -math.inf, "best_step": 0, "first_loss": None}  # checkpointed with the run
    losses = {"this": math.nan, "last": math.nan}  # this step's, the last update's

    meta = {"mode": cfg.task.mode, "probe_pool": cfg.task.probe_pool, "task": cfg.task.name, "model": cfg.model.name,
            "init": cfg.model.init, "labels": {"mids": labels.mids, "names": labels.names},
            "target_length": cfg.data.target_length, "mean": mean, "std": std, "loss": cfg.task.loss,
            "metric": cfg.task.metric, "multilabel": cfg.task.multilabel}  # fmt: skip

    def scores_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        if cached:
            with torch.no_grad():
                return model.forward_pooled(cache[split][0].to(device)).cpu().numpy(), cache[split][1].numpy()
        return _predict(model, eval_loaders[split], device)

    def micro(batch: dict, a: int):
        x, lengths, y = batch["features"], batch["lengths"], batch["labels"]
        if cached:
            return _loss(model.forward_pooled(x.to(device)), y.to(device), cfg.task.loss), {}
        if augmenting:
            x, lengths, y = augment_batch(x, lengths, y, eng.gen, **asdict(cfg.augment), pad_value=train_set.pad_value)
        return _loss(net(x.to(device), lengths.to(device)), y.to(device), cfg.task.loss), {}

    def step_fn(step: int):
        eng.set_lr(o.lr, _lr_factor(cfg, step, sampler.epoch))
        losses["this"], metrics = eng.accumulate(micro, cfg.train.grad_accum)
        return losses["this"], metrics

    def after_step(step: int, skipped: bool) -> None:
        if not skipped:
            losses["last"] = losses["this"]
            s["first_loss"] = losses["this"] if s["first_loss"] is None else s["first_loss"]
        epoch_end = sampler.batch == 0
        # weight averaging of end-of-epoch weights (official wa: epochs wa_start..wa_end); a skipped step left the
        # weights as they were, so they still count
        if wa_on and epoch_end and o.wa_start <= sampler.epoch <= o.wa_end:
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    wa_sum[k] = wa_sum.get(k, torch.zeros_like(v, device="cpu")) + v.detach().cpu()
            s["wa_count"] += 1

    last_valid: dict = {}

    def eval_fn(step: int) -> dict:
        if not eng.ddp.main:
            return {}
        scores = scores_of("valid")
        last_valid.update(step=step, scores=scores)
        result = task_metrics(*scores, cfg.task.multilabel)
        if result[cfg.task.metric] > s["best"]:
            s["best"], s["best_step"] = result[cfg.task.metric], step
            save_classifier(model, run / "best", {**meta, "step": step})
        return {**result, "best": s["best"]}

    def load_state(tensors: dict, state: dict) -> None:
        wa_sum.update({k[len("wa."):]: v for k, v in tensors.items() if k.startswith("wa.")})
        s.update({k: state[k] for k in s})

    every = cfg.log.eval_every
    result = eng.fit(step_fn, total, eval_fn, lambda st: st == total or (sampler.batch == 0 if every == 0 else
                                                                          st % every == 0),  # fmt: skip
                     after_step, lambda: ({f"wa.{k}": v for k, v in wa_sum.items()}, dict(s)), load_state,
                     baseline=False, desc=f"{cfg.task.name} {cfg.task.mode}")
    step, wa_count, best_step, first_loss = result["step"], s["wa_count"], s["best_step"], s["first_loss"]
    loss_value = losses["last"]
    if result["interrupted"] or not eng.ddp.main:
        return result

    # -- final model: weight average when configured, else the best by validation
    if wa_on and wa_count:
        state = model.state_dict()
        state.update({k: (v / wa_count).to(state[k].dtype) for k, v in wa_sum.items()})
        model.load_state_dict(state)
        eng.guard.check_weights(model, step)
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
           "last_loss": loss_value, "train_seconds": round(eng.train_seconds, 2),
           "skipped_steps": result["skipped_steps"], "splits": results}  # fmt: skip
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

