"""What every corpus preparer shares: the error type, input checks, and writing the output folder.

Output of `write_prepared` (the contract of ``ssamba data prepare``):
  OUT/<split>.json   SSAST JSON per split (``train``, ``valid``, ``test``; folded corpora ``fold<k>_train`` /
                     ``fold<k>_test`` and ``all`` with every entry's ``fold``); audio paths relative to OUT
  OUT/labels.csv     ``index,mid,display_name``
  OUT/prepare.json   files and classes per split, missing and skipped files with their reasons, options
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ssamba.data.manifest import Example, LabelSet, ManifestError, write_manifest


class PrepareError(ManifestError):
    """A corpus folder that does not have the expected layout; the message names the file (and line)."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{path}: {what} not found")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PrepareError(f"{path}: {what} not found")
    return path


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: unreadable ({e})") from e


@dataclass
class Prepared:
    """A corpus as manifests: split name -> examples, the label set, what was left out and why."""

    splits: dict[str, list[Example]]
    labels: LabelSet
    # files the corpus lists but that are not on disk: {"split", "file", "reason"}
    missing: list[dict] = field(default_factory=list)
    # files (or list entries) on disk that are deliberately left out: {"file", "reason"}
    skipped: list[dict] = field(default_factory=list)
    # corpus-specific facts worth keeping (how silence was cut, which subsets, the split rule, ...)
    notes: dict = field(default_factory=dict)


def with_folds(examples: list[Example], folds: list[int]) -> dict[str, list[Example]]:
    """``fold<k>_train`` / ``fold<k>_test`` (fold k held out) for each k, and ``all``; every example carries
    ``extra["fold"]`` (what ``ssamba finetune --set data.folds=K`` reads from ``all.json``)."""
    splits: dict[str, list[Example]] = {}
    for k in folds:
        splits[f"fold{k}_train"] = [e for e in examples if e.extra["fold"] != k]
        splits[f"fold{k}_test"] = [e for e in examples if e.extra["fold"] == k]
    splits["all"] = list(examples)
    return splits


def write_prepared(name: str, root: Path, out: Path, prepared: Prepared, options: dict) -> dict:
    """Write the manifests, labels.csv and prepare.json; return the prepare.json summary."""
    out.mkdir(parents=True, exist_ok=True)
    missing_per_split = Counter(m.get("split") for m in prepared.missing)
    splits = {}
    for split, examples in prepared.splits.items():
        if examples:  # an empty manifest is unreadable; the summary still says 0 files
            write_manifest(out / f"{split}.json", examples)
        splits[split] = {
            "files": len(examples),
            "classes": len({m for e in examples for m in e.labels}),
            "missing": missing_per_split.get(split, 0),
            "manifest": f"{split}.json" if examples else None,
        }
    prepared.labels.to_csv(out / "labels.csv")
    summary = {
        "corpus": name,
        "root": os.fspath(root.resolve()),
        "options": options,
        "classes": len(prepared.labels),
        "splits": splits,
        "missing_count": len(prepared.missing),
        "skipped_count": len(prepared.skipped),
        "skipped_reasons": dict(Counter(s["reason"] for s in prepared.skipped)),
        **prepared.notes,
        "missing": prepared.missing,
        "skipped": prepared.skipped,
    }
    (out / "prepare.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


__all__ = ["PrepareError", "Prepared", "read_lines", "require_dir", "require_file", "with_folds", "write_prepared"]
