"""IEMOCAP emotion recognition (Busso et al. 2008), the 4-class setup with leave-one-session-out folds.

Layout (IEMOCAP_full_release): ``ROOT/Session{1..5}/sentences/wav/<dialog>/<utterance>.wav`` and
``ROOT/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt``, whose utterance lines read
``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`` (start - end, utterance,
consensus emotion, valence/activation/dominance); the other lines (header, per-annotator ``C-E1:`` lines, blank)
are not utterances. macOS ``._*`` files, present in the release, are ignored.

Classes: neu, hap, ang, sad, with ``exc`` (excited) merged into hap -- SUPERB ER (s3prl ``downstream/emotion``)
and SSAMBA's ER; every other consensus label (fru, sur, fea, dis, oth, xxx) is dropped and counted in
prepare.json. Folds: ``fold<k>_test`` = Session k, ``fold<k>_train`` = the other four sessions; ``all.json``
carries every utterance's ``fold`` (= session) for ``ssamba finetune --task er`` (``data.folds = 5``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ssamba.data.manifest import Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, read_lines, require_dir, with_folds

SESSIONS = (1, 2, 3, 4, 5)
CLASSES = {"neu": "neutral", "hap": "happy (with excited)", "ang": "angry", "sad": "sad"}
MERGE = {"exc": "hap"}
_UTTERANCE = re.compile(r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(\S+)\t(\S+)\t\[([^\]]*)\]$")


def prepare(root: Path, out: Path) -> Prepared:
    require_dir(root, "IEMOCAP folder")
    prepared = Prepared({}, LabelSet(list(CLASSES), list(CLASSES.values())))
    examples = []
    for session in SESSIONS:
        base = require_dir(root / f"Session{session}", f"IEMOCAP Session{session} folder")
        evaluations = require_dir(base / "dialog" / "EmoEvaluation", "EmoEvaluation folder")
        wav = require_dir(base / "sentences" / "wav", "sentences/wav folder")
        for txt in sorted(p for p in evaluations.glob("*.txt") if not p.name.startswith(".")):
            for n, line in read_lines(txt):
                if not line.startswith("["):
                    continue
                m = _UTTERANCE.match(line)
                if m is None:
                    raise PrepareError(f"{txt}:{n}: expected '[start - end]<TAB>utterance<TAB>emotion<TAB>[V, A, D]', "
                                       f"got {line[:80]!r}")
                utterance, emotion = m.group(3), m.group(4)
                label = MERGE.get(emotion, emotion)
                rel = f"Session{session}/sentences/wav/{txt.stem}/{utterance}.wav"
                if label not in CLASSES:
                    prepared.skipped.append({"file": rel, "reason": f"emotion {emotion!r} is not in the 4-class set"})
                    continue
                path = wav / txt.stem / f"{utterance}.wav"
                if not path.is_file():
                    prepared.missing.append({"split": f"fold{session}_test", "file": rel,
                                             "reason": "in EmoEvaluation but not on disk"})
                    continue
                speaker = utterance[:5] + utterance.rsplit("_", 1)[-1][:1]  # Ses01 + F/M: the speaking actor
                examples.append(Example(path, (label,), {"fold": session, "emotion": emotion, "speaker": speaker}))
    if not examples:
        raise PrepareError(f"{root}: no 4-class utterances found in Session*/dialog/EmoEvaluation/*.txt")
    prepared.splits = with_folds(examples, list(SESSIONS))
    prepared.notes["merged"] = MERGE
    return prepared
