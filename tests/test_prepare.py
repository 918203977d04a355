"""`ssamba data prepare` on miniature replicas of each corpus's standard layout (real file names and list
formats, a handful of short generated clips), fine-tuning on the result, bad input, and lhotse manifests."""

import gzip
import json

import numpy as np
import pytest
import soundfile

from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.data.manifest import Example, LabelSet, ManifestError, read_manifest, write_manifest
from ssamba.data.prepare import PREPARERS, PrepareError, prepare
from tests.conftest import one_error_line

RNG = np.random.default_rng(0)


def _wav(path, seconds=0.25, rate=16000, freq=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    freq = freq if freq is not None else 200 + 3000 * RNG.random()
    save_audio(path, (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * RNG.standard_normal(t.shape)).astype(np.float32),
               rate)
    return path


def _labels(out):
    return LabelSet.from_csv(out / "labels.csv")


def _count(out, split):
    return len(read_manifest(out / f"{split}.json"))


# ------------------------------------------------------------------------------------ Speech Commands

COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def speech_commands(root):
    """10 command words + bed, cat (v1 words) + visual (v2 only); 5 clips each: 3 train, 1 valid, 1 test."""
    valid, test = [], []
    for word in (*COMMANDS, "bed", "cat", "visual"):
        for i in range(5):
            rel = f"{word}/{i:08x}_nohash_0.wav"
            _wav(root / rel, freq=200 + 100 * i)
            if word != "visual" and i == 3:
                valid.append(rel)
            if word != "visual" and i == 4:
                test.append(rel)
    test.append("yes/ffffffff_nohash_9.wav")  # listed, not on disk
    (root / "validation_list.txt").write_text("\n".join(valid) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    for name in ("white_noise", "running_tap"):
        _wav(root / "_background_noise_" / f"{name}.wav", seconds=10.0)
    (root / "_background_noise_" / "README.md").write_text("noise\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    return root


@pytest.fixture(scope="module")
def sc_root(tmp_path_factory):
    return speech_commands(tmp_path_factory.mktemp("speech_commands_v0.01"))


def test_speechcommands_35_classes(sc_root, tmp_path):
    s = prepare("speechcommands", sc_root, tmp_path / "v1", version=1)
    assert len(_labels(tmp_path / "v1")) == 30 and s["classes"] == 30  # v1 has 30 words
    assert {k: v["files"] for k, v in s["splits"].items()} == {"train": 36, "valid": 12, "test": 12}
    assert s["splits"]["test"]["missing"] == 1 and s["missing"][0]["file"] == "yes/ffffffff_nohash_9.wav"
    assert s["skipped_reasons"] == {"not a Speech Commands v1 word": 5}  # visual/ is a v2 word
    test = read_manifest(tmp_path / "v1" / "test.json")
    assert sorted(e.labels[0] for e in test) == sorted((*COMMANDS, "bed", "cat"))
    assert all(e.path.name == "00000004_nohash_0.wav" for e in test)

    s2 = prepare("speechcommands", sc_root, tmp_path / "v2")
    assert s2["classes"] == 35 and s2["splits"]["train"]["files"] == 41 and s2["skipped_count"] == 0
    assert "visual" in _labels(tmp_path / "v2").mids


def test_speechcommands_12_classes_silence_and_unknown(sc_root, tmp_path):
    s = prepare("speechcommands", sc_root, tmp_path / "a", version=1, classes=12)
    labels = _labels(tmp_path / "a")
    assert labels.mids == [*COMMANDS, "_unknown_", "_silence_"]
    # silence per split = mean clips per command word: 30 / 10 train, 10 / 10 valid and test
    assert s["silence"]["per_split"] == {"train": 3, "valid": 1, "test": 1}
    assert {k: v["files"] for k, v in s["splits"].items()} == {"train": 30 + 6 + 3, "valid": 13, "test": 13}
    train = read_manifest(tmp_path / "a" / "train.json")
    assert sum(e.labels == ("_unknown_",) for e in train) == 6
    silence = [e for e in train if e.labels == ("_silence_",)]
    assert all(soundfile.info(str(e.path)).frames == 16000 for e in silence)
    # each split cuts from its own stretch of every recording: train 0-8 s, valid 8-9 s, test 9-10 s
    offsets = {split: [e.extra["offset"] for e in read_manifest(tmp_path / "a" / f"{split}.json")
                       if e.labels == ("_silence_",)] for split in ("train", "valid", "test")}
    assert all(o <= 7.0 for o in offsets["train"]) and offsets["valid"][0] == pytest.approx(8.0)
    assert offsets["test"][0] == pytest.approx(9.0)
    # deterministic by seed
    prepare("speechcommands", sc_root, tmp_path / "b", version=1, classes=12)
    prepare("speechcommands", sc_root, tmp_path / "c", version=1, classes=12, seed=1)
    same = json.loads((tmp_path / "b" / "train.json").read_text())
    assert same == json.loads((tmp_path / "a" / "train.json").read_text())
    assert same != json.loads((tmp_path / "c" / "train.json").read_text())


# ------------------------------------------------------------------------------------------ ESC-50

def esc50(root):
    """3 classes x 5 folds; the fold-5 pig clip is missing."""
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in enumerate(("dog", "rooster", "pig")):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            rows.append(f"{name},{fold},{target},{category},{target == 0},{100 + target},A")
            if (fold, category) != (5, "pig"):
                _wav(root / "audio" / name, rate=44100, freq=300 * (target + 1))
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def test_esc50_folds(tmp_path):
    s = prepare("esc50", esc50(tmp_path / "ESC-50-master"), tmp_path / "out")
    out = tmp_path / "out"
    assert _labels(out).mids == ["dog", "rooster", "pig"]
    assert s["splits"]["fold1_test"]["files"] == 3 and s["splits"]["fold1_train"]["files"] == 11
    assert s["splits"]["fold5_test"] == {"files": 2, "classes": 2, "missing": 1, "manifest": "fold5_test.json"}
    everything = read_manifest(out / "all.json")
    assert len(everything) == 14 and sorted({e.extra["fold"] for e in everything}) == [1, 2, 3, 4, 5]
    assert {e.extra["fold"] for e in read_manifest(out / "fold2_test.json")} == {2}


# ---------------------------------------------------------------------------------------- AudioSet

SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
"""


def audioset(root):
    (root / "audio" / "balanced").mkdir(parents=True)
    (root / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0jbk,"Animal"\n')
    (root / "balanced_train_segments.csv").write_text(SEGMENTS + "\n".join([
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/04rlf"',
        '-0RWZT-miFs, 420.000, 430.000, "/m/0jbk"',
        'a_b-c_d-efg, 0.000, 10.000, "/m/04rlf"',
        'zzzzzzzzzzz, 5.000, 15.000, "/m/09x0r"']) + "\n")
    (root / "eval_segments.csv").write_text(SEGMENTS + "\n".join([
        '--4gqARaEJE, 0.000, 10.000, "/m/0jbk"',
        'Ex4mple_id1, 30.000, 40.000, "/m/09x0r"']) + "\n")
    _wav(root / "audio" / "balanced" / "--PJHxphWEs.wav")  # <YTID>
    _wav(root / "audio" / "balanced" / "Y-0RWZT-miFs.flac")  # Y<YTID>
    _wav(root / "audio" / "balanced" / "a_b-c_d-efg_0.000_10.000.wav")  # <YTID>_<start>_<end>
    _wav(root / "audio" / "eval" / "--4gqARaEJE_0.wav")  # <YTID>_<start s>
    _wav(root / "audio" / "eval" / "Ex4mple_id1_30000_40000.wav")  # ms
    return root


def test_audioset_clip_names_and_missing(tmp_path):
    s = prepare("audioset", audioset(tmp_path / "audioset"), tmp_path / "out")
    out = tmp_path / "out"
    assert _labels(out).names == ["Speech", "Music", "Animal"]
    assert set(s["splits"]) == {"balanced", "eval"}  # no unbalanced list: not written
    assert s["splits"]["balanced"] == {"files": 3, "classes": 3, "missing": 1, "manifest": "balanced.json"}
    assert s["missing"] == [{"split": "balanced", "file": "zzzzzzzzzzz", "reason": "no downloaded clip"}]
    balanced = read_manifest(out / "balanced.json")
    assert balanced[0].labels == ("/m/09x0r", "/m/04rlf") and balanced[0].path.name == "--PJHxphWEs.wav"
    assert [e.path.name for e in read_manifest(out / "eval.json")] == ["--4gqARaEJE_0.wav",
                                                                       "Ex4mple_id1_30000_40000.wav"]


# ---------------------------------------------------------------------------------------- VoxCeleb1

def voxceleb1(root):
    lines = []
    for s in range(3):
        speaker = f"id1000{s + 1}"
        for split, n in (("1", 1), ("1", 2), ("2", 3), ("3", 4)):
            rel = f"{speaker}/vid{s}_{n % 2}/{n:05d}.wav"
            _wav(root / "wav" / rel, freq=300 + 400 * s)
            lines.append(f"{split} {rel}")
    lines.append("3 id10001/gone/00009.wav")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    (root / "vox1_meta.csv").write_text("VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\n"
                                        "id10001\tA.J._Buckley\tm\tIreland\tdev\n")
    return root


def test_voxceleb1_identification_split(tmp_path):
    s = prepare("voxceleb1", voxceleb1(tmp_path / "vox1"), tmp_path / "out")
    labels = _labels(tmp_path / "out")
    assert labels.mids == ["id10001", "id10002", "id10003"] and labels.names[0] == "A.J._Buckley"
    assert {k: (v["files"], v["missing"]) for k, v in s["splits"].items()} == {
        "train": (6, 0), "valid": (3, 0), "test": (3, 1)}


# ------------------------------------------------------------------------------------------ IEMOCAP

EMOTIONS = ("neu", "hap", "exc", "ang", "sad", "fru", "xxx")


def iemocap(root):
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for i, emotion in enumerate(EMOTIONS):
            utt = f"{dialog}_{'FM'[i % 2]}{i:03d}"
            _wav(root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav")
            lines += [f"[{i * 3.0:.4f} - {i * 3.0 + 2.5:.4f}]\t{utt}\t{emotion}\t[2.5000, 3.0000, 2.0000]",
                      f"C-E1:\t{emotion.capitalize()};\t()", ""]
        evaluation = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        evaluation.mkdir(parents=True)
        (evaluation / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
        (evaluation / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")  # macOS resource fork
        (evaluation / "Categorical").mkdir()
    return root


def test_iemocap_four_classes_and_session_folds(tmp_path):
    s = prepare("iemocap", iemocap(tmp_path / "IEMOCAP_full_release"), tmp_path / "out")
    out = tmp_path / "out"
    assert _labels(out).mids == ["neu", "hap", "ang", "sad"]
    assert s["skipped_reasons"] == {"emotion 'fru' is not in the 4-class set": 5,
                                    "emotion 'xxx' is not in the 4-class set": 5}
    assert s["splits"]["fold3_test"]["files"] == 5 and s["splits"]["fold3_train"]["files"] == 20
    test = read_manifest(out / "fold3_test.json")
    assert {e.extra["fold"] for e in test} == {3} and all("Session3" in str(e.path) for e in test)
    assert sorted(e.labels[0] for e in test) == ["ang", "hap", "hap", "neu", "sad"]  # exc -> hap
    assert test[2].extra == {"fold": 3, "emotion": "exc", "speaker": "Ses03F"}


# -------------------------------------------------------------------------------------- LibriSpeech

def librispeech(root):
    for subset, speakers in (("train-clean-100", ("19", "26")), ("dev-clean", ("84",)), ("test-clean", ("61",)),
                             ("train-other-500", ("20",))):
        for speaker in speakers:
            chapter = root / "LibriSpeech" / subset / speaker / "198"
            lines = [f"{speaker}-198-{i:04d} {text}" for i, text in enumerate(("HELLO WORLD", "A B'C"))]
            for i in range(2):
                if (subset, i) != ("test-clean", 1):
                    _wav(chapter / f"{speaker}-198-{i:04d}.flac")
            _wav(chapter / f"{speaker}-198-0007.flac")  # no transcript line
            (chapter / f"{speaker}-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_transcripts_and_subsets(tmp_path):
    root = librispeech(tmp_path / "corpora")
    s = prepare("librispeech", root, tmp_path / "out")
    assert s["options"] == {"subsets": ["train-clean-100", "dev-clean", "test-clean"]}
    assert {k: (v["files"], v["missing"]) for k, v in s["splits"].items()} == {
        "train": (4, 0), "valid": (2, 0), "test": (1, 1)}
    assert s["skipped_reasons"] == {"no transcript line": 4}
    train = read_manifest(tmp_path / "out" / "train.json")
    assert train[0].extra == {"transcript": "HELLO WORLD", "speaker": "19", "chapter": "198",
                              "subset": "train-clean-100"}
    assert train[1].extra["transcript"] == "A B'C" and _labels(tmp_path / "out").mids == ["19", "26", "61", "84"]
    s = prepare("librispeech", root, tmp_path / "960", subsets="train-clean-100,train-other-500")
    assert set(s["splits"]) == {"train"} and s["splits"]["train"]["files"] == 6


# --------------------------------------------------------------------------------- CLI and fine-tuning

TINY = ["--steps", "2", "--batch-size", "4", "--set", "data.target_length=32", "--set", "model.overrides.embed_dim=32",
        "--set", "model.overrides.depth=1", "--set", "model.overrides.num_heads=2", "--set", "model.tstride=0",
        "--set", "model.fstride=0", "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "augment.mixup=0", "--set", "augment.freqm=0", "--set", "augment.timem=0"]


@pytest.mark.parametrize(("corpus", "options", "task", "train", "valid"), [
    ("speechcommands", ["--version", "1", "--classes", "12"], "kws12", "train", "valid"),
    ("esc50", [], "esc", "fold1_train", "fold1_test"),
    ("voxceleb1", [], "sid", "train", "valid"),
    ("audioset", [], "audioset", "balanced", "eval"),
    ("iemocap", [], "er", "fold1_train", "fold1_test"),
])
def test_cli_prepare_then_finetune(corpus, options, task, train, valid, tmp_path, capsys):
    builders = {"speechcommands": speech_commands, "esc50": esc50, "voxceleb1": voxceleb1, "audioset": audioset,
                "iemocap": iemocap}
    root = builders[corpus](tmp_path / corpus)
    out = tmp_path / "prepared"
    assert main(["data", "prepare", corpus, str(root), "--out", str(out), *options]) == 0
    table = capsys.readouterr().out
    assert "split" in table and "missing" in table and f"{train} " in table
    run = tmp_path / "run"
    argv = ["finetune", "--model", "ssast_tiny", "--init", "none", "--task", task,
            "--train", str(out / f"{train}.json"), "--valid", str(out / f"{valid}.json"),
            "--labels", str(out / "labels.csv"), "--out", str(run), *TINY]
    if task in ("esc", "er"):
        argv += ["--set", "data.folds=0"]  # one fold's pair of manifests (all.json + data.folds=5 runs all five)
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == task and 0.0 <= metrics["valid"] <= 1.0


def test_cli_prepare_json(tmp_path, capsys):
    root = esc50(tmp_path / "esc")
    assert main(["data", "prepare", "esc50", str(root), "--out", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == 3 and summary["missing_count"] == 1 and "missing" not in summary
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["missing"][0]["file"] == "audio/5-102-A-2.wav"


def _one_error_line(capsys, *words):
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("ssamba: error:"), err
    for w in words:
        assert w in err, err
    return err


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["data", "prepare", "esc50", str(tmp_path / "nowhere"), "--out", out]) == 2
    _one_error_line(capsys, "nowhere", "not found")

    sc = tmp_path / "sc"
    _wav(sc / "yes" / "0000_nohash_0.wav")
    (sc / "validation_list.txt").write_text("yes/0000_nohash_0.wav\n")
    assert main(["data", "prepare", "speechcommands", str(sc), "--out", out]) == 2
    _one_error_line(capsys, "testing_list.txt", "not found")
    (sc / "testing_list.txt").write_text("yes/0000_nohash_1.wav\nyes 0000_nohash_2.wav\n")
    assert main(["data", "prepare", "speechcommands", str(sc), "--out", out]) == 2
    _one_error_line(capsys, "testing_list.txt:2:")

    vox = voxceleb1(tmp_path / "vox")
    with open(vox / "iden_split.txt", "a") as f:
        f.write("4 id10001/x/00001.wav\n")
    assert main(["data", "prepare", "voxceleb1", str(vox), "--out", out]) == 2
    _one_error_line(capsys, "iden_split.txt:14:")

    aset = audioset(tmp_path / "aset")
    with open(aset / "eval_segments.csv", "a") as f:
        f.write('abcdefghijk, 0.000, 10.000, "/m/unknown"\n')
    assert main(["data", "prepare", "audioset", str(aset), "--out", out]) == 2
    _one_error_line(capsys, "eval_segments.csv:6:", "/m/unknown")

    esc = esc50(tmp_path / "esc")
    with open(esc / "meta" / "esc50.csv", "a") as f:
        f.write("x.wav,one,0,dog,True,1,A\n")
    assert main(["data", "prepare", "esc50", str(esc), "--out", out]) == 2
    _one_error_line(capsys, "esc50.csv:17:")

    ie = iemocap(tmp_path / "ie")
    with open(ie / "Session2" / "dialog" / "EmoEvaluation" / "Ses02F_impro01.txt", "a") as f:
        f.write("[1.0 - 2.0] Ses02F_impro01_F099 neu\n")
    assert main(["data", "prepare", "iemocap", str(ie), "--out", out]) == 2
    _one_error_line(capsys, "Ses02F_impro01.txt:24:")

    assert main(["data", "prepare", "esc50", str(esc), "--out", out, "--version", "1"]) == 2
    _one_error_line(capsys, "esc50", "version")
    assert main(["data", "prepare", "librispeech", str(tmp_path), "--out", out, "--subsets", "train-clean-100"]) == 2
    _one_error_line(capsys, "train-clean-100")
    assert set(PREPARERS) == {"speechcommands", "esc50", "audioset", "voxceleb1", "iemocap", "librispeech"}
    with pytest.raises(PrepareError, match="unknown corpus"):
        prepare("timit", tmp_path, tmp_path / "o")


# ------------------------------------------------------------------------------------------- lhotse


def _recording(rid, path, seconds, rate=16000):
    return {"id": rid, "sources": [{"type": "file", "channels": [0], "source": str(path)}], "sampling_rate": rate,
            "num_samples": int(seconds * rate), "duration": seconds}


def _supervision(rid, seconds, **fields):
    return {"id": rid, "recording_id": rid, "start": 0.0, "duration": seconds, "channel": 0, **fields}


def _cut(rid, path, seconds, sups, start=0.0, duration=None):
    return {"id": f"{rid}-cut", "start": start, "duration": seconds if duration is None else duration, "channel": 0,
            "supervisions": sups, "recording": _recording(rid, path, seconds), "type": "MonoCut"}


def _write_jsonl(path, items):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    return path


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """The same 2-class task as SSAST JSON and as lhotse CutSets (labels in supervision custom["label"])."""
    folder = tmp_path_factory.mktemp("lhotse")
    LabelSet(["low", "high"], ["Low", "High"]).to_csv(folder / "labels.csv")
    for split, n in (("train", 8), ("valid", 4)):
        examples, cuts = [], []
        for i in range(n):
            label = ("low", "high")[i % 2]
            path = _wav(folder / "audio" / f"{split}{i}.wav", seconds=0.4, freq=150 if label == "low" else 3000)
            examples.append(Example(path, (label,)))
            sup = _supervision(f"{split}{i}", 0.4, text="a b", speaker=f"spk{i % 3}", custom={"label": label})
            cuts.append(_cut(f"{split}{i}", path, 0.4, [sup]))
        write_manifest(folder / f"{split}.json", examples)
        _write_jsonl(folder / f"cuts_{split}.jsonl.gz", cuts)
    return folder


def test_lhotse_cutset_reads_like_json(two_classes):
    cuts = read_manifest(two_classes / "cuts_train.jsonl.gz")
    ssast = read_manifest(two_classes / "train.json")
    assert [(e.path.resolve(), e.labels) for e in cuts] == [(e.path.resolve(), e.labels) for e in ssast]
    assert cuts[1].extra == {"id": "train1-cut", "transcript": "a b", "speaker": "spk1"}


def test_lhotse_recording_supervision_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lhotse reads relative paths from the working directory
    _wav(tmp_path / "data" / "u1.wav", seconds=1.0)
    _wav(tmp_path / "data" / "u2.wav", seconds=1.0)
    recs = [_recording("u1", "data/u1.wav", 1.0), _recording("u2", "data/u2.wav", 1.0)]
    sups = [_supervision("u1", 0.5, text="HELLO", speaker="s1"),
            {**_supervision("u1", 0.5, text="WORLD", speaker="s1"), "id": "u1-b", "start": 0.5},
            _supervision("u2", 1.0, text="YES", speaker="s2", custom={"labels": ["/m/a", "/m/b"], "fold": 2})]
    (tmp_path / "m").mkdir()
    _write_jsonl(tmp_path / "m" / "corpus_recordings_train.jsonl", recs)
    _write_jsonl(tmp_path / "m" / "corpus_supervisions_train.jsonl", sups)
    for name in ("corpus_recordings_train.jsonl", "corpus_supervisions_train.jsonl"):
        u1, u2 = read_manifest(tmp_path / "m" / name)
        assert u1.path == tmp_path / "data" / "u1.wav" and u1.labels == ("s1",)  # no custom label: the speaker
        assert u1.extra == {"id": "u1", "transcript": "HELLO WORLD", "speaker": "s1"}
        assert u2.labels == ("/m/a", "/m/b") and u2.extra["fold"] == 2
    alone = tmp_path / "alone_recordings.jsonl"  # a RecordingSet without supervisions: unlabelled audio
    _write_jsonl(alone, recs)
    assert [e.labels for e in read_manifest(alone)] == [(), ()]


def test_lhotse_rejects_what_it_cannot_honour(tmp_path):
    path = _wav(tmp_path / "a.wav", seconds=1.0)
    sup = _supervision("a", 1.0)
    cases = {
        "covers 0.200-1.000 s": _cut("a", path, 1.0, [sup], start=0.2, duration=0.8),
        "is a MixedCut": {**_cut("a", path, 1.0, [sup]), "type": "MixedCut"},
        "source type 'url'": {**_cut("a", path, 1.0, [sup]), "recording": {
            **_recording("a", path, 1.0), "sources": [{"type": "url", "channels": [0], "source": "http://x"}]}},
        "2 channels": {**_cut("a", path, 1.0, [sup]), "recording": {
            **_recording("a", path, 1.0), "sources": [{"type": "file", "channels": [0, 1], "source": str(path)}]}},
    }
    for words, cut in cases.items():
        bad = _write_jsonl(tmp_path / "cuts.jsonl", [_cut("ok", path, 1.0, [sup]), cut])
        with pytest.raises(ManifestError, match=f"cuts.jsonl:2: .*{words}"):
            read_manifest(bad)
    _write_jsonl(tmp_path / "x_supervisions.jsonl", [sup])
    with pytest.raises(ManifestError, match="RecordingSet .*x_recordings.jsonl"):
        read_manifest(tmp_path / "x_supervisions.jsonl")
    _write_jsonl(tmp_path / "y_recordings.jsonl", [_recording("a", path, 1.0)])
    _write_jsonl(tmp_path / "y_supervisions.jsonl", [_supervision("b", 1.0)])
    with pytest.raises(ManifestError, match=r"y_supervisions.jsonl:1: supervision 'b' names recording 'b'"):
        read_manifest(tmp_path / "y_recordings.jsonl")


def test_lhotse_manifest_trains_and_embeds_like_json(two_classes, tmp_path):
    folder = two_classes
    runs = {}
    for kind, train, valid in (("json", "train.json", "valid.json"),
                               ("lhotse", "cuts_train.jsonl.gz", "cuts_valid.jsonl.gz")):
        runs[kind] = tmp_path / kind
        assert main(["finetune", "--model", "ssast_tiny", "--init", "none", "--task", "sounds", "--train",
                     str(folder / train), "--valid", str(folder / valid), "--labels", str(folder / "labels.csv"),
                     "--out", str(runs[kind]), *TINY]) == 0
    metrics = {k: json.loads((run / "metrics.json").read_text()) for k, run in runs.items()}
    assert metrics["lhotse"]["valid"] == pytest.approx(metrics["json"]["valid"])  # same data, same seed
    for kind, manifest in (("json", "valid.json"), ("lhotse", "cuts_valid.jsonl.gz")):
        assert main(["embed", str(folder / manifest), "--model", str(runs["json"]), "--out",
                     str(tmp_path / f"emb_{kind}")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "emb_json.npy"), np.load(tmp_path / "emb_lhotse.npy"))


def test_librispeech_prepare_then_ctc(tmp_path, capsys):
    """LibriSpeech's manifests carry transcripts: Mamba-HuBERT's CTC fine-tuning runs on them as they are."""
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "librispeech", str(librispeech(tmp_path / "corpora")), "--out", str(out)]) == 0
    run = tmp_path / "ctc"
    assert main(["hubert", "finetune", "--train", str(out / "train.json"), "--valid", str(out / "valid.json"),
                 "--test", str(out / "test.json"), "--out", str(run), "--size", "tiny", "--steps", "2",
                 "--batch-size", "2", "--set", "log.progress=false"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test_examples"]
