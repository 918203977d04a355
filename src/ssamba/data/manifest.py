"""Manifests: which audio files make a dataset, and their labels.

Three layouts are read, one in-memory form (a list of `Example`):

* SSAST JSON: ``{"data": [{"wav": path, "labels": "mid1,mid2", ...}, ...]}`` (the official format; extra
  keys per entry, e.g. ``transcript`` or ``speaker``, are kept in `Example.extra`);
* JSON lines: one such entry object per line (``.jsonl``);
* a folder per class: ``ROOT/<class>/<file>.{wav,flac,ogg,mp3}``; the class folder name is the label;
* lhotse manifests (JSON lines, gzipped or not), read directly, without lhotse: a CutSet, or a RecordingSet with
  its SupervisionSet (see `read_lhotse`).

Labels are AudioSet-style ``mid`` strings; `LabelSet` maps them to indices through the official
``class_labels_indices.csv`` (``index,mid,display_name``).

Relative paths in a manifest are relative to the manifest's own folder, so a corpus can be moved or
shared; `write_manifest` writes them that way.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
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
    """Read a SSAST ``.json``, a ``.jsonl``, a folder-per-class directory or a lhotse manifest (``.jsonl`` or
    ``.jsonl.gz``: a CutSet, or either file of a RecordingSet + SupervisionSet pair)."""
    source = Path(source)
    if not source.exists():
        raise ManifestError(f"{source}: manifest not found")
    if source.is_dir():
        return _read_folder(source)
    if source.suffix in (".jsonl", ".gz"):
        lines = _json_lines(source)
        if lines and lhotse_kind(lines[0][1]) is not None:
            return _read_lhotse(source, [(f"{source}:{n}", e) for n, e in lines])
        entries = [entry for _, entry in lines]
    else:
        try:
            with open(source, encoding="utf-8") as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}: invalid JSON at line {e.lineno} ({e.msg})") from e
        if isinstance(doc, list) and doc and lhotse_kind(doc[0]) is not None:  # lhotse's (older) JSON list form
            return _read_lhotse(source, [(f"{source}: item {i}", e) for i, e in enumerate(doc)])
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise ManifestError(f'{source}: expected a SSAST manifest {{"data": [{{"wav": ..., "labels": ...}}]}}')
        entries = doc["data"]
    examples = [_entry_to_example(source, i, e) for i, e in enumerate(entries)]
    if not examples:
        raise ManifestError(f"{source}: manifest has no entries")
    return examples


def read_inputs(inputs: Sequence[str | os.PathLike]) -> list[Example]:
    """One manifest (any layout `read_manifest` reads) or audio files, as examples (``ssamba embed``'s inputs)."""
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() not in AUDIO_SUFFIXES:
        return read_manifest(inputs[0])
    examples = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise ValueError(f"{path}: not an audio file ({', '.join(AUDIO_SUFFIXES)}) and more than one input given")
        examples.append(Example(path=path))
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


def _json_lines(source: Path) -> list[tuple[int, object]]:
    """(line number, parsed object) of every non-blank line; gzip-compressed when the name ends in ``.gz``."""
    opener = gzip.open if source.suffix == ".gz" else open
    lines = []
    try:
        with opener(source, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    lines.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{source}:{lineno}: invalid JSON ({e.msg})") from e
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise ManifestError(f"{source}: unreadable ({e})") from e
    return lines


# --- lhotse manifests ------------------------------------------------------------------------------
#
# lhotse (github.com/lhotse-speech/lhotse) saves manifests as JSON lines, gzipped when the name ends in .gz
# (``CutSet.to_file``, ``RecordingSet.to_file``, ``SupervisionSet.to_file``). The fields read here are those of
# lhotse's dataclasses as ``to_dict`` writes them (None fields left out; cuts carry their class in "type"):
#   Recording          {id, sources: [{type: "file", channels: [0], source: PATH}], sampling_rate, num_samples,
#                       duration[, channel_ids, transforms]}
#   SupervisionSegment {id, recording_id, start, duration, channel[, text, language, speaker, gender, custom]}
#   MonoCut            {id, start, duration, channel, recording: Recording, supervisions: [...][, custom],
#                       type: "MonoCut"}
# One Example per cut, or per recording of a RecordingSet (with the supervisions that name it). Labels: a
# supervision's ``custom["label"]`` (or ``custom["labels"]``: a string, comma-separated for several, or a list
# of strings), else its ``speaker``; several supervisions give the union. ``extra["transcript"]`` (the field the
# CTC / HuBERT code reads): the supervisions' ``text`` joined by spaces in time order. Relative audio paths are
# relative to the working directory, as lhotse itself reads them.
# ssamba reads whole files, so what it cannot honour is rejected with a ManifestError naming it rather than
# silently trained on as something else: a cut covering part of its recording (start > 0 or a shorter
# duration), a recording that is not one plain file (URL, command, in-memory audio, one source per channel), a
# multi-channel source (lhotse reads one channel, ssamba would mix all down) or one with transforms (speed
# perturbation, resampling), and cut types other than MonoCut.

_WHOLE_TOLERANCE_S = 1e-3  # lhotse derives durations from sample counts: a whole-recording cut matches to rounding
_LABEL_KEYS = ("label", "labels")


def lhotse_kind(entry) -> str | None:
    """``"cuts"``, ``"recordings"`` or ``"supervisions"`` for one lhotse manifest item, None otherwise."""
    if not isinstance(entry, dict) or "wav" in entry:
        return None
    if isinstance(entry.get("type"), str) and entry["type"].endswith("Cut"):
        return "cuts"
    if "sources" in entry and "sampling_rate" in entry:
        return "recordings"
    if "recording_id" in entry and "start" in entry and "duration" in entry:
        return "supervisions"
    return None


def read_lhotse(source: str | os.PathLike) -> list[Example]:
    """Examples of a lhotse CutSet, or of a RecordingSet + SupervisionSet pair given either file of the pair
    (the other is the file of the same name with ``recordings`` <-> ``supervisions``, lhotse's recipe naming; a
    RecordingSet without its supervisions gives unlabelled examples). JSONL, gzipped or not."""
    source = Path(source)
    if not source.exists():
        raise ManifestError(f"{source}: manifest not found")
    return _read_lhotse(source, _lhotse_items(source))


def _lhotse_items(source: Path) -> list[tuple[str, object]]:
    if source.suffix == ".json":
        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}: invalid JSON at line {e.lineno} ({e.msg})") from e
        if not isinstance(doc, list):
            raise ManifestError(f"{source}: expected a lhotse manifest (JSON lines, or a JSON list)")
        return [(f"{source}: item {i}", e) for i, e in enumerate(doc)]
    return [(f"{source}:{n}", e) for n, e in _json_lines(source)]


def _read_lhotse(source: Path, items: list[tuple[str, object]]) -> list[Example]:
    if not items:
        raise ManifestError(f"{source}: manifest has no entries")
    kind = _check_kind(items, lhotse_kind(items[0][1]))
    if kind == "cuts":
        return [_cut_example(where, cut) for where, cut in items]
    if kind == "supervisions":
        partner = _partner(source, "supervisions", "recordings")
        if partner is None or not partner.exists():
            raise ManifestError(f"{source}: a lhotse SupervisionSet names no audio files; its RecordingSet "
                                f"({partner.name if partner else 'a file named *recordings*'}) is not beside it")
        rec_items, sup_items = _lhotse_items(partner), items
        _check_kind(rec_items, "recordings")
    else:
        partner = _partner(source, "recordings", "supervisions")
        rec_items = items
        sup_items = _lhotse_items(partner) if partner is not None and partner.exists() else []
        _check_kind(sup_items, "supervisions")
    recordings: dict[str, tuple[str, dict]] = {}
    for where, rec in rec_items:
        rid = rec.get("id")
        if not isinstance(rid, str) or rid in recordings:
            raise ManifestError(f"{where}: recording id {rid!r} is missing or repeated")
        recordings[rid] = (where, rec)
    supervisions: dict[str, list[tuple[str, dict]]] = {rid: [] for rid in recordings}
    for where, sup in sup_items:
        rid = sup.get("recording_id")
        if rid not in recordings:
            raise ManifestError(f"{where}: supervision {sup.get('id')!r} names recording {rid!r}, which the "
                                f"RecordingSet does not hold")
        supervisions[rid].append((where, sup))
    return [_example(where, rec, supervisions[rid], {"id": rid}) for rid, (where, rec) in recordings.items()]


def _check_kind(items: list[tuple[str, object]], kind: str | None) -> str | None:
    for where, item in items:
        if lhotse_kind(item) != kind:
            raise ManifestError(f"{where}: expected a lhotse {kind or 'manifest'} item, got {str(item)[:80]!r}")
    return kind


def _partner(path: Path, this: str, other: str) -> Path | None:
    head, sep, tail = path.name.rpartition(this)
    return path.with_name(head + other + tail) if sep else None


def _seconds(where: str, obj: dict, key: str, what: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{where}: {what} needs a finite number {key!r}, got {value!r}")
    return float(value)


def _recording_path(where: str, rec: dict) -> Path:
    what = f"recording {rec.get('id')!r}"
    sources = rec.get("sources")
    if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
        n = len(sources) if isinstance(sources, list) else 0
        raise ManifestError(f"{where}: {what}: expected one audio source, got {n} (one file per channel is not "
                            "supported)")
    src = sources[0]
    if src.get("type") != "file":
        raise ManifestError(f'{where}: {what}: source type {src.get("type")!r} is not supported (only "file")')
    channels = src.get("channels", [0])
    if isinstance(channels, list) and len(channels) > 1:
        raise ManifestError(f"{where}: {what}: {len(channels)} channels; lhotse reads one channel, ssamba would mix "
                            "them down (select one channel first)")
    if rec.get("transforms"):
        raise ManifestError(f"{where}: {what}: audio transforms (speed perturbation, resampling, ...) are not "
                            "supported")
    path = src.get("source")
    if not isinstance(path, str) or not path:
        raise ManifestError(f'{where}: {what}: "source" must be a non-empty path string')
    return Path(path) if Path(path).is_absolute() else Path.cwd() / path


def _supervision_labels(where: str, sup: dict) -> tuple[str, ...]:
    custom = sup.get("custom") or {}
    for key in _LABEL_KEYS:
        if key in custom:
            value = custom[key]
            if isinstance(value, str):
                return tuple(m.strip() for m in value.split(",") if m.strip())
            if isinstance(value, list) and all(isinstance(m, str) for m in value):
                return tuple(value)
            raise ManifestError(f'{where}: supervision {sup.get("id")!r}: custom "{key}" must be a string or a '
                                "list of strings")
    speaker = sup.get("speaker")
    return (speaker,) if isinstance(speaker, str) and speaker else ()


def _example(where: str, rec: dict, sups: list[tuple[str, dict]], extra: dict) -> Example:
    """One whole recording and the supervisions over it."""
    path = _recording_path(where, rec)
    labels: list[str] = []
    for sup_where, sup in sups:
        labels += [m for m in _supervision_labels(sup_where, sup) if m not in labels]
    ordered = sorted((sup for _, sup in sups), key=lambda s: s.get("start", 0.0))
    texts = [s["text"].strip() for s in ordered if isinstance(s.get("text"), str) and s["text"].strip()]
    if texts:
        extra["transcript"] = " ".join(texts)
    for key in ("speaker", "language", "gender"):
        values = {s.get(key) for _, s in sups if isinstance(s.get(key), str)}
        if len(values) == 1:
            extra[key] = values.pop()
    if len(sups) == 1:  # a single supervision's own metadata (e.g. a fold number) travels with the example
        custom = sups[0][1].get("custom") or {}
        extra.update({k: v for k, v in custom.items() if k not in _LABEL_KEYS and k not in extra})
    return Example(path=path, labels=tuple(labels), extra=extra)


def _cut_example(where: str, cut: dict) -> Example:
    cid, ctype = cut.get("id"), cut.get("type")
    if ctype != "MonoCut":
        raise ManifestError(f"{where}: cut {cid!r} is a {ctype}; only MonoCut (one channel of one recording) is "
                            "supported")
    rec = cut.get("recording")
    if not isinstance(rec, dict):
        raise ManifestError(f"{where}: cut {cid!r} has no recording (cuts of precomputed features only are not "
                            "supported)")
    start = _seconds(where, cut, "start", f"cut {cid!r}")
    duration = _seconds(where, cut, "duration", f"cut {cid!r}")
    total = _seconds(where, rec, "duration", f"recording {rec.get('id')!r}")
    if abs(start) > _WHOLE_TOLERANCE_S or abs(start + duration - total) > _WHOLE_TOLERANCE_S:
        raise ManifestError(f"{where}: cut {cid!r} covers {start:.3f}-{start + duration:.3f} s of the {total:.3f}-s "
                            f"recording {rec.get('id')!r}; ssamba reads whole files (save such cuts as audio files "
                            "first)")
    sups = cut.get("supervisions") or []
    if not isinstance(sups, list) or not all(isinstance(s, dict) for s in sups):
        raise ManifestError(f"{where}: cut {cid!r}: \"supervisions\" must be a list of objects")
    extra = {"id": cid}
    custom = cut.get("custom") or {}
    extra.update({k: v for k, v in custom.items() if k not in _LABEL_KEYS and k != "id"})
    example = _example(where, rec, [(where, s) for s in sups], extra)
    if not example.labels and any(k in custom for k in _LABEL_KEYS):  # a cut-level label, when supervisions have none
        own = _supervision_labels(where, {"id": cid, "custom": custom})
        example = Example(path=example.path, labels=own, extra=example.extra)
    return example


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
