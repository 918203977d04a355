"""The CTC task over HuBERT-family representations (``ssamba hubert finetune``: :func:`finetune_ctc`, a step and an
eval function on ``ssamba.train.engine``) and :func:`hubert_encoder`, a pretrained (or new) encoder under a head,
frozen as ``finetune.*`` says (shared with ``ssamba.tasks.reconstruct``). Its parts live where they belong: the
head and its best-path decoding in ``ssamba.models.heads`` (``CTCHead``, ``greedy_decode``), the transcripts'
units in ``ssamba.data.text`` (``CharVocab``, ``phonemize``), CER / WER in ``ssamba.tasks.metrics``.

Shape glossary: B batch, T frames (50 Hz), C width, V vocabulary (incl. blank), U transcript length.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ssamba.data.manifest import read_manifest
from ssamba.data.text import CharVocab, phonemize
from ssamba.data.waveform import WaveformSet
from ssamba.models.heads import HEAD_WEIGHTS, CTCHead, greedy_decode, save_head
from ssamba.models.hubert import HuBERTModel, create_hubert
from ssamba.pretrain.hubert_loss import span_mask
from ssamba.tasks.metrics import error_rates
from ssamba.train.hubert import (
    HuBERTOptimSection,
    HuBERTRun,
    SpanMaskSection,
    hubert_engine,
    lr_at,
    mask_generator,
    prepare,
)

__all__ = ["CTCConfig", "FinetuneSection", "HeadRunConfig", "HeadSection", "finetune_ctc", "hubert_encoder"]


# ------------------------------------------------------------------------------------------------ the CTC task


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


@dataclass
class HeadRunConfig(HuBERTRun):
    """A head trained over a HuBERT-family encoder (CTC here, reconstruction in ``ssamba.tasks.reconstruct``)."""

    optim: HuBERTOptimSection = field(
        default_factory=lambda: HuBERTOptimSection(lr=1e-3, weight_decay=0.0, warmup_steps=50))
    head: HeadSection = field(default_factory=HeadSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    # test manifest, evaluated with the final head (CTC: the checkpoint of the best validation CER)
    test: str = ""


@dataclass
class CTCConfig(HeadRunConfig):
    # span masking of the input frames as augmentation (HuBERT fine-tuning: mask_prob 0.65; prob 0 = none)
    mask: SpanMaskSection = field(default_factory=lambda: SpanMaskSection(prob=0.3, min_masks=0))

    def validate(self) -> None:
        super().validate()
        if self.head.units not in ("chars", "phonemes"):
            raise ValueError(f"head.units must be chars or phonemes, got {self.head.units!r}")


def hubert_encoder(cfg, head: Callable[[HuBERTModel], nn.Module]) -> nn.Module:
    """``head(encoder)`` over the pretrained encoder of ``finetune.init`` (or a new one of ``model.*``), with the CNN
    and, for a probe, the encoder frozen as ``finetune.*`` says."""
    init, ft = cfg.finetune.init, cfg.finetune
    if init and init != "none":
        from ssamba.models import load_pretrained

        encoder = load_pretrained(init)
        if not isinstance(encoder, HuBERTModel):
            raise ValueError(f"{init}: holds a {encoder.family} model; HuBERT fine-tuning needs a HuBERT one")
    else:
        encoder = create_hubert(cfg.model.encoder, cfg.model.size, **cfg.model.overrides)
    net = head(encoder)
    if ft.freeze_cnn:
        encoder.config.feature_grad_mult = 0.0  # cnn_features then runs under no_grad
        encoder.feature_extractor.requires_grad_(False)
    if ft.freeze_encoder:
        encoder.requires_grad_(False)
    return net


def finetune_ctc(cfg: CTCConfig, run: str | Path, resume: bool = False) -> dict:
    """CTC over characters from a chosen layer (optionally through a Conformer downstream); evaluates valid CER
    every eval_every steps, keeps the best head (RUN/best), reports its test CER / WER in RUN/metrics.json."""
    run, h, ft, m = Path(run), cfg.head, cfg.finetune, cfg.mask
    text_map = functools.cache(phonemize) if h.units == "phonemes" else None  # each transcript phonemized once

    def waveset(manifest: str) -> WaveformSet:
        ds = WaveformSet(manifest, cfg.data.max_samples, cfg.data.skip_bad, transcripts=True)
        ds.text_map = text_map
        return ds

    eng = hubert_engine(cfg, run, resume, cfg.test)
    train_set = waveset(cfg.data.train)
    # the unit inventory (not the labels) of every split given, so that a valid/test character unseen in the
    # small training set is an error count, not a crash
    texts = [ex.extra.get("transcript", "") for m in (cfg.data.train, cfg.data.valid, cfg.test) if m
             for ex in read_manifest(m)]  # fmt: skip
    vocab = CharVocab.from_transcripts([text_map(t) for t in texts] if text_map else texts)
    prepare(eng, hubert_encoder(cfg, lambda enc: CTCHead(enc, len(vocab), h.layer or None, h.conformer_layers,
                                                         h.conformer_dim, h.conformer_heads, h.conformer_kernel,
                                                         h.dropout)), train_set)  # fmt: skip
    head, device = eng.module, eng.device
    valid_set = waveset(cfg.data.valid) if cfg.data.valid else None

    def targets_of(texts):
        enc = [vocab.encode(t) for t in texts]
        return torch.cat(enc).to(device), torch.tensor([e.numel() for e in enc]).to(device)

    def step_fn(step: int):
        eng.set_lr(lr_at(step, cfg.optim, cfg.train.steps))
        head.encoder.layers.requires_grad_(not (ft.freeze_encoder or step < ft.freeze_encoder_steps))

        def micro(batch: dict, a: int):
            wave, lengths = batch["features"].to(device), batch["lengths"].to(device)
            mask = None
            if m.prob > 0:
                frames = head.encoder.frame_lengths(lengths).cpu()
                t = int(head.encoder.frame_lengths(torch.tensor([wave.shape[1]]))[0])
                gen = mask_generator(eng, step, a)
                mask = span_mask(frames, t, m.prob, m.span, m.min_masks, generator=gen, same_count=False).to(device)
            log_probs, frames = eng.model(wave, lengths, mask)  # through DDP when distributed
            return head.ctc_loss(log_probs, frames, *targets_of(batch["text"])), {}

        return eng.accumulate(micro, cfg.train.grad_accum)

    @torch.no_grad()
    def evaluate(dataset) -> dict:
        head.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=dataset.collate)
        refs, hyps, loss, n = [], [], 0.0, 0
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            log_probs, frames = head(batch["features"].to(device), batch["lengths"].to(device))
            loss += float(head.ctc_loss(log_probs, frames, *targets_of(batch["text"]))) * len(batch["text"])
            n += len(batch["text"])
            refs += [vocab.normalize(t) for t in batch["text"]]
            hyps += [vocab.decode(ids) for ids in greedy_decode(log_probs, frames)]
        examples = list(zip(refs[:3], hyps[:3], strict=True))
        return {**error_rates(refs, hyps), "ctc": loss / max(n, 1), "examples": examples}

    best = {"cer": math.inf}

    def eval_fn(step: int) -> dict:
        if not eng.ddp.main:
            return {}
        result = evaluate(valid_set)
        if result["cer"] < best["cer"]:
            best.update(cer=result["cer"], step=step)
            save_head(head, run / "best", vocab.chars)
        return {k: v for k, v in result.items() if k != "examples"} | {"best_cer": best["cer"]}

    result = eng.fit(step_fn, cfg.train.steps, eval_fn if valid_set is not None else None)
    if result["interrupted"] is not None or not result["main"]:
        return result
    if valid_set is not None and (run / "best").exists():
        from safetensors.torch import load_file

        head.load_state_dict(load_file(str(run / "best" / HEAD_WEIGHTS)))  # the best validation's weights
    else:
        save_head(head, run / "best", vocab.chars)
    summary = {"task": "ctc", "metric": "cer" if h.units == "chars" else "per", "units": h.units,
               "init": cfg.finetune.init, "layer": h.layer or "last", "conformer_layers": h.conformer_layers,
               "steps": result["step"], "skipped_steps": result["skipped_steps"], "vocab": vocab.chars}  # fmt: skip
    if valid_set is not None:
        v = evaluate(valid_set)
        summary.update(valid=v["cer"], valid_wer=v["wer"], best_step=best.get("step"))
    if cfg.test:
        r = evaluate(waveset(cfg.test))
        summary.update(test=r["cer"], test_wer=r["wer"], test_examples=r["examples"])
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**result, **summary}
