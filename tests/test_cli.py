import json
import subprocess
import sys

import numpy as np
import pytest

from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.data import Example, write_manifest
from tests.conftest import one_error_line


@pytest.fixture
def manifest(tmp_path):
    t = np.arange(8000) / 16000
    examples = []
    for i, freq in enumerate((300, 1200)):
        path = tmp_path / f"{i}.wav"
        save_audio(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
        examples.append(Example(path, ("x",)))
    write_manifest(tmp_path / "train.json", examples)
    return tmp_path / "train.json"


def test_data_stats_json(manifest, capsys):
    assert main(["data", "stats", str(manifest), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["files"] == 2 and stats["frames"] == 2 * 48 and stats["std"] > 0


def test_data_stats_bad_manifest_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    assert main(["data", "stats", str(bad)]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_data_stats_bad_audio_exits_2_or_is_skipped(manifest, tmp_path, capsys):
    doc = json.loads(manifest.read_text())
    (tmp_path / "bad.wav").write_bytes(b"nope")
    doc["data"].append({"wav": "bad.wav", "labels": "x"})
    manifest.write_text(json.dumps(doc))
    assert main(["data", "stats", str(manifest)]) == 2
    assert "bad.wav" in capsys.readouterr().err
    assert main(["data", "stats", str(manifest), "--skip-bad", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["files"] == 2 and len(stats["skipped"]) == 1


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "ssamba.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ssamba ")


@pytest.mark.parametrize("fixture", ["ssamba_a", "ssast_a"])
def test_conformance_command_passes_on_official_fixtures(fixture, capsys):
    from tests.conftest import conformance_dir

    assert main(["conformance", str(conformance_dir(fixture))]) == 0
    assert "outputs within tolerance" in capsys.readouterr().out


def test_conformance_command_fails_on_a_folder_that_is_not_a_fixture(tmp_path):
    assert main(["conformance", str(tmp_path)]) != 0


def test_convert_command_imports_official_weights(tmp_path):
    import torch

    from ssamba.models import load_pretrained
    from tests.conftest import conformance_dir

    folder = conformance_dir("ssamba_a")
    config = json.loads((folder / "config.json").read_text())
    kwargs = {**config["pretrain_constructor_kwargs"], "pretrain_stage": False, "label_dim": 5}
    (tmp_path / "kwargs.json").write_text(json.dumps(kwargs))
    assert main(["convert", str(folder / "pretrain_state_dict.pt"), "--family", "ssamba",
                 "--config", str(tmp_path / "kwargs.json"), "--out", str(tmp_path / "model")]) == 0
    model = load_pretrained(tmp_path / "model")
    state = torch.load(folder / "pretrain_state_dict.pt", weights_only=True)
    assert torch.equal(model.state_dict()["cls_token"], state["module.v.cls_token"])
    assert not any(p.suffix in (".pt", ".pth", ".bin") for p in (tmp_path / "model").iterdir())


def _commands(manifest, tmp_path):
    """Every command that takes --set, with arguments that would otherwise run (the manifest is real)."""
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n0,x,x\n")
    m, out = str(manifest), str(tmp_path / "run")
    common = ["--train", m, "--valid", m, "--out", out]
    return {
        "pretrain": ["pretrain", "--model", "ssamba_tiny", *common],
        "finetune": ["finetune", "--model", "ssamba_tiny", "--task", "kws", "--labels", str(labels), *common],
        "hubert pretrain": ["hubert", "pretrain", "--size", "tiny", "--labels", str(tmp_path), *common],
        "hubert finetune": ["hubert", "finetune", "--size", "tiny", *common],
        "hubert reconstruct": ["hubert", "reconstruct", "--size", "tiny", *common],
        "bench models": ["bench", "models", "--quick", "--quiet"],
    }


# (--set for the run commands, --set for bench models, words the one error line must hold)
BAD_SETS = [
    ("train.steps=abc", "depth=abc", ["steps", "integer", "'abc'"]),  # wrong type
    ('model.overrides={"depth":2', 'depth={"a":', ["expects"]),  # malformed JSON / table
    ("model.overrides.depthh=2", "depthh=2", ["depthh"]),  # unknown nested key
    ("model.overrides.depth=two", "pool=3", ["expects"]),  # wrong type of a model config field
    ("train.steps.inner=2", "=2", ["--set"]),  # a key that cannot exist
]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "hubert pretrain", "hubert finetune",
                                     "hubert reconstruct", "bench models"])
@pytest.mark.parametrize("run_set,bench_set,words", BAD_SETS)
def test_bad_set_value_exits_2_with_one_line(command, run_set, bench_set, words, manifest, tmp_path, capsys):
    argv = _commands(manifest, tmp_path)[command]
    value = bench_set if command == "bench models" else run_set
    if command == "bench models":
        words = [w for w in words if w != "steps"]
    assert main([*argv, "--set", value]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert all(w in err for w in words), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # rejected before anything ran


def test_set_values_are_parsed_to_the_field_type():
    from ssamba.tasks.ctc import CTCConfig
    from ssamba.tasks.recipes import task_recipe
    from ssamba.train.config import PretrainConfig, apply_overrides

    cfg = task_recipe("kws", "ssamba_tiny")
    apply_overrides(cfg, ['model.overrides={"depth":2}', "model.overrides.pool=cls", "optim.lr=1",
                          "optim.betas=[0.9, 0.98]", "train.steps=1e2", "data.skip_bad=true"])
    assert cfg.model.overrides == {"depth": 2, "pool": "cls"}
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.98)
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int) and cfg.data.skip_bad is True
    pre = PretrainConfig()
    apply_overrides(pre, ["model.overrides={depth = 4}", "model.name=ssast_tiny", "model.overrides.num_heads=2"])
    assert pre.model.overrides == {"depth": 4, "num_heads": 2} and pre.model.name == "ssast_tiny"
    ctc = CTCConfig()
    apply_overrides(ctc, ["head.layer=2", "model.overrides.depth=3", "mask.prob=0.5", "mask.span=5"])
    assert ctc.head.layer == 2 and ctc.model.overrides == {"depth": 3}
    assert (ctc.mask.prob, ctc.mask.span, ctc.mask.min_masks) == (0.5, 5, 0)  # HuBERT pretraining's span masks
    with pytest.raises(ValueError, match="unknown key.*finetune.mask_prob"):  # one key per meaning: mask.prob
        apply_overrides(ctc, ["finetune.mask_prob=0.5"])
    # a failed --set leaves the config as it was
    with pytest.raises(ValueError, match="train.batch_size expects an integer"):
        apply_overrides(pre, ["train.batch_size=1.5"])
    assert pre.train.batch_size == PretrainConfig().train.batch_size


def test_config_file_values_are_typed(tmp_path):
    from ssamba.train.config import PretrainConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.99]\ntrain:\n  steps: 10\n")  # YAML 1.1: '1e-4' is a str
    cfg = PretrainConfig()
    cfg.update(load_config(path), source=str(path))
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.99) and cfg.train.steps == 10
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ValueError, match=r"c.yaml: train.steps expects an integer, got 'many'"):
        cfg.update(load_config(path), source=str(path))


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_hubert_preset_is_refused_by_the_spectrogram_commands(command, manifest, tmp_path, capsys):
    argv = _commands(manifest, tmp_path)[command]
    argv[argv.index("ssamba_tiny")] = "hubert_extbimamba_tiny"
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "not a spectrogram encoder" in err and "ssamba hubert" in err
