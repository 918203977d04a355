"""Mamba-HuBERT targets (k-means labels, alignment checks, cluster quality), the resumable pretraining loop,
CTC fine-tuning, the reconstruction probe and the `ssamba hubert` CLI, on a tiny generated corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from ssamba.cli import main
from ssamba.data.text import CharVocab
from ssamba.features import num_frames
from ssamba.models import load_pretrained
from ssamba.models.heads import greedy_decode, load_head
from ssamba.pretrain.kmeans import (
    LabelError,
    MiniBatchKMeans,
    cluster_quality,
    make_labels,
    read_label_file,
    read_labels_for,
)
from ssamba.tasks.ctc import CTCConfig, finetune_ctc
from ssamba.tasks.metrics import edit_distance, error_rates
from ssamba.tasks.reconstruct import ReconstructConfig, reconstruct
from ssamba.train.config import apply_overrides
from ssamba.train.hubert import HuBERTPretrainConfig, pretrain_hubert
from tests.conftest import assert_stopped_by_divergence, one_error_line

WORDS = {"ab": (300, 900), "ba": (900, 300), "aab": (300, 600)}


def _write_corpus(root, name, items):
    (root / "audio").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (text, seconds) in enumerate(items):
        t = np.arange(int(seconds * 16000)) / 16000
        f1, f2 = WORDS[text]
        freq = np.where(t < seconds / 2, f1, f2)
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(i).standard_normal(t.size)
        path = root / "audio" / f"{name}_{i}.wav"
        sf.write(path, wave.astype(np.float32), 16000)
        entries.append({"wav": f"audio/{path.name}", "labels": "", "transcript": text})
    manifest = root / f"{name}.json"
    manifest.write_text(json.dumps({"data": entries}))
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert_corpus")
    train = _write_corpus(root, "train", [("ab", 0.5), ("ba", 0.6), ("aab", 0.55), ("ab", 0.45)])
    valid = _write_corpus(root, "valid", [("ba", 0.5), ("ab", 0.52)])
    labels = root / "labels"
    make_labels(train, [valid], labels, k=6, max_iter=20, seed=0)
    return {"root": root, "train": train, "valid": valid, "labels": labels}


# ------------------------------------------------------------------------------------------------ k-means


def test_minibatch_kmeans_recovers_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(200)
    x = centers[truth] + 0.3 * torch.randn(600, 2, generator=gen)
    km = MiniBatchKMeans(3, batch_size=128, max_iter=50, seed=0).fit(x)
    q = cluster_quality(km.predict(x), truth)
    assert q["cluster_purity"] == 1.0 and q["pnmi"] == pytest.approx(1.0, abs=1e-9)
    assert km.inertia == pytest.approx(2 * 0.3**2, rel=0.25)  # two dims of variance 0.09


def test_cluster_quality_by_hand():
    codes = torch.tensor([0, 0, 1, 1])
    refs = torch.tensor([0, 1, 0, 1])  # independent of the codes
    q = cluster_quality(codes, refs)
    assert q["cluster_purity"] == 0.5 and q["pnmi"] == pytest.approx(0.0, abs=1e-12)
    q = cluster_quality(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1, 1]))  # codes refine the refs
    assert q["cluster_purity"] == 1.0 and q["ref_purity"] == 0.75 and q["pnmi"] == pytest.approx(1.0)


def test_labels_align_with_audio_and_share_one_model(corpus):
    meta = json.loads((corpus["labels"] / "labels.json").read_text())
    assert meta["k"] == 6 and meta["label_rate"] == 100.0 and set(meta["splits"]) == {"train", "valid"}
    for manifest in (corpus["train"], corpus["valid"]):
        labels, _ = read_labels_for(corpus["labels"], manifest)
        for lab, entry in zip(labels, json.loads(manifest.read_text())["data"], strict=True):
            samples = sf.info(str(corpus["root"] / entry["wav"])).frames
            assert lab.numel() == int(num_frames(samples))  # 100 Hz, 25 ms windows
    # the valid labels come from the centroids fitted on train (not a second k-means)
    from safetensors.torch import load_file

    from ssamba.audio import load_audio
    from ssamba.features import mfcc_with_deltas

    km = MiniBatchKMeans(6)
    km.centroids = load_file(str(corpus["labels"] / "kmeans.safetensors"))["centroids"]
    first_valid = json.loads(corpus["valid"].read_text())["data"][0]["wav"]
    codes = km.predict(mfcc_with_deltas(torch.from_numpy(load_audio(corpus["root"] / first_valid))))
    assert torch.equal(codes, read_label_file(corpus["labels"] / "valid.km")[0])


def test_misaligned_label_file_is_an_error(corpus, tmp_path):
    bad = tmp_path / "labels"
    bad.mkdir()
    (bad / "labels.json").write_text((corpus["labels"] / "labels.json").read_text())
    lines = (corpus["labels"] / "train.km").read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-3])  # three frames short
    (bad / "train.km").write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelError, match=r"train.km:2: .* expected"):
        read_labels_for(bad, corpus["train"])
    (bad / "train.km").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(LabelError, match="2 lines for 4 entries"):
        read_labels_for(bad, corpus["train"])


# ------------------------------------------------------------------------------------------------ loops


def _pretrain_cfg(corpus, steps: int) -> HuBERTPretrainConfig:
    cfg = HuBERTPretrainConfig()
    cfg.update({"model": {"encoder": "extbimamba", "size": "tiny"},
                "data": {"train": str(corpus["train"]), "valid": str(corpus["valid"]), "labels": str(corpus["labels"]),
                         "max_samples": 8000},
                "train": {"steps": steps, "batch_size": 2},
                "optim": {"warmup_steps": 2, "lr": 1e-3},
                "log": {"eval_every": 2, "ckpt_every": 2, "progress": False, "log_every": 1}})  # fmt: skip
    return cfg


@pytest.mark.slow
def test_pretrain_resume_is_exact(corpus, tmp_path):
    full = pretrain_hubert(_pretrain_cfg(corpus, 4), tmp_path / "full")
    assert full["valid"]["chance"] == pytest.approx(1 / 6) and 0 <= full["valid"]["acc_m"] <= 1
    assert 0 < full["valid"]["prior_acc_m"] <= 1
    part = pretrain_hubert(_pretrain_cfg(corpus, 2), tmp_path / "part")
    assert part["step"] == 2
    resumed = pretrain_hubert(_pretrain_cfg(corpus, 4), tmp_path / "part", resume=True)
    assert resumed["step"] == 4
    a, b = load_pretrained(full["final"]), load_pretrained(resumed["final"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(FileExistsError):
        pretrain_hubert(_pretrain_cfg(corpus, 4), tmp_path / "full")


def test_config_errors_name_the_key():
    cfg = HuBERTPretrainConfig()
    with pytest.raises(ValueError, match="mask.spn"):
        cfg.update({"mask": {"spn": 3}})
    with pytest.raises(ValueError, match="depht"):
        apply_overrides(cfg, ["model.overrides.depht=2"])


def test_ctc_finetune_and_decoding(corpus, tmp_path):
    cfg = CTCConfig()
    cfg.update({"model": {"encoder": "conbimamba", "size": "tiny"},
                "data": {"train": str(corpus["train"]), "valid": str(corpus["valid"])}, "test": str(corpus["valid"]),
                "head": {"layer": 1, "conformer_layers": 1, "conformer_dim": 16, "conformer_heads": 2},
                "train": {"steps": 3, "batch_size": 2}, "log": {"eval_every": 3, "progress": False}})  # fmt: skip
    result = finetune_ctc(cfg, tmp_path / "ctc")
    metrics = json.loads((tmp_path / "ctc" / "metrics.json").read_text())
    assert metrics["task"] == "ctc" and metrics["vocab"] == ["a", "b"]
    assert math.isfinite(metrics["test"]) and metrics["test"] >= 0 and result["step"] == 3
    # the best head loads from its own folder alone (head.json: its arguments and the encoder's config)
    head = load_head(tmp_path / "ctc" / "best")
    assert head.args["conformer_layers"] == 1 and head.encoder.config.encoder == "conbimamba"
    wave, lengths = torch.randn(1, 4000), torch.tensor([4000])
    with torch.no_grad():
        log_probs, _ = head(wave, lengths)
    assert log_probs.shape[-1] == len(metrics["vocab"]) + 1  # + the CTC blank
    with pytest.raises(ValueError, match="head.json is missing"):
        load_head(tmp_path)


def test_greedy_decode_cer_wer_by_hand():
    vocab = CharVocab.from_transcripts(["ab ba"])
    assert vocab.chars == [" ", "a", "b"] and vocab.encode("AB  ba").tolist() == [2, 3, 1, 3, 2]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("abc")
    # path: a a _ b b _ b  -> "abb"
    ids = torch.tensor([[2, 2, 0, 3, 3, 0, 3, 1]])
    log_probs = torch.nn.functional.one_hot(ids, 4).float().log()
    assert greedy_decode(log_probs, torch.tensor([7])) == [[2, 3, 3]]
    assert vocab.decode([2, 3, 3]) == "abb"
    assert edit_distance("kitten", "sitting") == 3
    r = error_rates(["ab ba", "a"], ["ab b", "a"])
    assert r["cer"] == pytest.approx(1 / 6) and r["wer"] == pytest.approx(1 / 3)


def test_reconstruction_probe(corpus, tmp_path):
    cfg = ReconstructConfig()
    cfg.update({"model": {"encoder": "innbimamba", "size": "tiny"},
                "data": {"train": str(corpus["train"]), "valid": str(corpus["valid"])},
                "recon": {"noise_snr_db": 10.0, "num_mel_bins": 40}, "head": {"layer": 2},
                "finetune": {"freeze_encoder": False},
                "train": {"steps": 2, "batch_size": 2}, "log": {"eval_every": 2, "progress": False}})  # fmt: skip
    reconstruct(cfg, tmp_path / "rec")
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert metrics["task"] == "denoise" and metrics["valid"]["mse"] > 0
    assert metrics["valid"]["r2"] == pytest.approx(1 - metrics["valid"]["mse"] / metrics["valid"]["baseline_mse"])


def test_cli_labels_and_bad_key(corpus, tmp_path, capsys):
    assert main(["hubert", "labels", "--train", str(corpus["train"]), "--out", str(tmp_path / "l"), "--k", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["utterances"] == 4
    code = main(["hubert", "pretrain", "--train", str(corpus["train"]), "--labels", str(tmp_path / "l"),
                 "--out", str(tmp_path / "run"), "--size", "tiny", "--set", "optim.lrr=1"])
    assert code == 2 and "optim.lrr" in capsys.readouterr().err


def test_iteration2_labels_from_a_layer_at_50hz(corpus, tmp_path):
    from ssamba.models.hubert import create_hubert

    torch.manual_seed(0)
    create_hubert("innbimamba", "tiny").save_pretrained(tmp_path / "model")
    meta = make_labels(corpus["train"], [corpus["valid"]], tmp_path / "it2", k=3, model_dir=str(tmp_path / "model"),
                       layer=2, max_iter=10)
    assert meta["label_rate"] == 50.0 and meta["source"] == "layer"
    labels, _ = read_labels_for(tmp_path / "it2", corpus["valid"])  # checks 50 Hz CNN frame counts
    samples = sf.info(str(corpus["root"] / json.loads(corpus["valid"].read_text())["data"][0]["wav"])).frames
    assert labels[0].numel() == (samples - 400) // 320 + 1
    with pytest.raises(ValueError, match="--layer must be in 1..2"):
        make_labels(corpus["train"], [], tmp_path / "x", k=3, model_dir=str(tmp_path / "model"), layer=5)


def test_ctc_over_phonemes(corpus, tmp_path):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    cfg = CTCConfig()
    cfg.update({"model": {"encoder": "transformer", "size": "tiny"},
                "data": {"train": str(corpus["train"]), "valid": str(corpus["valid"])}, "head": {"units": "phonemes"},
                "train": {"steps": 1, "batch_size": 2}, "log": {"eval_every": 1, "progress": False}})  # fmt: skip
    finetune_ctc(cfg, tmp_path / "ctc")
    metrics = json.loads((tmp_path / "ctc" / "metrics.json").read_text())
    assert metrics["metric"] == "per" and "a" not in metrics["vocab"] and len(metrics["vocab"]) >= 2


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes(corpus, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ssamba",
               "hubert", "pretrain", "--train", str(corpus["train"]), "--valid", str(corpus["valid"]),
               "--labels", str(corpus["labels"]), "--out", str(tmp_path / "ddp"), "--size", "tiny", "--steps", "2",
               "--batch-size", "2", "--set", "log.progress=false", "--set", "data.max_samples=8000"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()] == ["step_00000002"]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "reconstruct"])
def test_divergence_stops_with_exit_2_keeping_the_last_good_checkpoint(corpus, tmp_path, capsys, command):
    # lr 1e30: the first update throws the weights to ~1e30 (still finite), the next forward overflows to NaN / inf
    run = tmp_path / command
    extra = ["--labels", str(corpus["labels"])] if command == "pretrain" else ["--test", str(corpus["valid"])]
    args = ["hubert", command, "--train", str(corpus["train"]), "--valid", str(corpus["valid"]), "--out", str(run),
            "--size", "tiny", "--steps", "6", "--batch-size", "2", *extra, "--set", "optim.lr=1e30",
            "--set", "optim.warmup_steps=1", "--set", "train.max_bad_steps=2", "--set", "log.progress=false",
            "--set", "log.ckpt_every=1", "--set", "log.log_every=1", "--set", "log.eval_every=100"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    tensors, state = assert_stopped_by_divergence(run, capsys.readouterr().err)
    weights = {k: v for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point()}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert (state["bad_in_row"], state["skipped_steps"]) == (0, 0)  # the last good step, before any skip
    assert not (run / "final").exists() and not (run / "metrics.json").exists()


def test_an_empty_wav_in_any_split_stops_before_labels_or_training(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)  # a valid WAV header, 0 samples
    entries = [{**e, "wav": str(corpus["root"] / e["wav"])} for e in json.loads(corpus["valid"].read_text())["data"]]
    test = tmp_path / "test_with_empty.json"
    test.write_text(json.dumps({"data": [*entries, {"wav": "empty.wav", "transcript": "ab"}]}))
    run = tmp_path / "ctc"
    args = ["hubert", "finetune", "--train", str(corpus["train"]), "--valid", str(corpus["valid"]), "--test",
            str(test), "--out", str(run), "--size", "tiny", "--steps", "1", "--batch-size", "2",
            "--set", "log.progress=false"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"test split ({test}, 1 of 3): {empty}: empty audio (0 samples)" in err
    assert not run.exists()
    assert main(["hubert", "labels", "--train", str(corpus["train"]), "--apply", str(test), "--out",
                 str(tmp_path / "labels"), "--k", "3"]) == 2  # fmt: skip
    err = one_error_line(capsys.readouterr().err)
    assert "test_with_empty split" in err and str(empty) in err
    assert not (tmp_path / "labels" / "kmeans.safetensors").exists()
    assert main([*args, "--set", "data.skip_bad=true"]) == 0
    assert "data check: train 0 of 4 unusable, valid 0 of 2 unusable, test 1 of 3 unusable (left out)" in (
        capsys.readouterr().out)


def test_skip_bad_with_a_micro_batch_of_only_bad_files(corpus, tmp_path):
    """Batch size 1 over a train split holding an empty WAV: that micro-batch has no item left; the step still
    runs (the previous micro-batch again with weight 0), so the run finishes instead of failing on a (0,) batch."""
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    entries = [{**e, "wav": str(corpus["root"] / e["wav"])} for e in json.loads(corpus["train"].read_text())["data"]]
    train = tmp_path / "train_with_empty.json"
    train.write_text(json.dumps({"data": [*entries, {"wav": str(empty), "transcript": "ab"}]}))
    run = tmp_path / "ctc"
    assert main(["hubert", "finetune", "--train", str(train), "--valid", str(corpus["valid"]), "--out", str(run),
                 "--size", "tiny", "--steps", str(2 * (len(entries) + 1)), "--batch-size", "1",
                 "--set", "data.skip_bad=true", "--set", "log.progress=false", "--set", "log.eval_every=100"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == 2 * (len(entries) + 1)
