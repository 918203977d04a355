import json
import subprocess
import sys

import numpy as np
import pytest

from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.data import Example, write_manifest


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
