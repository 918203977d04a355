"""Saved folders as Hub model repos: the model card, loading by repo id (offline, a stand-in hub), pushing."""

import json
import sys
import types

import pytest
import torch

from ssamba.convert.official import convert_checkpoint
from ssamba.models import create_model, load_pretrained
from ssamba.models.hub import push_to_hub, resolve_model_dir
from tests.conftest import conformance_dir


def test_card_describes_the_model_and_its_training(tmp_path):
    model = create_model("ssamba_tiny", embed_dim=32, depth=2)
    folder = model.save_pretrained(tmp_path / "m", {"command": "ssamba pretrain --model ssamba_tiny ...",
                                                    "metrics": {"valid acc": 0.25, "steps": 10}})
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ssamba\n") and "- ssamba" in card  # Hub front matter
    assert "SSAMBA (Shams et al., SLT 2024)" in card and "load_pretrained(" in card
    assert "ssamba pretrain --model ssamba_tiny ..." in card and "| valid acc | 0.25 |" in card
    assert '"embed_dim": 32' in card  # the architecture


def test_load_by_repo_id_through_huggingface_hub(tmp_path, monkeypatch):
    model = create_model("ssast_tiny", embed_dim=32, depth=1, num_heads=2)
    folder = model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns):  # stands in for the Hub: no network in tests
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = load_pretrained("someone/ssast-tiny-test")
    assert calls[0][0] == "someone/ssast-tiny-test" and "*.safetensors" in calls[0][1]
    x = torch.randn(1, 64, 128)
    with torch.no_grad():  # exact by construction: the same weights, input and kernels on this machine
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_repo_ids_without_huggingface_hub_and_bad_folders(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="needs huggingface_hub"):
        resolve_model_dir("someone/model")
    with pytest.raises(ValueError, match="no such model folder"):
        resolve_model_dir(tmp_path / "missing" / "deeper" / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a save_pretrained folder"):
        push_to_hub(tmp_path / "empty", "someone/model")


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    folder = create_model("ssamba_tiny", embed_dim=32, depth=2).save_pretrained(tmp_path / "m")
    done = {}

    class HfApi:  # a stand-in recording what would be sent
        def __init__(self, token=None):
            done["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            done["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message):
            done["upload"] = (folder_path, repo_id)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    assert push_to_hub(folder, "me/tiny", private=True, token="t") == "https://huggingface.co/me/tiny"
    assert done == {"token": "t", "repo": ("me/tiny", True, True), "upload": (str(folder), "me/tiny")}


def test_converted_official_checkpoint_has_a_card(tmp_path):
    folder = conformance_dir("ssast_a")
    config = json.loads((folder / "config.json").read_text())
    out = convert_checkpoint(folder / "pretrain_state_dict.pt", "ssast", config["pretrain_constructor_kwargs"],
                             tmp_path / "converted")
    assert "Converted by `ssamba convert` from the official SSAST checkpoint `pretrain_state_dict.pt`" in (
        out / "README.md").read_text()
    assert load_pretrained(out).family == "ssast"  # and the carded folder loads as before
