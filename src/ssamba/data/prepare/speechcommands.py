"""Speech Commands v1 (v0.01) / v2 (v0.02) (Warden 2018, arXiv 1804.03209), 35 classes or SUPERB's 12.

Layout (the released archive, extracted): ``ROOT/<word>/<speaker hash>_nohash_<n>.wav`` (1-s 16 kHz clips),
``ROOT/validation_list.txt`` and ``ROOT/testing_list.txt`` (one ``<word>/<file>.wav`` per line; the official
hash split), ``ROOT/_background_noise_/*.wav`` (six long noise recordings). Train = every word clip in neither
list, as torchaudio's SPEECHCOMMANDS and lhotse's recipe do.

``classes=35``: every word of the version is a class (v1 has 30 words, v2 35), the setup of the SSAST / SSAMBA
KWS tables. ``classes=12``: SUPERB KS (s3prl ``downstream/speech_commands``): the 10 command words, ``_unknown_``
(every other word) and ``_silence_`` (1-s cuts of the background-noise recordings, see `_silence`);
SUPERB defines it on v0.01 (``version=1``), which the ``kws12`` fine-tuning recipe follows.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import soundfile

from ssamba.audio import save_audio
from ssamba.data.manifest import Example, LabelSet
from ssamba.data.prepare.common import Prepared, PrepareError, read_lines, require_dir, require_file

V1_WORDS = ("bed", "bird", "cat", "dog", "down", "eight", "five", "four", "go", "happy", "house", "left", "marvin",
            "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop", "three", "tree", "two",
            "up", "wow", "yes", "zero")
V2_WORDS = tuple(sorted((*V1_WORDS, "backward", "follow", "forward", "learn", "visual")))
# SUPERB KS's classes in s3prl's order (downstream/speech_commands/dataset.py CLASSES)
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
NOISE_DIR = "_background_noise_"
SPLITS = ("train", "valid", "test")
# Disjoint stretches of every noise recording per split (fractions of its length), so no noise audio is shared
# between splits; 80/10/10 as the official word split.
_NOISE_REGIONS = {"train": (0.0, 0.8), "valid": (0.8, 0.9), "test": (0.9, 1.0)}
_LIST_LINE = re.compile(r"^([^/\s]+)/([^/\s]+\.wav)$")


def prepare(root: Path, out: Path, *, version: int = 2, classes: int = 35, seed: int = 0) -> Prepared:
    if version not in (1, 2):
        raise PrepareError(f"speechcommands: --version must be 1 or 2, got {version}")
    if classes not in (35, 12):
        raise PrepareError(f"speechcommands: --classes must be 35 or 12, got {classes}")
    require_dir(root, "Speech Commands folder")
    words = V1_WORDS if version == 1 else V2_WORDS
    listed = {split: _read_list(require_file(root / f"{name}_list.txt", f"{name}_list.txt"))
              for split, name in (("valid", "validation"), ("test", "testing"))}
    prepared = Prepared({s: [] for s in SPLITS}, LabelSet([]))
    split_of = {rel: split for split, rels in listed.items() for rel in rels}
    on_disk: set[str] = set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == NOISE_DIR or folder.name.startswith(".") or folder.resolve() == out.resolve():
            continue
        files = sorted(f.name for f in folder.glob("*.wav"))
        if folder.name not in words:
            prepared.skipped += [{"file": f"{folder.name}/{f}", "reason": f"not a Speech Commands v{version} word"}
                                 for f in files]
            continue
        for f in files:
            rel = f"{folder.name}/{f}"
            on_disk.add(rel)
            label = folder.name if classes == 35 or folder.name in COMMANDS else UNKNOWN
            speaker = f.split("_nohash_")[0]
            prepared.splits[split_of.get(rel, "train")].append(
                Example(folder / f, (label,), {"word": folder.name, "speaker": speaker}))
    for split, rels in listed.items():
        for rel in rels:
            if rel.split("/")[0] not in words:
                prepared.skipped.append({"file": rel, "reason": f"listed word not in Speech Commands v{version}"})
            elif rel not in on_disk:
                prepared.missing.append({"split": split, "file": rel, "reason": "listed but not on disk"})
    prepared.notes["version"] = version
    if classes == 35:
        prepared.labels = LabelSet(list(words))
        prepared.notes["background_noise"] = f"{NOISE_DIR}/ is not used by the {len(words)}-class setup"
    else:
        prepared.labels = LabelSet([*COMMANDS, UNKNOWN, SILENCE])
        prepared.notes["silence"] = _silence(root, out, prepared, seed)
    return prepared


def _read_list(path: Path) -> list[str]:
    rels = []
    for n, line in read_lines(path):
        if not _LIST_LINE.match(line):
            raise PrepareError(f"{path}:{n}: expected <word>/<file>.wav, got {line[:80]!r}")
        rels.append(line)
    return rels


def _silence(root: Path, out: Path, prepared: Prepared, seed: int) -> dict:
    """Write ``_silence_`` clips, 1 s each, cut from the background-noise recordings, under OUT/silence/<split>/.

    How many: per split, 10 % of its command-word clips, rounded up (the mean clips of one command word), so
    ``_silence_`` is a class of ordinary size: the TensorFlow reference pipeline's rule (speech_commands/
    input_data.py: ``silence_percentage`` = 10 of each split's command-word clips). SUPERB (s3prl) instead adds
    the six noise files themselves to train and dev and crops a random second at every read,
    rebalancing with a weighted sampler, which a fixed manifest cannot do. Where: each split draws only from its
    own stretch of every recording (`_NOISE_REGIONS`), so no noise audio is shared between splits; offsets are
    uniform within the stretch (``seed``), recordings taken in turn. The test split of SUPERB (the separate
    speech_commands_test_set archive, with its own _silence_ clips) is not used here.
    """
    noise_dir = require_dir(root / NOISE_DIR, f"{NOISE_DIR} folder (needed for the 12-class _silence_ class)")
    noises = []
    for path in sorted(noise_dir.glob("*.wav")):
        try:
            wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise PrepareError(f"{path}: unreadable background-noise file ({e})") from e
        noises.append((path, wave.mean(axis=1), rate))
    if not noises:
        raise PrepareError(f"{noise_dir}: no .wav background-noise files")
    rng = np.random.default_rng(seed)
    counts = {}
    for split in SPLITS:
        words = [e for e in prepared.splits[split] if e.labels[0] in COMMANDS]
        wanted = math.ceil(len(words) * 10 / 100)  # input_data.py: ceil(set_size * silence_percentage / 100)
        lo, hi = _NOISE_REGIONS[split]
        # (file, samples, rate, first and last start sample of a 1-s cut inside the split's stretch)
        stretches = [(p, w, r, int(lo * len(w)), int(hi * len(w)) - r) for p, w, r in noises]
        usable = [s for s in stretches if s[4] >= s[3]]
        if wanted and not usable:
            raise PrepareError(f"{noise_dir}: no background-noise file is long enough to cut 1-s {split} clips from "
                               f"its {int(100 * lo)}-{int(100 * hi)} % stretch")
        folder = out / "silence" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("[0-9][0-9][0-9][0-9][0-9]_*.wav"):  # an earlier run's cuts (other seed or counts)
            stale.unlink()
        for k in range(wanted):
            path, wave, rate, first, last = usable[k % len(usable)]
            start = int(rng.integers(first, last + 1))
            clip = folder / f"{k:05d}_{path.stem}_{start}.wav"
            save_audio(clip, np.clip(wave[start : start + rate], -1.0, 32767 / 32768), rate)
            prepared.splits[split].append(Example(clip, (SILENCE,), {"noise": path.name, "offset": start / rate}))
        counts[split] = wanted
    return {"per_split": counts, "seed": seed, "sources": [p.name for p, _, _ in noises],
            "rule": "per split: 10 % of its command-word clips; 1-s cuts at seeded offsets from split-disjoint "
                    "stretches (train 0-80 %, valid 80-90 %, test 90-100 % of each recording)"}
