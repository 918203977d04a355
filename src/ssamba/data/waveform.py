"""The waveform dataset of the HuBERT-family runs (Mamba-HuBERT pretraining, CTC, reconstruction): waveforms cut
to a maximum length (at a random offset on the model's frame grid, for pretraining), with frame labels (k-means
targets) cut alike, and transcripts.

Shape glossary: S samples, T_label label frames.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from ssamba.data.datasets import AudioDataset, pad_collate

__all__ = ["WaveformSet"]


class WaveformSet(torch.utils.data.Dataset):
    """Waveforms of a manifest (cut to ``max_samples`` from the start) with optional frame labels (cut at the
    same time point) and transcripts. Items: {"features": (S,), "length", "index", ["targets": (T_label,)],
    ["text": str]}; a batch pads targets with ``label_pad`` (the loss's ignore index)."""

    def __init__(self, manifest: str, max_samples: int, skip_bad: bool = False, labels: list | None = None,
                 label_rate: float = 100.0, transcripts: bool = False, random_crop: bool = False, hop: int = 320,
                 label_pad: int = -100):
        self.base = AudioDataset(manifest, kind="waveform", skip_bad=skip_bad)
        self.max_samples, self.labels, self.label_rate, self.label_pad = max_samples, labels, label_rate, label_pad
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
            batch["targets"] = torch.full((len(kept), longest), self.label_pad, dtype=torch.long)
            for row, it in zip(batch["targets"], kept, strict=True):
                row[: it["targets"].numel()] = it["targets"]
        if kept and "text" in kept[0]:
            batch["text"] = [it["text"] for it in kept]
        return batch
