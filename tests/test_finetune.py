"""Fine-tuning and evaluation: recipes/config, the weighted-sum probe, a few steps lowering the loss, resume
exactness, --init sources, the CLI end to end, k folds."""

import json
import time

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.data.manifest import Example, LabelSet, read_manifest, write_manifest
from ssamba.models import create_model, load_pretrained
from ssamba.models.heads import WeightedSumProbe, load_classifier
from ssamba.models.io import resolve_init
from ssamba.tasks.finetune import build_classifier, evaluate, finetune
from ssamba.tasks.recipes import FinetuneConfig, task_recipe
from ssamba.train.config import apply_overrides
from tests.conftest import FP32_REORDER, assert_stopped_by_divergence, one_error_line

SSAST = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SSAMBA = {"embed_dim": 32, "depth": 2}


def make_task(folder, per_class=8, seconds=0.5, folds=False):
    """Two classes: low vs high sines with noise. Returns (train, valid, labels) paths."""
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    LabelSet(["low", "high"], ["Low", "High"]).to_csv(folder / "labels.csv")
    splits = {}
    for split, n in (("train", per_class), ("valid", per_class // 2)):
        examples = []
        for i in range(2 * n):
            label = ("low", "high")[i % 2]
            f = (150 if label == "low" else 3000) * (1 + 0.1 * rng.random())
            wave = 0.3 * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(t.shape)
            path = folder / f"{split}{i}.wav"
            save_audio(path, wave.astype(np.float32))
            examples.append(Example(path=path, labels=(label,), extra={"fold": i % 2} if folds else {}))
        write_manifest(folder / f"{split}.json", examples)
        splits[split] = folder / f"{split}.json"
    return splits["train"], splits["valid"], folder / "labels.csv"


def tiny_cfg(train, valid, labels, model_name="ssast_tiny", mode="finetune", steps=6, **sections) -> FinetuneConfig:
    cfg = task_recipe("sounds", model_name)
    cfg.data.train, cfg.data.valid, cfg.data.test, cfg.data.labels = str(train), str(valid), str(valid), str(labels)
    cfg.data.target_length = 48
    cfg.model.overrides = dict(SSAST if model_name.startswith("ssast") else SSAMBA)
    cfg.model.fstride = cfg.model.tstride = 0
    cfg.task.mode = mode
    cfg.train.steps, cfg.train.batch_size = steps, 8
    cfg.optim.lr, cfg.optim.head_lr = 1e-3, 1.0
    cfg.augment.freqm = cfg.augment.timem = 0
    cfg.augment.noise = False
    cfg.log.progress = cfg.log.tensorboard = False
    cfg.log.eval_every = steps
    for section, values in sections.items():
        cfg.update({section: values})
    return cfg


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("task"))


def test_recipes_and_config_errors():
    kws = task_recipe("kws", "ssamba_tiny")
    assert (kws.optim.lr, kws.augment.freqm, kws.augment.timem, kws.augment.mixup) == (2.5e-4, 48, 48, 0.6)
    assert (kws.model.fstride, kws.train.batch_size, kws.task.loss) == (10, 128, "bce")
    esc = task_recipe("esc")
    assert (esc.optim.lr, esc.augment.timem, esc.augment.mixup, esc.data.folds) == (1e-4, 96, 0.0, 5)
    aset = task_recipe("audioset")
    assert aset.task.multilabel and aset.task.metric == "mAP" and (aset.optim.wa_start, aset.optim.wa_end) == (6, 25)
    with pytest.raises(ValueError, match="unknown task"):
        task_recipe("asr")
    with pytest.raises(ValueError, match="optim.lrr"):
        apply_overrides(kws, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="task.mode"):
        apply_overrides(kws, ["task.mode=freeze"])
    apply_overrides(kws, ["model.overrides.depth=2", "augment.mixup=0.1"])
    assert kws.model.overrides == {"depth": 2} and kws.augment.mixup == 0.1
    assert FinetuneConfig.from_dict(kws.to_dict()).to_dict() == kws.to_dict()


def test_probe_trains_only_layer_weights_and_head(task, tmp_path):
    train, valid, labels = task
    encoder = create_model("ssamba_tiny", input_tdim=48, **SSAMBA)
    encoder.save_pretrained(tmp_path / "enc")
    cfg = tiny_cfg(train, valid, labels, "ssamba_tiny", mode="probe", steps=4)
    cfg.model.init = str(tmp_path / "enc")
    cfg.optim.lr = 5e-2
    probe = build_classifier(cfg, 2)
    assert isinstance(probe, WeightedSumProbe)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"layer_logits", "head.weight", "head.bias"}
    assert probe.layer_logits.shape == (1,)  # SSAMBA depth 2 = one forward/backward pair
    # cached path == direct path, and padding-invariant
    x = torch.randn(3, 48, 128)
    lengths = torch.tensor([48, 40, 32])
    probe.train()  # the encoder stays in eval mode
    assert not probe.encoder.training
    pooled = probe.pooled_layers(x, lengths)
    torch.testing.assert_close(probe(x, lengths), probe.forward_pooled(pooled))
    torch.testing.assert_close(pooled[2:], probe.pooled_layers(x[2:, :32], None), **FP32_REORDER)

    for cached in (True, False):
        cfg.train.cache_probe_features = cached
        run = tmp_path / f"run_{cached}"
        out = finetune(cfg, run, log=lambda m: None)
        assert out["mode"] == "probe" and len(out["layer_weights"]) == 1
        model, meta = load_classifier(run)
        assert meta["mode"] == "probe"
        saved = load_file(str(run / "best" / "model.safetensors"))
        for k, v in encoder.state_dict().items():  # the encoder never moved
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
        head = load_file(str(run / "best" / "probe.safetensors"))
        assert set(head) == {"layer_logits", "head.weight", "head.bias", "feature_mean", "feature_std"}
        assert not torch.equal(head["feature_std"], torch.ones_like(head["feature_std"]))  # fitted on train
        results = out
        if cached:
            first = results
    assert first["valid"] == results["valid"]  # cached and uncached probes are the same computation


@pytest.mark.parametrize("model_name", ["ssamba_tiny", "ssast_tiny"])
def test_row_stats_probe_pools_each_frequency_row(task, tmp_path, model_name):
    """row_stats = per frequency row, the mean and std over the valid time columns of the LayerNormed patch
    tokens, for items of different lengths in one (packed) batch; saved and loaded with its pooling."""
    overrides = SSAST if model_name.startswith("ssast") else SSAMBA
    encoder = create_model(model_name, input_tdim=48, **overrides)
    probe = WeightedSumProbe(encoder, 2, pool="row_stats")
    f_grid, c = encoder.config.grid[0], encoder.config.embed_dim
    x = torch.randn(3, 48, 128)
    lengths = torch.tensor([48, 40, 32])
    pooled = probe.pooled_layers(x, lengths)
    layers = len(encoder.extract_features(x[:1])[0])
    assert pooled.shape == (3, layers, f_grid * 2 * c)
    s = encoder.num_special_tokens
    for b, n in enumerate(lengths.tolist()):  # each item alone, unpadded: rows straight from the token order
        hidden, _ = encoder.extract_features(x[b : b + 1, :n])
        for layer, h in enumerate(hidden):
            rows = torch.nn.functional.layer_norm(h[0, s:], (c,)).view(f_grid, -1, c)  # (Fg, Tv, C)
            want = torch.cat([rows.mean(1), rows.std(1, unbiased=False)], dim=-1).flatten()
            # packed vs alone: the same tokens to float32 rounding (tests/conftest.py states FP32_REORDER)
            torch.testing.assert_close(pooled[b, layer], want, **FP32_REORDER)
    with pytest.raises(ValueError, match="probe pool"):
        WeightedSumProbe(encoder, 2, pool="max")

    train, valid, labels = task
    encoder.save_pretrained(tmp_path / "enc")
    cfg = tiny_cfg(train, valid, labels, model_name, mode="probe", steps=2)
    cfg.model.init, cfg.task.probe_pool = str(tmp_path / "enc"), "row_stats"
    finetune(cfg, tmp_path / "run", log=lambda m: None)
    model, meta = load_classifier(tmp_path / "run")
    assert meta["probe_pool"] == model.pool == "row_stats" and model.head.in_features == f_grid * 2 * c
    with pytest.raises(ValueError, match="task.probe_pool"):
        apply_overrides(cfg, ["task.probe_pool=max"])


def test_probes_of_either_pooling_share_one_encoder_pass(task, monkeypatch):
    """Over a MemoDataset, a mean probe's pass also keeps the row statistics: a row-stats probe of the same encoder
    on the same clips then runs no encoder and gets what it would have computed itself."""
    from ssamba.data.datasets import MemoDataset
    from ssamba.tasks import finetune as ft

    train, _, labels = task
    encoder = create_model("ssamba_tiny", input_tdim=48, **SSAMBA)
    mean_probe, rows_probe = (WeightedSumProbe(encoder, 2, pool=p) for p in ("mean", "row_stats"))
    ds = MemoDataset(train, LabelSet.from_csv(labels), target_length=48)
    loader = ft._loader(ds, 8, 0)
    calls = []
    original = type(encoder).extract_features
    monkeypatch.setattr(type(encoder), "extract_features", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(ft, "_POOLED_MEMO", {})
    ft._cache_pooled(mean_probe, ds, loader, "cpu")
    passes = len(calls)
    assert passes == len(loader)
    rows, targets = ft._cache_pooled(rows_probe, ds, loader, "cpu")
    assert len(calls) == passes  # served from the memo
    direct = torch.cat([rows_probe.pooled_layers(b["features"], b["lengths"]) for b in loader])
    torch.testing.assert_close(rows, direct, rtol=0, atol=0)
    assert targets.shape == (len(ds), 2)


def full_loss(model, train, labels):
    from ssamba.data import AudioDataset

    ds = AudioDataset(train, LabelSet.from_csv(labels), target_length=48)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = model.eval()(batch["features"], batch["lengths"])
    return float(-(batch["labels"] * torch.log_softmax(logits, -1)).sum(-1).mean())


@pytest.mark.parametrize("model_name", ["ssast_tiny", "ssamba_tiny"])
def test_a_few_steps_lower_the_loss(task, tmp_path, model_name):
    train, valid, labels = task
    torch.manual_seed(0)
    overrides = SSAST if model_name.startswith("ssast") else SSAMBA
    encoder = create_model(model_name, input_tdim=48, num_classes=2, **overrides)
    encoder.save_pretrained(tmp_path / "enc")
    before = full_loss(load_pretrained(tmp_path / "enc"), train, labels)
    cfg = tiny_cfg(train, valid, labels, model_name, steps=8)
    cfg.model.init = str(tmp_path / "enc")
    out = finetune(cfg, tmp_path / "run", log=lambda m: None)
    model, _ = load_classifier(tmp_path / "run")
    after = full_loss(model, train, labels)
    assert after < before - 0.05, (before, after)
    assert out["steps"] == 8 and out["best_step"] == 8 and out["task"] == "sounds" and out["metric"] == "acc"
    for name in ("metrics.json", "results.md", "confusion.png", "confusion.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["valid"] == out["valid"]


def test_resume_is_exact(task, tmp_path):
    train, valid, labels = task
    sections = {"augment": {"mixup": 0.5, "freqm": 8, "timem": 8, "noise": True},
                "model": {"overrides": {**SSAST, "drop_path_rate": 0.2}},
                "log": {"ckpt_every": 3, "log_every": 1, "eval_every": 2}}  # fmt: skip
    straight = tiny_cfg(train, valid, labels, steps=6, **sections)
    finetune(straight, tmp_path / "a", log=lambda m: None)
    part = tiny_cfg(train, valid, labels, steps=3, **sections)
    finetune(part, tmp_path / "b", log=lambda m: None)
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(part, tmp_path / "b", log=lambda m: None)
    finetune(straight, tmp_path / "b", resume=True, log=lambda m: None)

    def losses(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in lines if "split" not in m]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000006" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000006" / "tensors.safetensors"))
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_init_sources_and_grid_change(task, tmp_path):
    from ssamba.train.config import recipe
    from ssamba.train.loop import pretrain

    train, valid, labels = task
    pcfg = recipe("ssast_tiny")
    apply_overrides(pcfg, ["model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.num_heads=2",
                           "data.target_length=48", "data.num_workers=0", "log.progress=false",
                           "log.tensorboard=false", "data.mean=-5.0", "data.std=3.0"])  # fmt: skip
    pcfg.data.train, pcfg.train.steps, pcfg.train.batch_size = str(train), 2, 4
    pretrain(pcfg, tmp_path / "pt")
    final = load_pretrained(tmp_path / "pt" / "final")
    step_dir = tmp_path / "pt" / "checkpoints" / "step_00000002"
    kinds = [resolve_init(p).kind for p in (tmp_path / "pt", tmp_path / "pt" / "final", step_dir)]
    assert kinds == ["folder", "folder", "checkpoint"]
    assert resolve_init(tmp_path / "pt").norm == (-5.0, 3.0)
    assert resolve_init("none").kind == "none"
    with pytest.raises(FileNotFoundError, match="--init"):
        resolve_init(tmp_path)
    cfg = tiny_cfg(train, valid, labels)
    cfg.data.target_length, cfg.model.tstride = 64, 8  # another grid: position embedding converted
    for source in (tmp_path / "pt", step_dir):
        cfg.model.init = str(source)
        model = build_classifier(cfg, 2)
        assert model.config.input_tdim == 64 and model.config.tstride == 8 and model.head is not None
        torch.testing.assert_close(model.blocks[1].attn.qkv.weight, final.blocks[1].attn.qkv.weight)
    cfg.model.name = "ssamba_tiny"
    with pytest.raises(ValueError, match="ssast encoder"):
        build_classifier(cfg, 2)


def test_cli_finetune_then_evaluate(task, tmp_path, capsys):
    train, valid, labels = task
    run = tmp_path / "run"
    args = ["finetune", "--model", "ssast_tiny", "--init", "none", "--task", "sounds", "--train", str(train),
            "--valid", str(valid), "--test", str(valid), "--labels", str(labels), "--out", str(run), "--steps", "2",
            "--batch-size", "8", "--set", "data.target_length=48", "--set", "model.overrides.embed_dim=32",
            "--set", "model.overrides.depth=1", "--set", "model.overrides.num_heads=2", "--set", "model.tstride=0",
            "--set", "model.fstride=0", "--set", "log.progress=false", "--set", "log.tensorboard=false"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"task", "metric", "valid", "test"}
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", str(run), "--test", str(valid), "--labels", str(labels), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["value"] == pytest.approx(metrics["test"]) and result["items"] == 8
    assert evaluate(run / "best", valid)["acc"] == pytest.approx(metrics["test"])
    assert main([*args[:-4], "--set", "optim.lrr=1"]) == 2  # unknown key: one line, exit 2
    assert "optim.lrr" in capsys.readouterr().err


@pytest.mark.slow
def test_kfold(tmp_path):
    train, valid, labels = make_task(tmp_path, per_class=4, folds=True)
    cfg = tiny_cfg(train, valid, labels, steps=1)
    cfg.model.overrides = {**SSAST, "depth": 1}
    cfg.data.folds = 2
    out = finetune(cfg, tmp_path / "run", log=lambda m: None)
    assert [f["fold"] for f in out["folds"]] == [1, 2]
    assert out["test"] == pytest.approx(np.mean([f["test"] for f in out["folds"]]))
    assert (tmp_path / "run" / "fold_2" / "metrics.json").exists() and (tmp_path / "run" / "results.md").exists()
    cfg.data.folds = 3
    with pytest.raises(ValueError, match="2 distinct 'fold' values"):
        finetune(cfg, tmp_path / "run3", log=lambda m: None)


@pytest.mark.slow
def test_compare_table(tmp_path):
    from ssamba.tasks.compare import CompareBudget, compare

    manifests = tmp_path / "manifests"
    manifests.mkdir()
    train, valid, labels = make_task(tmp_path, per_class=4)
    for split, src in (("train", train), ("valid", valid), ("test", valid)):
        (manifests / f"sounds_{split}.json").write_text(src.read_text().replace('"wav": "', '"wav": "../'))
    (manifests / "sounds_labels.csv").write_text(labels.read_text())
    encoder = create_model("ssast_tiny", input_tdim=48, embed_dim=32, depth=1, num_heads=2)
    encoder.save_pretrained(tmp_path / "pt")
    budget = CompareBudget(finetune_steps=1, probe_epochs=1, batch_size=4, target_length={"sounds": 48})
    rows = compare(manifests, tmp_path / "cmp", {"ssast_tiny": str(tmp_path / "pt")}, tasks=["sounds"],
                   budget=budget, log=lambda m: None)  # fmt: skip
    assert sorted((r["init"], r["mode"]) for r in rows) == [("pretrained", "finetune"), ("pretrained", "probe"),
                                                            ("scratch", "finetune"), ("scratch", "probe")]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sounds | ssast_tiny | probe |" in table and "1 steps x 4 clips" in table
    scratch = json.loads((tmp_path / "cmp" / "sounds" / "ssast_tiny-scratch-finetune" / "config.json").read_text())
    assert scratch["model"]["init"] == "none" and scratch["model"]["overrides"]["depth"] == 1
    again = compare(manifests, tmp_path / "cmp", {"ssast_tiny": str(tmp_path / "pt")}, tasks=["sounds"],
                    budget=budget, log=lambda m: None)  # fmt: skip
    assert [r["seconds"] for r in again] == [r["seconds"] for r in rows]  # finished cells are reused


def cli_args(train, valid, labels, run, *extra) -> list[str]:
    """`ssamba finetune` of a tiny SSAST on the two-class task."""
    return ["finetune", "--model", "ssast_tiny", "--init", "none", "--task", "sounds", "--train", str(train),
            "--valid", str(valid), "--labels", str(labels), "--out", str(run), "--batch-size", "4",
            "--set", "data.target_length=48", "--set", "model.overrides.embed_dim=32",
            "--set", "model.overrides.depth=1", "--set", "model.overrides.num_heads=2", "--set", "model.tstride=0",
            "--set", "model.fstride=0", "--set", "log.progress=false", "--set", "log.tensorboard=false",
            "--set", "log.log_every=1", *extra]  # fmt: skip


def test_divergence_is_skipped_counted_and_stops_with_exit_2(task, tmp_path, capsys):
    # lr 1e30: the first update throws the weights to ~1e30 (still finite), the next forward overflows to NaN
    train, valid, labels = task
    run = tmp_path / "run"
    args = cli_args(train, valid, labels, run, "--test", str(valid), "--steps", "8", "--set", "optim.lr=1e30",
                    "--set", "log.ckpt_every=1", "--set", "train.max_bad_steps=2")  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    tensors, state = assert_stopped_by_divergence(run, capsys.readouterr().err)
    assert not (run / "metrics.json").exists()
    model = build_classifier(FinetuneConfig.from_dict(state["config"]), 2)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert (state["bad_in_row"], state["skipped_steps"]) == (0, 0)


def test_an_empty_wav_in_the_test_split_stops_before_training(task, tmp_path, capsys):
    train, valid, labels = task
    empty = tmp_path / "is.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)  # a valid WAV header, 0 samples
    test = tmp_path / "test.json"
    write_manifest(test, [*read_manifest(valid), Example(path=empty, labels=("low",))])
    run = tmp_path / "run"
    args = cli_args(train, valid, labels, run, "--test", str(test), "--steps", "1")
    capsys.readouterr()
    tick = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - tick < 10
    err = one_error_line(capsys.readouterr().err)
    assert f"1 unusable audio file in test split ({test}, 1 of 9): {empty}: empty audio (0 samples)" in err
    assert "data.skip_bad=true" in err and not run.exists()  # stopped before anything was built or written
    assert main([*args, "--set", "data.skip_bad=true"]) == 0  # left out, counted per split, and the run trains
    out = capsys.readouterr().out
    assert "data check: train 0 of 16 unusable, valid 0 of 8 unusable, test 1 of 9 unusable (left out)" in out
    assert json.loads((run / "metrics.json").read_text())["skipped_steps"] == 0


@pytest.mark.parametrize("mode", ["finetune", "probe"])
def test_bf16_finetune_runs(task, tmp_path, mode):
    """train.precision = bf16: autocast through the engine (on CPU here), losses finite, the usual outputs."""
    train, valid, labels = task
    cfg = tiny_cfg(train, valid, labels, mode=mode, steps=3, log={"log_every": 1})
    cfg.train.precision = "bf16"
    out = finetune(cfg, tmp_path / "run", log=lambda m: None)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "split" not in json.loads(line)]  # fmt: skip
    assert len(losses) == 3 and all(np.isfinite(losses)) and out["skipped_steps"] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    assert (tmp_path / "run" / "best" / "finetune.json").exists() and np.isfinite(out["valid"])
