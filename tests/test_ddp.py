"""Two CPU processes under torchrun (gloo) give the same losses as one process with the same global batch."""

import subprocess
import sys

import pytest

from tests.test_pretrain import TINY, make_corpus, read_metrics
from tests.test_resume import _env


def test_two_processes_match_one(tmp_path):
    manifest = make_corpus(tmp_path, items=8)
    args = ["pretrain", "--model", "ssast_tiny", "--train", str(manifest), "--valid", str(manifest), "--steps", "4",
            "--batch-size", "4", *TINY, "--set", "model.overrides.num_heads=2", "--set", "log.eval_every=2",
            "--set", "log.ckpt_every=2"]  # fmt: skip
    one = [sys.executable, "-m", "ssamba", *args, "--out", str(tmp_path / "one")]
    subprocess.run(one, env=_env(), check=True, capture_output=True)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ssamba", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(two, env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in {"loss", "nce", "mse", "acc"} & set(x):
            assert x[key] == pytest.approx(y[key], abs=2e-6, rel=1e-6), (x["step"], key)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
