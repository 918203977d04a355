"""The CTC task over HuBERT-family representations (``ssamba hubert finetune``: :func:`finetune_ctc`, a step and an
eval function on ``ssamba.train.engine``), with what it needs besides its head (``ssamba.models.heads.CTCHead``):

* :class:`CharVocab` - characters (or espeak-ng phonemes, :func:`phonemize`) of the transcripts, blank = 0,
  space = word boundary;
* :func:`greedy_decode`, :func:`edit_distance`, :func:`error_rates` - best-path decoding and CER / WER;
* :func:`hubert_encoder` - a pretrained (or new) encoder under a head, frozen as ``finetune.*`` says (shared with
  ``ssamba.tasks.reconstruct``).

Shape glossary: B batch, T frames (50 Hz), C width, V vocabulary (incl. blank), U transcript length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ssamba.data.manifest import read_manifest
from ssamba.data.waveform import WaveformSet
from ssamba.models.heads import BLANK, HEAD_WEIGHTS, CTCHead, save_head
from ssamba.models.hubert import HuBERTModel, create_hubert
from ssamba.pretrain.hubert_loss import span_mask
from ssamba.train.config import LogSection, TrainSection
from ssamba.train.hubert import (
    HuBERTDataSection,
    HuBERTModelSection,
    HuBERTOptimSection,
    HuBERTRun,
    hubert_engine,
    lr_at,
    mask_generator,
    prepare,
)

__all__ = ["CTCConfig", "CharVocab", "FinetuneSection", "HeadRunConfig", "HeadSection", "edit_distance", "error_rates",
           "finetune_ctc", "greedy_decode", "hubert_encoder", "phonemize"]

_STRESS = str.maketrans("", "", "\u02c8\u02cc")  # IPA primary / secondary stress marks


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phoneme string of a transcript from espeak-ng (the tool the demo corpus is rendered with), stress
    marks removed, words separated by spaces; its symbols are the CTC units of ``units = "phonemes"``."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed; phoneme targets need it (apt-get install espeak-ng)")
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.translate(_STRESS).split())


class CharVocab:
    """Character vocabulary; transcripts are lower-cased, runs of white space become one space."""

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError(f"vocabulary must be distinct single characters, got {list(chars)}")
        self.chars = list(chars)
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}  # 0 is the CTC blank

    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(text.lower().split())

    @classmethod
    def from_transcripts(cls, transcripts: Sequence[str]) -> CharVocab:
        return cls(sorted({c for t in transcripts for c in cls.normalize(t)}))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        text = self.normalize(text)
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"transcript {text!r} has characters outside the vocabulary: {unknown}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != BLANK)


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: (B, T, V) log-probabilities, (B,) frames -> per item the argmax ids with repeats
    collapsed and blanks removed."""
    best = log_probs.argmax(-1)  # (B, T)
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != BLANK])
    return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus CER and WER: total edits / total reference characters (words)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ce = cn = we = wn = 0
    for r, h in zip(refs, hyps, strict=True):
        ce += edit_distance(r, h)
        cn += len(r)
        we += edit_distance(r.split(), h.split())
        wn += len(r.split())
    return {"cer": ce / max(cn, 1), "wer": we / max(wn, 1), "chars": cn, "words": wn}


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
    # span masking of the input frames as augmentation (HuBERT fine-tuning: 0.65; 0 = none)
    mask_prob: float = 0.3
    mask_span: int = 10



@dataclass
class HeadRunConfig(HuBERTRun):
    """A head trained over a HuBERT-family encoder (CTC here, reconstruction in ``ssamba.tasks.reconstruct``)."""

    model: HuBERTModelSection = field(default_factory=HuBERTModelSection)
    data: HuBERTDataSection = field(default_factory=HuBERTDataSection)
    head: HeadSection = field(default_factory=HeadSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    optim: HuBERTOptimSection = field(
        default_factory=lambda: HuBERTOptimSection(lr=1e-3, weight_decay=0.0, warmup_steps=50))
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    # test manifest, evaluated with the final head (CTC: the checkpoint of the best validation CER)
    test: str = ""


@dataclass
class CTCConfig(HeadRunConfig):
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
    run, h, ft = Path(run), cfg.head, cfg.finetune
    text_map = None
    if h.units == "phonemes":
        from functools import lru_cache

        text_map = lru_cache(maxsize=None)(phonemize)

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
            if ft.mask_prob > 0:
                frames = head.encoder.frame_lengths(lengths).cpu()
                t = int(head.encoder.frame_lengths(torch.tensor([wave.shape[1]]))[0])
                gen = mask_generator(cfg.train.seed, step, eng.ddp.rank, a)
                mask = span_mask(frames, t, ft.mask_prob, ft.mask_span, 0, generator=gen, same_count=False).to(device)
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
