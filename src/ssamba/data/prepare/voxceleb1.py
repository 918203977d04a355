"""VoxCeleb1 speaker identification (Nagrani et al. 2017): 1251 speakers, the official identification split.

Layout: ``ROOT/wav/<speaker id>/<video id>/<n>.wav`` (the dev and test archives both extract to ``wav/``) and
``ROOT/iden_split.txt`` (or ``ROOT/meta/iden_split.txt``), lines ``<1|2|3> id10001/1zcIwhmdeo4/00001.wav``:
1 train, 2 valid, 3 test -- the list SUPERB SID (s3prl ``downstream/voxceleb1``) and SSAMBA's SID use.
Labels: the speaker ids; display names from ``ROOT/vox1_meta.csv`` (tab-separated, the official metadata) when
it is there.
"""

from __future__ import annotations

import re
from pathlib import Path

from ssamba.data.manifest import Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, read_lines, require_dir

SPLIT_OF = {"1": "train", "2": "valid", "3": "test"}
_LINE = re.compile(r"^([123])\s+(([^/\s]+)/[^/\s]+/[^/\s]+\.wav)$")


def prepare(root: Path, out: Path) -> Prepared:
    require_dir(root, "VoxCeleb1 folder")
    wav = require_dir(root / "wav", "VoxCeleb1 audio folder (wav/<speaker>/<video>/<n>.wav)")
    split_file = next((p for p in (root / "iden_split.txt", root / "meta" / "iden_split.txt") if p.is_file()), None)
    if split_file is None:
        raise PrepareError(f"{root / 'iden_split.txt'}: VoxCeleb1 identification split not found")
    prepared = Prepared({s: [] for s in SPLIT_OF.values()}, LabelSet([]))
    speakers = set()
    for n, line in read_lines(split_file):
        m = _LINE.match(line)
        if m is None:
            raise PrepareError(f"{split_file}:{n}: expected '<1|2|3> <speaker>/<video>/<n>.wav', got {line[:80]!r}")
        split, rel, speaker = SPLIT_OF[m.group(1)], m.group(2), m.group(3)
        speakers.add(speaker)
        path = wav / rel
        if path.is_file():
            prepared.splits[split].append(Example(path, (speaker,), {"video": rel.split("/")[1]}))
        else:
            prepared.missing.append({"split": split, "file": f"wav/{rel}", "reason": "listed but not on disk"})
    names = _speaker_names(root / "vox1_meta.csv")
    ordered = sorted(speakers)
    prepared.labels = LabelSet(ordered, [names.get(s, s) for s in ordered])
    return prepared


def _speaker_names(meta: Path) -> dict[str, str]:
    """id -> name from vox1_meta.csv (``VoxCeleb1 ID<TAB>VGGFace1 ID<TAB>Gender<TAB>Nationality<TAB>Set``)."""
    if not meta.is_file():
        return {}
    names = {}
    for n, line in read_lines(meta)[1:]:
        fields = line.split("\t")
        if len(fields) < 2:
            raise PrepareError(f"{meta}:{n}: expected tab-separated fields, got {line[:80]!r}")
        names[fields[0].strip()] = fields[1].strip()
    return names
