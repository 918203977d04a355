"""`ssamba pretrain`: config handling, objective options, a short run end to end, non-finite losses."""

import json
import math
import time

import numpy as np
import pytest
import soundfile
import torch

from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.data.manifest import Example, read_manifest, write_manifest
from ssamba.models import create_model
from ssamba.pretrain import MaskedPatchPretraining
from ssamba.train.config import PretrainConfig, apply_overrides, load_config, recipe
from ssamba.train.loop import NonFiniteLossError, pretrain
from tests.conftest import assert_stopped_by_divergence, one_error_line

TINY = ["--set", "model.overrides.embed_dim=32", "--set", "model.overrides.depth=2", "--set", "data.target_length=48",
        "--set", "data.num_workers=0", "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "optim.warmup_steps=2", "--set", "optim.warmup_every=1", "--set", "optim.lr=1e-3"]  # fmt: skip


def make_corpus(folder, items=16, seconds=0.5):
    """Sines with noise, a few frequencies; returns the manifest path."""
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    examples = []
    for i in range(items):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * (i % 5)) * t) + 0.05 * rng.standard_normal(t.shape)
        path = folder / f"clip{i}.wav"
        save_audio(path, wave.astype(np.float32))
        examples.append(Example(path=path))
    write_manifest(folder / "train.json", examples)
    return folder / "train.json"


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_config_errors_and_overrides(tmp_path):
    cfg = recipe("ssast_tiny")
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.train.batch_size) == ("adam", 5e-7, 24)
    assert recipe("ssamba_tiny").optim.betas == (0.95, 0.999)
    apply_overrides(cfg, ["optim.lr=3e-4", "model.overrides.depth=2", "optim.betas=[0.9, 0.99]",
                          "model.name=ssast_small"])
    assert cfg.optim.lr == 3e-4 and cfg.model.overrides == {"depth": 2} and cfg.optim.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown model 'x'"):
        apply_overrides(cfg, ["model.name=x"])
    with pytest.raises(ValueError, match="sectionx"):
        cfg.update({"sectionx": {}})
    (tmp_path / "c.toml").write_text("[train]\nsteps = 7\n[mask]\nkind = 'cluster'\n")
    cfg = PretrainConfig()
    cfg.update(load_config(tmp_path / "c.toml"))
    assert cfg.train.steps == 7
    # the same config in YAML; malformed files and non-mapping documents are errors naming the file
    (tmp_path / "c.yaml").write_text("train:\n  steps: 7\nmask:\n  kind: cluster\n")
    assert load_config(tmp_path / "c.yaml") == load_config(tmp_path / "c.toml")
    (tmp_path / "broken.yaml").write_text("train: [steps\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yml.*mapping"):
        load_config(tmp_path / "list.yml")
    (tmp_path / "bad.toml").write_text("[train]\nstepz = 7\n")
    assert main(["pretrain", "--model", "ssamba_tiny", "--train", "x.json", "--out", str(tmp_path / "r"),
                 "--config", str(tmp_path / "bad.toml")]) == 2  # fmt: skip


def test_objective_options():
    torch.manual_seed(0)
    encoder = create_model("ssast_tiny", embed_dim=32, num_heads=2, depth=1, input_tdim=48)
    x, mask = torch.randn(2, 48, 128), torch.stack([torch.randperm(23)[:6] + 1 for _ in range(2)])
    official = MaskedPatchPretraining(encoder).eval()
    paper = MaskedPatchPretraining(encoder, nce_orientation="paper").eval()
    paper.load_state_dict(official.state_dict())
    with torch.no_grad():
        a, b = official.mpc(x, mask), paper.mpc(x, mask)
        target = official.encoder.patch_targets(x).gather(1, mask[..., None].expand(-1, -1, 256))  # (B, M, P)
        total = torch.bmm(target, a.pred.transpose(1, 2))  # rows: true patches, columns: predictions
        want = -torch.diagonal(torch.log_softmax(total, dim=1), dim1=1, dim2=2).mean()
        torch.testing.assert_close(b.nce, want)
        single = official(x, mask, None)
        torch.testing.assert_close(single.nce, a.nce)  # the same mask and pass for both heads
        torch.testing.assert_close(single.mse, official.mpg(x, mask).mse)
    with pytest.raises(ValueError, match="nce_orientation"):
        MaskedPatchPretraining(encoder, nce_orientation="sideways")


def test_pretrain_cli_run(tmp_path):
    manifest = make_corpus(tmp_path)
    run = tmp_path / "run"
    args = ["pretrain", "--model", "ssast_tiny", "--train", str(manifest), "--valid", str(manifest), "--out", str(run),
            "--steps", "6", "--batch-size", "4", *TINY, "--set", "model.overrides.num_heads=2",
            "--set", "log.eval_every=3", "--set", "log.ckpt_every=2", "--set", "log.keep_last=2",
            "--set", "train.grad_accum=2", "--set", "mask.two_pass=false"]  # fmt: skip
    assert main(args) == 0
    metrics = read_metrics(run)
    train = [m for m in metrics if "split" not in m]
    valid = [m for m in metrics if m.get("split") == "valid"]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6] and [m["step"] for m in valid] == [0, 3, 6]
    assert all(set(m) >= {"loss", "nce", "mse", "acc", "lr", "samples_per_s"} for m in train)
    assert train[0]["mask_patch"] == 18  # 24 patches of 48 frames -> 400 * 24 // 512
    assert valid[1]["chance"] == pytest.approx(1 / 18)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert json.loads((run / "config.json").read_text())["train"]["grad_accum"] == 2
    assert MaskedPatchPretraining.from_pretrained(run / "final").encoder.config.depth == 2
    card = (run / "final" / "README.md").read_text()  # the Hub model card: how it was trained, its metrics
    assert f"ssamba pretrain --model ssast_tiny --train {manifest}" in card and "| valid acc (step 6) |" in card


def test_existing_run_needs_resume(tmp_path):
    manifest = make_corpus(tmp_path, items=8)
    cfg = recipe("ssamba_tiny")
    apply_overrides(cfg, [a for a in TINY if a != "--set"])
    cfg.data.train, cfg.train.steps, cfg.train.batch_size = str(manifest), 1, 4
    pretrain(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(cfg, tmp_path / "run")


def test_non_finite_losses_are_skipped_then_stop(tmp_path):
    manifest = make_corpus(tmp_path, items=8)
    cfg = recipe("ssamba_tiny")
    apply_overrides(cfg, [a for a in TINY if a != "--set"])
    cfg.data.train, cfg.train.steps, cfg.train.batch_size, cfg.train.max_bad_steps = str(manifest), 5, 4, 3
    cfg.data.mean = math.nan  # every input NaN -> every loss NaN
    with pytest.raises(NonFiniteLossError, match="3 skipped steps in a row.*non-finite loss"):
        pretrain(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped"] for m in metrics] == [True, True, True]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    manifest = make_corpus(tmp_path, items=8)
    run = tmp_path / "run"
    args = ["pretrain", "--model", "ssamba_tiny", "--train", str(manifest), "--valid", str(manifest), "--out", str(run),
            "--steps", "2", "--batch-size", "4", *TINY, "--set", "log.tensorboard=true", "--set", "log.eval_every=2"]
    assert main(args) == 0
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert any("loss" in t for t in tags) and any("acc" in t for t in tags), tags
    losses = [e.value for t in tags if t.endswith("loss") and "valid" not in t for e in events.Scalars(t)]
    train = [m["loss"] for m in read_metrics(run) if "split" not in m]
    assert len(losses) >= len(train) and math.isclose(losses[0], train[0], rel_tol=1e-6)


def test_divergence_stops_with_exit_2_keeping_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e30: the first update throws the weights to ~1e30 (still finite), the next forward overflows to NaN
    manifest = make_corpus(tmp_path, items=8)
    run = tmp_path / "run"
    args = ["pretrain", "--model", "ssast_tiny", "--train", str(manifest), "--out", str(run), "--steps", "6",
            "--batch-size", "4", *TINY, "--set", "model.overrides.num_heads=2", "--set", "optim.lr=1e30",
            "--set", "log.ckpt_every=1", "--set", "train.max_bad_steps=2"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    tensors, state = assert_stopped_by_divergence(run, capsys.readouterr().err)
    c = state["config"]
    objective = MaskedPatchPretraining(create_model(c["model"]["name"], input_tdim=c["data"]["target_length"],
                                                    **c["model"]["overrides"]))  # fmt: skip
    objective.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    assert all(torch.isfinite(v).all() for v in objective.state_dict().values() if v.is_floating_point())
    assert (state["bad_in_row"], state["skipped_steps"]) == (0, 0)


def test_a_bad_file_in_the_valid_split_stops_before_training(tmp_path, capsys):
    manifest = make_corpus(tmp_path, items=8)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)  # a valid WAV header, 0 samples
    valid = tmp_path / "valid.json"
    write_manifest(valid, [*read_manifest(manifest), Example(path=empty)])
    run = tmp_path / "run"
    args = ["pretrain", "--model", "ssast_tiny", "--train", str(manifest), "--valid", str(valid), "--out", str(run),
            "--steps", "1", "--batch-size", "4", *TINY, "--set", "model.overrides.num_heads=2"]  # fmt: skip
    capsys.readouterr()
    tick = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - tick < 10
    err = one_error_line(capsys.readouterr().err)
    assert f"valid split ({valid}, 1 of 9)" in err and f"{empty}: empty audio (0 samples)" in err
    assert not run.exists()  # stopped before anything was built or written
    assert main([*args, "--set", "data.skip_bad=true"]) == 0  # left out, counted per split, and the run trains
    assert "data check: train 0 of 8 unusable, valid 1 of 9 unusable (left out)" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1]
