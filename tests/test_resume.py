"""A run killed with SIGKILL and resumed reproduces the uninterrupted run's losses bit for bit; SIGTERM saves."""

import os
import signal
import subprocess
import sys
import time

from tests.test_pretrain import TINY, make_corpus, read_metrics


def _command(manifest, run, steps):
    return [sys.executable, "-m", "ssamba", "pretrain", "--model", "ssamba_tiny", "--train", str(manifest),
            "--out", str(run), "--steps", str(steps), "--batch-size", "4", *TINY,
            "--set", "data.num_workers=1", "--set", "log.ckpt_every=3", "--set", "log.keep_last=2"]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _start_and_wait_for_checkpoint(command, run, sig):
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints").is_dir() or not any(p.name.startswith("step_")
                                                          for p in (run / "checkpoints").iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _losses(run):
    # everything but the wall-clock throughput must match exactly
    return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in read_metrics(run)]


def test_sigkill_then_resume_is_exact(tmp_path):
    manifest = make_corpus(tmp_path, items=12)  # 3 batches per epoch: the run crosses epochs
    steps = 14
    subprocess.run(_command(manifest, tmp_path / "full", steps), env=_env(), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = _start_and_wait_for_checkpoint(_command(manifest, run, steps), run, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    saved = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved < steps
    subprocess.run([*_command(manifest, run, steps), "--resume"], env=_env(), check=True, capture_output=True)
    full, resumed = _losses(tmp_path / "full"), _losses(run)
    assert resumed == full
    assert len([m for m in full if m["step"] > saved]) >= 1


def test_sigterm_saves_a_checkpoint(tmp_path):
    manifest = make_corpus(tmp_path, items=8)
    run = tmp_path / "run"
    command = [*_command(manifest, run, 1000), "--set", "log.ckpt_every=1000"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert b"--resume" in out
    assert any(p.name.startswith("step_") for p in (run / "checkpoints").iterdir())
