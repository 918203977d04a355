"""AudioSet (Gemmeke et al. 2017): 10-s YouTube segments, 527 classes, multi-label.

Layout: the official segment lists ``ROOT/balanced_train_segments.csv``, ``ROOT/eval_segments.csv`` and
(optional: 2 M segments, rarely downloaded whole) ``ROOT/unbalanced_train_segments.csv`` -- three comment lines
starting with ``#``, then ``YTID, start_seconds, end_seconds, "positive_labels"`` -- the ontology's
``ROOT/class_labels_indices.csv`` (``index,mid,display_name``, copied to labels.csv as it is), and the clips the
user downloaded, anywhere under ROOT (any depth), one file per segment named by its YouTube id.

Accepted clip names (suffix .wav, .flac, .ogg or .mp3), for a segment ``YTID, 30.000, 40.000``:
``YTID``, ``YYTID`` (the "Y" prefix of the PANNs / DCASE downloads), ``YTID_30.000``, ``YTID_30``,
``YTID_30000`` (ms), ``YTID_30.000_40.000``, ``YTID_30_40``, ``YTID_30000_40000`` (ms) and the same three with
the ``Y`` prefix. YouTube ids may themselves start with "-" and contain "_", so names are matched against these
candidates per segment, never split apart. A segment with no clip is listed in prepare.json (``missing``: most
AudioSet downloads lack a few percent of the videos) and left out; it is not an error.
Splits: ``balanced.json``, ``eval.json``, ``unbalanced.json`` (SSAST's balanced-set fine-tuning: train balanced,
validate and test on eval).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ssamba.data.manifest import AUDIO_SUFFIXES, Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, require_dir, require_file

SEGMENT_FILES = {"balanced": "balanced_train_segments.csv", "eval": "eval_segments.csv",
                 "unbalanced": "unbalanced_train_segments.csv"}
REQUIRED = ("balanced", "eval")


def clip_names(ytid: str, start: str, end: str) -> list[str]:
    """Candidate file stems of one segment, in order of preference."""
    s, e = float(start), float(end)
    times = [(start, end), (f"{s:.3f}", f"{e:.3f}"), (f"{s:.0f}", f"{e:.0f}"), (f"{s * 1000:.0f}", f"{e * 1000:.0f}")]
    names = [ytid, f"Y{ytid}"]
    for a, b in times:
        names += [f"{ytid}_{a}", f"{ytid}_{a}_{b}", f"Y{ytid}_{a}_{b}"]
    return list(dict.fromkeys(names))


def prepare(root: Path, out: Path) -> Prepared:
    require_dir(root, "AudioSet folder")
    labels = LabelSet.from_csv(require_file(root / "class_labels_indices.csv", "class_labels_indices.csv"))
    known = set(labels.mids)
    for split in REQUIRED:
        require_file(root / SEGMENT_FILES[split], f"AudioSet segment list {SEGMENT_FILES[split]}")
    segments = {split: _read_segments(root / name, known) for split, name in SEGMENT_FILES.items()
                if (root / name).is_file()}
    clips = _index_clips(root, out)
    prepared = Prepared({}, labels)
    for split, rows in segments.items():
        found = []
        for ytid, start, end, mids in rows:
            path = next((clips[n] for n in clip_names(ytid, start, end) if n in clips), None)
            if path is None:
                prepared.missing.append({"split": split, "file": ytid, "reason": "no downloaded clip"})
            else:
                found.append(Example(path, mids, {"ytid": ytid, "start": float(start), "end": float(end)}))
        prepared.splits[split] = found
    if not any(prepared.splits.values()):
        total = sum(len(rows) for rows in segments.values())
        raise PrepareError(f"{root}: none of the {total} listed segments has a clip under it (expected files such "
                           f"as <YTID>.wav or Y<YTID>.wav; see `ssamba.data.prepare.audioset`)")
    prepared.notes["segment_lists"] = {split: SEGMENT_FILES[split] for split in segments}
    prepared.notes["clip_files_found"] = len(clips)
    return prepared


def _read_segments(path: Path, known: set[str]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: unreadable ({e})") from e
    for n, line in lines:
        try:
            fields = next(csv.reader([line], skipinitialspace=True))
        except csv.Error as e:
            raise PrepareError(f"{path}:{n}: {e}") from None
        if len(fields) != 4:
            raise PrepareError(f'{path}:{n}: expected YTID, start_seconds, end_seconds, "positive_labels"; got '
                               f"{line.strip()[:80]!r}")
        ytid, start, end, positive = (x.strip() for x in fields)
        try:
            float(start), float(end)
        except ValueError:
            raise PrepareError(f"{path}:{n}: start/end seconds must be numbers, got {start!r}, {end!r}") from None
        mids = tuple(m.strip() for m in positive.split(",") if m.strip())
        unknown = [m for m in mids if m not in known]
        if not ytid or not mids or unknown:
            raise PrepareError(f"{path}:{n}: " + (f"labels {unknown} are not in class_labels_indices.csv" if unknown
                                                  else "empty YTID or labels"))
        rows.append((ytid, start, end, mids))
    return rows


def _index_clips(root: Path, out: Path) -> dict[str, Path]:
    """File stem -> path of every audio file under ROOT (the first in sorted order when a stem repeats)."""
    clips: dict[str, Path] = {}
    skip = out.resolve()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if Path(folder, d).resolve() != skip)  # never index our own output
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in AUDIO_SUFFIXES:
                clips.setdefault(stem, Path(folder) / name)
    return clips
