"""ESC-50 (Piczak 2015): 2000 5-s clips, 50 classes, 5 folds for cross-validation.

Layout (github.com/karolpiczak/ESC-50): ``ROOT/meta/esc50.csv`` with header
``filename,fold,target,category,esc10,src_file,take`` and ``ROOT/audio/<filename>`` (44.1 kHz WAV; ssamba
resamples on load). Classes: ``target`` 0..49, named by ``category``. Folds: ``fold<k>_test`` = fold k,
``fold<k>_train`` = the other folds (the official protocol: accuracy averaged over the 5 held-out folds);
``all.json`` holds every clip with its ``fold`` for ``ssamba finetune --task esc`` (``data.folds = 5``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ssamba.data.manifest import Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, require_dir, require_file, with_folds

COLUMNS = ("filename", "fold", "target", "category")


def prepare(root: Path, out: Path) -> Prepared:
    require_dir(root, "ESC-50 folder")
    meta = require_file(root / "meta" / "esc50.csv", "ESC-50 metadata (meta/esc50.csv)")
    audio = require_dir(root / "audio", "ESC-50 audio folder")
    try:
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
                raise PrepareError(f"{meta}:1: expected a header with {','.join(COLUMNS)}, got "
                                   f"{','.join(reader.fieldnames or [])!r}")
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"{meta}: unreadable ({e})") from e
    category_of: dict[int, str] = {}
    entries = []  # (filename, fold, category)
    for n, row in rows:
        try:
            fold, target = int(row["fold"]), int(row["target"])
        except (TypeError, ValueError):
            raise PrepareError(f"{meta}:{n}: fold and target must be integers, got {row['fold']!r}, "
                               f"{row['target']!r}") from None
        name, category = (row["filename"] or "").strip(), (row["category"] or "").strip()
        if not name or not category:
            raise PrepareError(f"{meta}:{n}: empty filename or category")
        if category_of.setdefault(target, category) != category:
            raise PrepareError(f"{meta}:{n}: target {target} is {category!r} here but {category_of[target]!r} above")
        entries.append((name, fold, category))
    if not entries:
        raise PrepareError(f"{meta}: no clips listed")
    targets = sorted(category_of)
    labels = LabelSet([category_of[t] for t in targets])  # index = rank of target (= target on the full corpus)
    prepared = Prepared({}, labels)
    examples = []
    for name, fold, category in entries:
        path = audio / name
        if path.is_file():
            examples.append(Example(path, (category,), {"fold": fold}))
        else:
            prepared.missing.append({"split": f"fold{fold}_test", "file": f"audio/{name}",
                                     "reason": "listed in meta/esc50.csv but not on disk"})
    folds = sorted({fold for _, fold, _ in entries})
    prepared.splits = with_folds(examples, folds)
    prepared.notes["folds"] = folds
    return prepared
