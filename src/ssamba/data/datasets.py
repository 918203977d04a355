"""Datasets over manifests: decoded audio as normalised fbank (or waveform), with lengths and label vectors.

Glossary: F frames, M mel bins, T samples, B batch, C classes.

One item is a dict ``{"features": (F, M) or (T,), "length": int, "labels": (C,), "index": int}``;
`AudioDataset.collate` pads a list of items into a batch and keeps every item's valid length, so models
can ignore the padding. A bad file raises `AudioError` naming it; with ``skip_bad=True`` it is logged,
counted (`AudioDataset.skipped`) and left out of its batch (``batch["skipped"]``), never replaced.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch

from ssamba import features as feats
from ssamba.audio import SAMPLE_RATE, AudioError, load_audio
from ssamba.data.manifest import Example, LabelSet, read_manifest

log = logging.getLogger(__name__)

KINDS = ("fbank", "waveform")


class AudioDataset(torch.utils.data.Dataset):
    """Audio files listed in a manifest.

    kind:          "fbank" (official SSAST/SSAMBA features, normalised) or "waveform" (float32 samples).
    target_length: fbank frames per item; zero-padded at the end or cut, as the official loader does
                   (`length` still reports the valid frames). None keeps every clip's own length.
    mean, std:     normalisation statistics, `(x - mean) / (2 * std)`; `ssamba data stats` computes
                   them for a dataset. Defaults: the official AudioSet+LibriSpeech values.
    labels:        a `LabelSet`; items then carry a multi-hot (one-hot when single-label) vector.
    skip_bad:      leave out unusable files (logged and counted) instead of raising.
    """

    def __init__(
        self,
        examples: Sequence[Example] | str | os.PathLike,
        labels: LabelSet | None = None,
        *,
        kind: str = "fbank",
        target_length: int | None = None,
        mean: float = feats.AUDIOSET_LIBRISPEECH_MEAN,
        std: float = feats.AUDIOSET_LIBRISPEECH_STD,
        num_mel_bins: int = feats.OFFICIAL_MEL_BINS,
        sample_rate: int = SAMPLE_RATE,
        skip_bad: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        source = "manifest"
        if isinstance(examples, (str, os.PathLike)):
            source = str(examples)
            examples = read_manifest(examples)
        self.examples = list(examples)
        self.labels = labels
        if labels is not None:
            labels.check(self.examples, source)
        self.kind = kind
        self.target_length = target_length
        self.mean, self.std = float(mean), float(std)
        self.num_mel_bins = num_mel_bins
        self.sample_rate = sample_rate
        self.skip_bad = skip_bad
        self.skipped: dict[int, str] = {}  # index -> reason, for files left out (this process only)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def pad_value(self) -> float:
        """What padding looks like after normalisation: the official loader pads fbank with zeros first."""
        return feats.normalize(0.0, self.mean, self.std) if self.kind == "fbank" else 0.0

    def __getitem__(self, index: int) -> dict | None:
        example = self.examples[index]
        try:
            wave = load_audio(example.path, self.sample_rate)
        except AudioError as e:
            if not self.skip_bad:
                raise
            self.skipped[index] = str(e)
            log.warning("skipping bad file (%d skipped so far): %s", len(self.skipped), e)
            return None
        wave = torch.from_numpy(wave)
        item = {"index": index}
        if self.kind == "waveform":
            item["features"], item["length"] = wave, wave.shape[0]
        else:
            fbank = feats.official_fbank(wave, sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins)
            length = fbank.shape[0]
            if self.target_length is not None:
                fbank = feats.pad_or_cut(fbank, self.target_length)
                length = min(length, self.target_length)
            item["features"], item["length"] = feats.normalize(fbank, self.mean, self.std), length
        if self.labels is not None:
            item["labels"] = self.labels.encode(example.labels)
        return item

    def collate(self, items: Sequence[dict | None]) -> dict:
        return pad_collate(items, pad_value=self.pad_value)


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


class FeatureSet(torch.utils.data.Dataset):
    """Features computed beforehand (N, ...) and targets (N, Q) in memory (e.g. a linear probe's cached per-layer
    vectors), batched by index like an AudioDataset: {"features", "lengths" (ones), "labels"}."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, rows: list[int]) -> dict:
        rows = torch.tensor(rows)
        return {"features": self.features[rows], "lengths": torch.ones(len(rows)), "labels": self.targets[rows]}


def pad_collate(items: Sequence[dict | None], pad_value: float = 0.0) -> dict:
    """Stack items, padding `features` at the end of the time axis.

    Returns ``{"features": (B, F_max, M) or (B, T_max), "lengths": (B,), "labels": (B, C),
    "indices": (B,), "skipped": int}``; skipped (None) items are left out and counted.
    """
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {"features": torch.empty(0), "lengths": torch.empty(0, dtype=torch.long),
                "indices": torch.empty(0, dtype=torch.long), "skipped": skipped}
    longest = max(it["features"].shape[0] for it in kept)
    first = kept[0]["features"]
    batch = torch.full((len(kept), longest, *first.shape[1:]), pad_value, dtype=first.dtype)
    for row, it in zip(batch, kept, strict=True):
        row[: it["features"].shape[0]] = it["features"]
    out = {
        "features": batch,
        "lengths": torch.tensor([it["length"] for it in kept], dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in kept], dtype=torch.long),
        "skipped": skipped,
    }
    if "labels" in kept[0]:
        out["labels"] = torch.stack([it["labels"] for it in kept])
    return out


def dataset_stats(
    examples: Sequence[Example],
    *,
    target_length: int | None = None,
    skip_bad: bool = False,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = feats.OFFICIAL_MEL_BINS,
    progress: bool = False,
) -> dict:
    """Mean and std of the (un-normalised) official fbank over every cell of a dataset.

    With `target_length`, clips are padded/cut first as the official loader does, so padding zeros count
    (that is how the official `get_norm_stats.py` sees the data); without it, only real frames count.
    Accumulates sums in float64 (pooled, not the official average of per-batch statistics).
    """
    total = total_sq = 0.0
    cells = files = 0
    bad: list[str] = []
    iterator = examples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(examples, desc="fbank stats", unit="file")
    for ex in iterator:
        try:
            wave = torch.from_numpy(load_audio(ex.path, sample_rate))
        except AudioError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        fb = feats.official_fbank(wave, target_length, sample_rate=sample_rate, num_mel_bins=num_mel_bins)
        values = fb.double()
        total += values.sum().item()
        total_sq += values.pow(2).sum().item()
        cells += values.numel()
        files += 1
    if files == 0:
        raise AudioError("no usable audio file in the dataset" + (f" ({len(bad)} bad)" if bad else ""))
    mean = total / cells
    std = math.sqrt(max(total_sq / cells - mean * mean, 0.0))
    return {"mean": mean, "std": std, "files": files, "frames": cells // num_mel_bins, "skipped": bad}

