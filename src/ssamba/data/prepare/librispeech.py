"""LibriSpeech (Panayotov et al. 2015): read English audiobooks with transcripts, for CTC and HuBERT.

Layout: ``ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter folder (lines ``<speaker>-<chapter>-<utt> TRANSCRIPT``);
ROOT may also be the folder holding ``LibriSpeech/`` (as the archives extract).

Subsets (``subsets``, default ``train-clean-100,dev-clean,test-clean``): HuBERT (Hsu et al. 2021) pretrains
its Base model on all 960 h (train-clean-100 + train-clean-360 + train-other-500), fine-tunes for ASR on the
100-h train-clean-100 (or Libri-light's 10 min / 1 h / 10 h subsets of it) and reports WER on dev/test
clean and other. The default is the 100-h fine-tuning set with the clean dev/test sets; add train-clean-360,
train-other-500 for 960-h pretraining, dev-other, test-other for the "other" conditions. Splits by subset name:
train-* -> ``train``, dev-* -> ``valid``, test-* -> ``test``.
Entries carry ``transcript`` (as in the transcript file; the CTC vocabulary lower-cases it), ``speaker``,
``chapter`` and ``subset``; the label of each utterance is its speaker (labels.csv: every speaker).
"""

from __future__ import annotations

import re
from pathlib import Path

from ssamba.data.manifest import Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, read_lines, require_dir

DEFAULT_SUBSETS = ("train-clean-100", "dev-clean", "test-clean")
SPLIT_OF_PREFIX = {"train": "train", "dev": "valid", "test": "test"}
_LINE = re.compile(r"^(\d+)-(\d+)-(\d+)\s+(.*\S)$")


def prepare(root: Path, out: Path, *, subsets: str | list[str] | tuple[str, ...] = DEFAULT_SUBSETS) -> Prepared:
    require_dir(root, "LibriSpeech folder")
    if isinstance(subsets, str):
        subsets = [s.strip() for s in subsets.split(",") if s.strip()]
    if not subsets:
        raise PrepareError("librispeech: --subsets is empty")
    prepared = Prepared({}, LabelSet([]))
    speakers = set()
    for subset in subsets:
        split = SPLIT_OF_PREFIX.get(subset.split("-")[0])
        if split is None:
            raise PrepareError(f"librispeech: subset {subset!r} is not a train-*, dev-* or test-* subset")
        folder = next((p for p in (root / subset, root / "LibriSpeech" / subset) if p.is_dir()), root / subset)
        require_dir(folder, f"LibriSpeech subset {subset}")
        examples = prepared.splits.setdefault(split, [])
        for trans in sorted(folder.glob("*/*/*.trans.txt")):
            chapter_dir = trans.parent
            seen = set()
            for n, line in read_lines(trans):
                m = _LINE.match(line)
                if m is None or f"{m.group(1)}-{m.group(2)}" != trans.name[: -len(".trans.txt")]:
                    raise PrepareError(f"{trans}:{n}: expected '<speaker>-<chapter>-<utt> TRANSCRIPT' of this "
                                       f"chapter, got {line[:80]!r}")
                utt = line.split()[0]
                seen.add(utt)
                path = chapter_dir / f"{utt}.flac"
                rel = f"{subset}/{m.group(1)}/{m.group(2)}/{utt}.flac"
                if not path.is_file():
                    prepared.missing.append({"split": split, "file": rel, "reason": "transcribed but not on disk"})
                    continue
                speakers.add(m.group(1))
                examples.append(Example(path, (m.group(1),), {"transcript": m.group(4), "speaker": m.group(1),
                                                              "chapter": m.group(2), "subset": subset}))
            for flac in sorted(chapter_dir.glob("*.flac")):
                if flac.stem not in seen:
                    prepared.skipped.append({"file": f"{subset}/{flac.relative_to(folder).as_posix()}",
                                             "reason": "no transcript line"})
    prepared.labels = LabelSet(sorted(speakers, key=int))
    prepared.notes["subsets"] = list(subsets)
    return prepared
