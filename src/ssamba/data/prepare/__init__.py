"""``ssamba data prepare NAME ROOT --out DIR``: manifests and labels of the papers' corpora, from the layout
each is distributed in, with the official splits.

One module per corpus (its docstring gives the layout it expects and the facts it follows); each module's
``prepare(root, out, **options)`` returns a `Prepared`, which `write_prepared` turns into ``OUT/<split>.json``
(SSAST JSON), ``OUT/labels.csv`` and ``OUT/prepare.json``. A missing folder or list file, or a malformed
line, is a `PrepareError` (a `ManifestError`) naming the file and line; files a list names but the disk lacks
are counted and listed in prepare.json, not fatal.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from ssamba.data.prepare import audioset, esc50, iemocap, librispeech, speechcommands, voxceleb1
from ssamba.data.prepare.common import Prepared, PrepareError, write_prepared

PREPARERS: dict[str, Callable[..., Prepared]] = {
    "speechcommands": speechcommands.prepare,
    "esc50": esc50.prepare,
    "audioset": audioset.prepare,
    "voxceleb1": voxceleb1.prepare,
    "iemocap": iemocap.prepare,
    "librispeech": librispeech.prepare,
}


def prepare(name: str, root: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Prepare corpus ``name`` found at ``root`` into ``out``; returns the prepare.json summary.

    ``options`` are the corpus's own (speechcommands: version, classes, seed; librispeech: subsets); one the
    corpus does not take is an error, not ignored.
    """
    if name not in PREPARERS:
        raise PrepareError(f"unknown corpus {name!r}; choose one of {', '.join(PREPARERS)}")
    fn = PREPARERS[name]
    accepted = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - {p.name for p in accepted})
    if unknown:
        takes = ", ".join(p.name for p in accepted) or "no options"
        raise PrepareError(f"{name}: unknown option(s) {', '.join(unknown)} (it takes {takes})")
    root, out = Path(root), Path(out)
    prepared = fn(root, out, **options)
    used = {p.name: options.get(p.name, p.default) for p in accepted}
    used = {k: list(v) if isinstance(v, tuple) else v for k, v in used.items()}
    return write_prepared(name, root, out, prepared, used)


__all__ = ["PREPARERS", "Prepared", "PrepareError", "prepare"]
