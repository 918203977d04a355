"""The training engine under every task (ssamba.train.engine), parametrised over the tasks, so a new task gets these
checks by adding one entry to TASKS: a run resumed from a mid-run checkpoint reproduces the uninterrupted run
exactly; bf16 autocast trains with finite losses; (slow) 2 torchrun processes == 1 process with gradient
accumulation for the HuBERT family. (Pretraining's and fine-tuning's torchrun runs are in test_ddp; the SIGKILL and
divergence runs in test_resume, test_pretrain, test_finetune and test_hubert_train.)"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ssamba.pretrain.kmeans import make_labels
from ssamba.tasks.ctc import CTCConfig, finetune_ctc
from ssamba.tasks.finetune import finetune
from ssamba.tasks.reconstruct import ReconstructConfig, reconstruct
from ssamba.train.config import apply_overrides, recipe
from ssamba.train.hubert import HuBERTPretrainConfig, pretrain_hubert
from ssamba.train.loop import pretrain
from tests.test_finetune import make_task, tiny_cfg
from tests.test_hubert_train import _write_corpus
from tests.test_pretrain import TINY, make_corpus, read_metrics

LOG = {"log_every": 1, "eval_every": 2, "ckpt_every": 2, "keep_last": 3, "progress": False, "tensorboard": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    (root / "sounds").mkdir()
    (root / "speech").mkdir()
    train = _write_corpus(root / "speech", "train", [("ab", 0.5), ("ba", 0.6), ("aab", 0.55), ("ab", 0.45)])
    valid = _write_corpus(root / "speech", "valid", [("ba", 0.5), ("ab", 0.52)])
    make_labels(train, [valid], root / "speech" / "labels", k=6, max_iter=20, seed=0, progress=False)
    return {"pretrain": make_corpus(root, items=12), "task": make_task(root / "sounds", per_class=4),
            "speech": (train, valid, root / "speech" / "labels")}


def _pretrain(data, steps):
    cfg = recipe("ssamba_tiny")
    apply_overrides(cfg, [a for a in TINY if a != "--set"])
    cfg.data.train = cfg.data.valid = str(data["pretrain"])
    cfg.train.steps, cfg.train.batch_size = steps, 4
    cfg.update({"log": LOG})
    return cfg, pretrain


def _finetune(data, steps):
    train, valid, labels = data["task"]
    cfg = tiny_cfg(train, valid, labels, "ssast_tiny", steps=steps, log=LOG,
                   augment={"mixup": 0.5, "freqm": 8, "timem": 8, "noise": True})  # fmt: skip
    cfg.train.batch_size = 4
    return cfg, lambda c, run, resume=False: finetune(c, run, resume, log=lambda m: None)


def _hubert(cls, data, steps, **sections):
    train, valid, labels = data["speech"]
    cfg = cls()
    cfg.update({"model": {"encoder": "extbimamba", "size": "tiny"},
                "data": {"train": str(train), "valid": str(valid), "max_samples": 8000},
                "train": {"steps": steps, "batch_size": 2}, "log": LOG, **sections})  # fmt: skip
    if cls is HuBERTPretrainConfig:
        cfg.data.labels = str(labels)
    return cfg


TASKS = {
    "pretrain": _pretrain,
    "finetune": _finetune,
    "hubert": lambda data, steps: (_hubert(HuBERTPretrainConfig, data, steps, optim={"warmup_steps": 2}),
                                   pretrain_hubert),
    "ctc": lambda data, steps: (_hubert(CTCConfig, data, steps, head={"conformer_layers": 1, "conformer_dim": 16,
                                                                      "conformer_heads": 2}), finetune_ctc),
    "reconstruct": lambda data, steps: (_hubert(ReconstructConfig, data, steps, recon={"noise_snr_db": 10.0},
                                                finetune={"freeze_encoder": False}), reconstruct),
}


def _train_log(run):
    return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in read_metrics(run) if "split" not in m]


@pytest.mark.parametrize("task", TASKS)
def test_resume_from_a_mid_run_checkpoint_is_exact(task, data, tmp_path):
    cfg, run_task = TASKS[task](data, 4)
    run_task(cfg, tmp_path / "full")
    # the same run, stopped after its step-2 checkpoint: everything later removed, then resumed
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000002", tmp_path / "part" / "checkpoints" / "s2")
    (tmp_path / "part" / "checkpoints" / "s2").rename(tmp_path / "part" / "checkpoints" / "step_00000002")
    (tmp_path / "part" / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 2))  # fmt: skip
    cfg, run_task = TASKS[task](data, 4)
    run_task(cfg, tmp_path / "part", resume=True)
    assert _train_log(tmp_path / "part") == _train_log(tmp_path / "full") and len(_train_log(tmp_path / "full")) == 4
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000004" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step_00000004" / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("task", TASKS)
def test_bf16_autocast_trains(task, data, tmp_path):
    cfg, run_task = TASKS[task](data, 2)
    cfg.train.precision = "bf16"
    result = run_task(cfg, tmp_path / "run")
    losses = [m["loss"] for m in _train_log(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and result["skipped_steps"] == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["config"]["train"]["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pretrain", "finetune", "reconstruct"])
def test_hubert_family_two_processes_match_one_with_accumulation(command, data, tmp_path):
    """`ssamba hubert ...` under torchrun: 2 processes == 1 process with grad_accum 2 (the same global batches,
    the same per-micro-batch masks and noise; no crop and no dropout, whose draws are per process)."""
    import subprocess
    import sys

    from tests.test_resume import _env

    train, valid, labels = data["speech"]
    extra = ["--labels", str(labels)] if command == "pretrain" else ["--set", "head.dropout=0.0"]
    args = ["-m", "ssamba", "hubert", command, "--train", str(train), "--valid", str(valid), "--size", "tiny",
            "--steps", "3", "--batch-size", "2", *extra, "--set", "data.max_samples=16000",
            "--set", "log.progress=false", "--set", "log.log_every=1", "--set", "log.eval_every=3"]  # fmt: skip
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one"), "--set", "train.grad_accum=2"],
                         env=_env(), capture_output=True)  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--out", str(tmp_path / "two")], env=_env(), capture_output=True)  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in {"loss", "loss_m", "acc_m", "mse", "cer", "ctc"} & set(x):
            assert x[key] == pytest.approx(y[key], abs=2e-6, rel=1e-5), (command, x["step"], key)
