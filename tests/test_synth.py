"""The offline demo corpus: layout, labels, speaker-independent splits, determinism, fair sound classes."""

import hashlib
import shutil
import struct

import numpy as np
import pytest
import soundfile

from ssamba.data import synth
from ssamba.data.manifest import LabelSet, read_manifest
from ssamba.data.synth import SPLITS, TASKS, SynthError, synthesize

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (`apt-get install -y espeak-ng`); the corpus's speech is rendered with it",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (`apt-get install -y espeak-ng`)")
    out = tmp_path_factory.mktemp("corpus")
    return out, synthesize(out, seed=0, scale="tiny", jobs=2, progress=False)


def _manifests(out):
    return {
        (task, split): read_manifest(out / "manifests" / f"{task}_{split}.json") for task in TASKS for split in SPLITS
    }


def _digests(out):
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@needs_espeak
def test_manifests_point_at_16k_mono_pcm_files_with_known_labels(corpus):
    out, summary = corpus
    manifests = _manifests(out)
    for (task, split), examples in manifests.items():
        assert summary["counts"][task][split] == len(examples) > 0
        for ex in examples:
            info = soundfile.info(str(ex.path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), ex.path
            if task in ("kws", "speaker"):
                assert info.frames == 16000  # Speech Commands style: 1.0 s clips
            if task == "sounds":
                assert 1.0 <= info.duration <= 5.0
            if task != "sounds":
                assert ex.extra["speaker"].startswith("spk")
    for task in ("kws", "speaker", "sounds"):
        labels = LabelSet.from_csv(out / "manifests" / f"{task}_labels.csv")
        assert len(labels) == summary["classes"][task]
        for split in SPLITS:
            labels.check(manifests[task, split])
            assert all(len(ex.labels) == 1 for ex in manifests[task, split])
    for split in SPLITS:
        for ex in manifests["sentences", split]:
            text = ex.extra["transcript"]
            assert ex.labels == () and text == text.lower() and len(text.split()) >= 4
    assert summary["files"] == len({ex.path for exs in manifests.values() for ex in exs})


@needs_espeak
def test_speech_splits_are_speaker_independent_and_speaker_id_splits_share_speakers(corpus):
    out, summary = corpus
    manifests = _manifests(out)
    for task in ("kws", "sentences"):
        speakers = [{ex.extra["speaker"] for ex in manifests[task, split]} for split in SPLITS]
        assert all(speakers)
        assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2]), task
    every = {f"spk{k:02d}" for k in range(summary["speakers"])}
    for split in SPLITS:
        assert {ex.labels[0] for ex in manifests["speaker", split]} == every
        assert all(ex.labels[0] == ex.extra["speaker"] for ex in manifests["speaker", split])
    # speaker ID splits by utterance: no clip is in two splits
    paths = [{ex.path for ex in manifests["speaker", split]} for split in SPLITS]
    assert sum(map(len, paths)) == len(set().union(*paths))


@needs_espeak
def test_same_seed_same_bytes_whatever_the_workers_and_another_seed_differs(corpus, tmp_path):
    out, _ = corpus
    again = synthesize(tmp_path / "again", seed=0, scale="tiny", jobs=1, progress=False)
    assert _digests(out) == _digests(tmp_path / "again")
    assert again["files"] == corpus[1]["files"]

    synthesize(tmp_path / "other", seed=1, scale="tiny", jobs=1, progress=False)
    first, other = _digests(out), _digests(tmp_path / "other")
    audio = [p for p in first if p.startswith("audio/") and p in other]
    assert audio and not [p for p in audio if first[p] == other[p]]


def _features(x):
    """Content: mean log energy in 16 log-spaced bands (level removed) and the spread of frame energy."""
    frames = x[: len(x) // 512 * 512].reshape(-1, 512) * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, 257)
    f = np.fft.rfftfreq(512, 1 / 16000)
    edges = np.geomspace(50, 8000, 17)
    in_band = [(f >= lo) & (f < hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    bands = np.log(np.stack([power[:, band].sum(1) for band in in_band], 1) + 1e-12)  # (frames, 16)
    frame_energy = np.log(power.sum(1) + 1e-12)
    return np.concatenate([bands.mean(0) - bands.mean(), [frame_energy.std()]])


def _nearest_centroid_accuracy(features, labels, train):
    z = (features - features.mean(0)) / features.std(0)
    classes = np.unique(labels)
    centroids = np.stack([z[train & (labels == c)].mean(0) for c in classes])
    predicted = classes[np.argmin(((z[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    return (predicted == labels[~train]).mean()


def test_sound_classes_differ_by_content_not_by_loudness_or_duration():
    per_class = 12
    level, content, labels = [], [], []
    for c, name in enumerate(synth.SOUND_CLASSES):
        for i in range(per_class):
            x = synth._sound_clip(np.random.default_rng([123, c, i]), name)
            level.append([20 * np.log10(np.sqrt(np.mean(x**2))), len(x) / 16000])
            content.append(_features(x))
            labels.append(c)
            assert np.abs(x).max() < 0.99  # the clipping guard (which would tie level to class) is not used
    labels = np.array(labels)
    train = np.arange(len(labels)) % 2 == 0
    chance = 1 / len(synth.SOUND_CLASSES)
    assert _nearest_centroid_accuracy(np.array(level), labels, train) < 2.5 * chance
    assert _nearest_centroid_accuracy(np.array(content), labels, train) > 0.6


def test_espeak_wav_with_placeholder_sizes_is_read_from_the_bytes_present():
    samples = np.array([0, 1000, -1000, 32767, -32768], dtype="<i2")
    placeholder = 0x7FFFF000  # what espeak-ng writes when it cannot seek back (a pipe)
    header = b"RIFF" + struct.pack("<I", placeholder) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 22050, 44100, 2, 16)
    header += b"data" + struct.pack("<I", placeholder)
    rate, pcm = synth._parse_wav(header + samples.tobytes() + b"\x00")  # odd trailing byte: ignored
    assert rate == 22050 and np.array_equal(pcm, samples)
    with pytest.raises(SynthError, match="WAV"):
        synth._parse_wav(b"not a wav file")


def test_missing_espeak_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng on PATH
    with pytest.raises(SynthError, match="apt-get install -y espeak-ng"):
        synthesize(tmp_path / "corpus", scale="tiny", progress=False)
    assert not (tmp_path / "corpus").exists()


def test_unknown_scale_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="small, medium"):
        synthesize(tmp_path, scale="huge")
