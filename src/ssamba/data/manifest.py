"""Manifests: which audio files make a dataset, and their labels.

Three layouts are read, one in-memory form (a list of `Example`):

* SSAST JSON: ``{"data": [{"wav": path, "labels": "mid1,mid2", ...}, ...]}`` (the official format; extra
  keys per entry, e.g. ``transcript`` or ``speaker``, are kept in `Example.extra`);
* JSON lines: one such entry object per line (``.jsonl``);
* a folder per class: ``ROOT/<class>/<file>.{wav,flac,ogg,mp3}``; the class folder name is the label.

Labels are AudioSet-style ``mid`` strings; `LabelSet` maps them to indices through the official
``class_labels_indices.csv`` (``index,mid,display_name``).

Relative paths in a manifest are relative to the manifest's own folder, so a corpus can be moved or
shared; `write_manifest` writes them that way.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class ManifestError(ValueError):
    """A manifest or label file that cannot be used; the message names the file (and entry)."""


@dataclass(frozen=True)
class Example:
    path: Path  # resolved audio path
    labels: tuple[str, ...] = ()  # label mids, in manifest order
    extra: dict = field(default_factory=dict, compare=False)  # other keys of the entry (transcript, speaker…)


def read_manifest(source: str | os.PathLike) -> list[Example]:
    """Read a SSAST ``.json``, a ``.jsonl`` or a folder-per-class directory."""
    source = Path(source)
    if not source.exists():
        raise ManifestError(f"{source}: manifest not found")
    if source.is_dir():
        return _read_folder(source)
    if source.suffix == ".jsonl":
        entries = []
        with open(source, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{source}:{lineno}: invalid JSON ({e.msg})") from e
    else:
        try:
            with open(source, encoding="utf-8") as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}: invalid JSON at line {e.lineno} ({e.msg})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise ManifestError(f'{source}: expected a SSAST manifest {{"data": [{{"wav": ..., "labels": ...}}]}}')
        entries = doc["data"]
    examples = [_entry_to_example(source, i, e) for i, e in enumerate(entries)]
    if not examples:
        raise ManifestError(f"{source}: manifest has no entries")
    return examples


def _entry_to_example(source: Path, i: int, entry) -> Example:
    where = f"{source}: entry {i}"
    if not isinstance(entry, dict) or "wav" not in entry:
        raise ManifestError(f'{where}: expected an object with a "wav" key, got {str(entry)[:80]!r}')
    wav = entry["wav"]
    if not isinstance(wav, str) or not wav:
        raise ManifestError(f'{where}: "wav" must be a non-empty path string')
    labels = entry.get("labels", "")
    if isinstance(labels, str):
        labels = tuple(m.strip() for m in labels.split(",") if m.strip())
    elif isinstance(labels, list) and all(isinstance(m, str) for m in labels):
        labels = tuple(labels)
    else:
        raise ManifestError(f'{where}: "labels" must be a comma-separated string or a list of strings')
    path = Path(wav)
    if not path.is_absolute():
        path = source.parent / path
    extra = {k: v for k, v in entry.items() if k not in ("wav", "labels")}
    return Example(path=path, labels=labels, extra=extra)


def _read_folder(root: Path) -> list[Example]:
    examples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in AUDIO_SUFFIXES:
                examples.append(Example(path=f, labels=(class_dir.name,)))
    if not examples:
        raise ManifestError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in class sub-folders")
    return examples


def write_manifest(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write SSAST JSON (or JSON lines when `path` ends in ``.jsonl``) with paths relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for ex in examples:
        wav = os.path.relpath(Path(ex.path).resolve(), path.parent.resolve())
        entries.append({"wav": Path(wav).as_posix(), "labels": ",".join(ex.labels), **ex.extra})
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        else:
            json.dump({"data": entries}, f, indent=1, ensure_ascii=False)
            f.write("\n")


class LabelSet:
    """Label mids <-> indices, as in the official ``class_labels_indices.csv``."""

    def __init__(self, mids: Sequence[str], names: Sequence[str] | None = None):
        if len(set(mids)) != len(mids):
            raise ManifestError("duplicate label mids in label set")
        self.mids = list(mids)
        self.names = list(names) if names is not None else list(mids)
        self._index = {m: i for i, m in enumerate(self.mids)}

    def __len__(self) -> int:
        return len(self.mids)

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSet) and self.mids == other.mids and self.names == other.names

    def __repr__(self) -> str:
        return f"LabelSet({len(self)} classes)"

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> LabelSet:
        path = Path(path)
        if not path.exists():
            raise ManifestError(f"{path}: label file not found")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
            raise ManifestError(f"{path}: expected a CSV with header index,mid,display_name")
        try:
            rows.sort(key=lambda r: int(r["index"]))
        except ValueError as e:
            raise ManifestError(f"{path}: non-integer index ({e})") from e
        if [int(r["index"]) for r in rows] != list(range(len(rows))):
            raise ManifestError(f"{path}: indices must be 0..{len(rows) - 1} without gaps")
        return cls([r["mid"] for r in rows], [r["display_name"] for r in rows])

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> LabelSet:
        """Every label seen, sorted (for folder-per-class data without a CSV)."""
        return cls(sorted({m for ex in examples for m in ex.labels}))

    def to_csv(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["index", "mid", "display_name"])
            w.writerows((i, m, n) for i, (m, n) in enumerate(zip(self.mids, self.names, strict=True)))

    def index(self, mid: str) -> int:
        try:
            return self._index[mid]
        except KeyError:
            raise ManifestError(f"unknown label {mid!r} (not among the {len(self)} labels)") from None

    def encode(self, labels: Sequence[str]) -> torch.Tensor:
        """Multi-hot float vector (num_classes,); one-hot for a single label."""
        target = torch.zeros(len(self))
        for m in labels:
            target[self.index(m)] = 1.0
        return target

    def check(self, examples: Sequence[Example], source: str | os.PathLike = "manifest") -> None:
        """Raise naming the first entry whose label is not in the set."""
        for i, ex in enumerate(examples):
            for m in ex.labels:
                if m not in self._index:
                    raise ManifestError(f"{source}: entry {i} ({ex.path.name}) has unknown label {m!r}")
