import json

import numpy as np
import pytest
import soundfile
import torch

from ssamba import features
from ssamba.audio import AudioError, load_audio, save_audio
from ssamba.data import AudioDataset, Example, LabelSet, ManifestError, dataset_stats, read_manifest, write_manifest
from ssamba.data.check import UnusableFilesError, check_splits, header_problem
from tests.test_audio import _bad


def _clip(path, seconds, freq, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    save_audio(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


@pytest.fixture
def corpus(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    examples = [
        Example(_clip(audio / "a.wav", 0.5, 300), ("/m/dog",), {"speaker": "s1"}),
        Example(_clip(audio / "b.wav", 0.8, 900), ("/m/cat", "/m/dog")),
        Example(_clip(audio / "c.wav", 0.3, 2000), ("/m/cat",)),
    ]
    labels = LabelSet(["/m/cat", "/m/dog"], ["Cat", "Dog"])
    labels.to_csv(tmp_path / "labels.csv")
    write_manifest(tmp_path / "manifests" / "train.json", examples)
    return tmp_path, examples, labels


def test_ssast_json_round_trip_with_relative_paths(corpus):
    root, examples, _ = corpus
    doc = json.loads((root / "manifests" / "train.json").read_text())
    assert doc["data"][0] == {"wav": "../audio/a.wav", "labels": "/m/dog", "speaker": "s1"}
    back = read_manifest(root / "manifests" / "train.json")
    assert [e.path.resolve() for e in back] == [e.path.resolve() for e in examples]
    assert [e.labels for e in back] == [e.labels for e in examples] and back[0].extra == {"speaker": "s1"}


def test_jsonl_and_folder_per_class(corpus, tmp_path):
    root, examples, _ = corpus
    write_manifest(root / "train.jsonl", examples)
    assert [e.labels for e in read_manifest(root / "train.jsonl")] == [e.labels for e in examples]
    for name in ("yes", "no"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        _clip(tmp_path / "folders" / name / f"{name}1.wav", 0.3, 500)
    folder = read_manifest(tmp_path / "folders")
    assert [(e.path.name, e.labels) for e in folder] == [("no1.wav", ("no",)), ("yes1.wav", ("yes",))]
    assert LabelSet.from_examples(folder).mids == ["no", "yes"]


def test_label_csv_round_trip_and_encoding(corpus):
    root, _, labels = corpus
    back = LabelSet.from_csv(root / "labels.csv")
    assert back == labels
    assert back.encode(["/m/dog"]).tolist() == [0.0, 1.0]
    assert back.encode(["/m/dog", "/m/cat"]).tolist() == [1.0, 1.0]
    with pytest.raises(ManifestError, match="/m/cow"):
        back.encode(["/m/cow"])


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON"),
    ('{"rows": []}', "SSAST manifest"),
    ('{"data": []}', "no entries"),
    ('{"data": [{"labels": "x"}]}', "entry 0.*wav"),
    ('{"data": [{"wav": "a.wav", "labels": 3}]}', "labels"),
])
def test_bad_manifests_name_the_culprit(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(path)
    assert "m.json" in str(info.value)


def test_bad_label_csv_and_missing_manifest(tmp_path):
    (tmp_path / "l.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match="index,mid,display_name"):
        LabelSet.from_csv(tmp_path / "l.csv")
    (tmp_path / "gap.csv").write_text("index,mid,display_name\n0,a,A\n2,b,B\n")
    with pytest.raises(ManifestError, match="without gaps"):
        LabelSet.from_csv(tmp_path / "gap.csv")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.json")


def test_unknown_label_in_manifest_is_reported(corpus):
    root, examples, _ = corpus
    with pytest.raises(ManifestError, match=r"entry 0 \(a.wav\).*'/m/dog'"):
        AudioDataset(examples, LabelSet(["/m/cat"]))


def test_fbank_dataset_items_and_collate(corpus):
    root, examples, labels = corpus
    ds = AudioDataset(root / "manifests" / "train.json", labels, target_length=64)
    item = ds[1]
    assert item["features"].shape == (64, 128) and item["length"] == 64  # 0.8 s = 78 frames, cut to 64
    assert item["labels"].tolist() == [1.0, 1.0]
    short = ds[2]  # 0.3 s = 28 frames, padded
    assert short["length"] == 28 and torch.allclose(short["features"][28:], torch.tensor(ds.pad_value))
    expected = features.normalize(features.official_fbank(torch.from_numpy(
        __import__("ssamba").load_audio(examples[2].path)), 64), ds.mean, ds.std)
    assert torch.equal(short["features"], expected)
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert batch["features"].shape == (3, 64, 128) and batch["lengths"].tolist() == [48, 64, 28]
    assert batch["labels"].shape == (3, 2) and batch["skipped"] == 0


def test_variable_length_collate_pads_with_normalised_zero(corpus):
    root, examples, labels = corpus
    ds = AudioDataset(examples, labels)
    batch = ds.collate([ds[0], ds[2]])
    assert batch["features"].shape == (2, 48, 128) and batch["lengths"].tolist() == [48, 28]
    assert torch.allclose(batch["features"][1, 28:], torch.tensor(0.4670324))


def test_waveform_dataset(corpus):
    _, examples, _ = corpus
    ds = AudioDataset(examples, kind="waveform")
    batch = ds.collate([ds[0], ds[1]])
    assert batch["features"].shape == (2, 12800) and batch["lengths"].tolist() == [8000, 12800]
    assert batch["features"][0, 8000:].abs().max() == 0 and "labels" not in batch


def test_bad_file_raises_by_default_and_is_skipped_and_counted_on_request(corpus):
    root, examples, labels = corpus
    bad = root / "audio" / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    examples = [*examples, Example(bad, ("/m/cat",))]
    with pytest.raises(AudioError, match="bad.wav"):
        AudioDataset(examples, labels)[3]
    ds = AudioDataset(examples, labels, skip_bad=True)
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["skipped"] == 1 and batch["indices"].tolist() == [0, 1, 2]
    assert list(ds.skipped) == [3] and "bad.wav" in ds.skipped[3]


def test_dataset_stats(corpus):
    _, examples, _ = corpus
    stats = dataset_stats(examples)
    cells = torch.cat([features.official_fbank(torch.from_numpy(__import__("ssamba").load_audio(e.path)))
                       for e in examples]).double()
    assert stats["files"] == 3 and stats["frames"] == cells.shape[0]
    assert stats["mean"] == pytest.approx(cells.mean().item(), rel=1e-9)
    assert stats["std"] == pytest.approx(cells.std(unbiased=False).item(), rel=1e-6)
    padded = dataset_stats(examples, target_length=100)
    assert padded["frames"] == 300 and padded["mean"] > stats["mean"]  # the padding zeros count


@pytest.mark.parametrize("kind", ["missing", "unreadable", "empty", "truncated", "header_only", "too_short",
                                  "directory", "nan"])
def test_header_check_mirrors_load_audio(tmp_path, kind):
    path = _bad(tmp_path, kind)
    reason = header_problem(path)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    if kind == "nan":  # only decoding shows the samples: left to the loader, which names the file
        assert reason is None
    else:
        assert str(info.value) == f"{path}: {reason}"
    assert header_problem(tmp_path / "good.wav") is None  # written by _bad
    rate = tmp_path / "8k.wav"  # any rate is resampled by the loader: length judged at 16 kHz
    save_audio(rate, np.zeros(199, np.float32), 8000)
    assert header_problem(rate).startswith("too short (398 samples at 16000 Hz")


def test_check_splits_one_line_per_run_counts_per_split_and_a_cache_per_manifest(corpus, monkeypatch):
    root, examples, _ = corpus
    empty = root / "audio" / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    train, test = root / "manifests" / "train.json", root / "manifests" / "test.json"
    write_manifest(test, [*examples, Example(empty, ("/m/cat",))])
    with pytest.raises(UnusableFilesError, match=rf"1 unusable audio file in test split \({test}, 1 of 4\): "
                                                 rf"{empty}: empty audio \(0 samples\); fix or remove them, or set "
                                                 r"data.skip_bad=true to leave them out$") as info:  # fmt: skip
        check_splits({"train": train, "test": test}, skip_bad=False)
    assert "\n" not in str(info.value) and isinstance(info.value, ManifestError)
    lines = []
    assert check_splits({"train": train, "valid": "", "test": test}, skip_bad=True, log=lines.append) == {
        "train": 0, "test": 1}
    assert lines == ["data check: train 0 of 3 unusable, test 1 of 4 unusable (left out)"]
    # checked once per manifest (path, mtime, size): no header is read again until the manifest changes
    calls = []
    info_fn = soundfile.info
    monkeypatch.setattr(soundfile, "info", lambda path: calls.append(path) or info_fn(path))
    assert check_splits({"test": test}, skip_bad=True, log=None) == {"test": 1} and calls == []
    write_manifest(test, examples)  # repaired
    assert check_splits({"test": test}, skip_bad=False) == {"test": 0} and len(calls) == 3
    # many bad files: the first five are named, the rest counted; lists of examples are checked too
    missing = [Example(root / f"gone{i}.wav") for i in range(7)]
    with pytest.raises(UnusableFilesError, match=r"7 unusable audio files in input split \(7 of 7\): .*gone4.wav: "
                                                 r"file not found; and 2 more; fix or remove them$"):  # fmt: skip
        check_splits({"input": missing}, skip_bad=False, hint=None)


def test_augment_batch_is_seeded_and_off_by_default():
    from ssamba.data.augment import augment_batch

    x, lengths, y = torch.randn(4, 50, 8), torch.tensor([50, 40, 30, 20]), torch.eye(4)
    same = augment_batch(x, lengths, y, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(same, (x, lengths, y), strict=True))  # nothing asked: unchanged
    kw = {"freqm": 4, "timem": 10, "mixup": 0.5, "noise": True, "pad_value": -1.0}
    one = augment_batch(x, lengths, y, torch.Generator().manual_seed(1), **kw)
    two = augment_batch(x, lengths, y, torch.Generator().manual_seed(1), **kw)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))  # the generator decides everything
    assert not torch.equal(one[0], x) and torch.allclose(one[2].sum(1), torch.ones(4))  # mixed labels sum to 1
