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
