"""Saved model folders as Hugging Face Hub model repos: the model card, loading by repo id, pushing.

A ``save_pretrained`` folder is a Hub model repo as it stands: ``model.safetensors`` (weights, nothing pickled),
``config.json`` (``{"family", "config"}``) and ``README.md``, the model card written here (front matter the Hub
reads, what the model is, how to load it, and, when the caller knows them, how it was trained and its
metrics). ``huggingface_hub`` is an optional extra (``pip install ssamba[hub]``): only loading by repo id and
pushing need it, and nothing here touches the network unless asked to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CARD_FILE", "push_to_hub", "resolve_model_dir", "write_model_card"]

CARD_FILE = "README.md"

_ABOUT = {
    "ssamba": "SSAMBA (Shams et al., SLT 2024): an attention-free bidirectional Mamba encoder of 16x16 log-mel "
              "spectrogram patches, self-supervised by masked spectrogram patch modelling.",
    "ssast": "SSAST (Gong et al., AAAI 2022): a ViT/DeiT encoder of log-mel spectrogram patches, self-supervised "
             "by masked spectrogram patch modelling.",
    "hubert": "Mamba-HuBERT (Zhang et al., ICASSP 2025): a HuBERT-style speech encoder (waveform CNN, masked "
              "prediction of cluster targets) with a transformer or bidirectional Mamba stack.",
}  # fmt: skip


def write_model_card(model: nn.Module, directory: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write ``directory/README.md`` for ``model``. ``card`` may hold ``command`` (how it was trained: a
    command line), ``config`` (the run's resolved config), ``metrics`` ({name: value}), ``source`` (e.g. the
    official checkpoint it was converted from) and ``notes``."""
    card = card or {}
    family = model.family
    params = sum(p.numel() for p in model.parameters())
    lines = ["---", "library_name: ssamba", "tags:", "- audio", "- self-supervised-learning", f"- {family}",
             "license: mit", "---", "", f"# {family} model ({params / 1e6:.2f} M parameters)", "",
             _ABOUT.get(family, f"A {family} model saved by ssamba."), "", "## Use", "", "```python",
             "from ssamba.models import load_pretrained", "", 'model = load_pretrained("THIS_FOLDER_OR_REPO_ID")',
             "layers, lengths = model.extract_features(x, lengths)  # one tensor per layer", "```", "",
             "Weights: `model.safetensors`; architecture: `config.json`. Nothing is unpickled."]  # fmt: skip
    if card.get("source"):
        lines += ["", "## Source", "", str(card["source"])]
    if card.get("command"):
        lines += ["", "## Training", "", "```bash", str(card["command"]), "```"]
    if card.get("config"):
        lines += ["", "Resolved run configuration:", "", "```json", json.dumps(card["config"], indent=1), "```"]
    if card.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in card["metrics"].items()]
    if card.get("notes"):
        lines += ["", str(card["notes"])]
    lines += ["", "## Architecture", "", "```json", json.dumps(model.config.to_dict(), indent=1), "```", ""]
    path = Path(directory) / CARD_FILE
    path.write_text("\n".join(lines))
    return path


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local model folder as it is; otherwise a Hub repo id (``owner/name``), downloaded with
    ``huggingface_hub`` (optional) into its cache. A ValueError names what is missing."""
    path = Path(name_or_path)
    if path.exists():
        return path
    text = str(name_or_path)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise ValueError(f"{text}: no such model folder (a Hub repo id has the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"{text}: not a local folder; loading a Hub repo id needs huggingface_hub "
                         "(pip install huggingface_hub)") from e
    return Path(snapshot_download(repo_id=text, allow_patterns=["*.json", "*.safetensors", "*.md"]))


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False,
                token: str | None = None, commit_message: str = "Upload ssamba model") -> str:
    """Upload a ``save_pretrained`` folder to the Hub repo ``repo_id`` (created if needed); returns its URL.
    Needs ``huggingface_hub`` and a token (``huggingface-cli login`` or ``token``)."""
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).exists():
            raise ValueError(f"{directory} is not a save_pretrained folder: {name} is missing")
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ValueError("push_to_hub needs huggingface_hub (pip install huggingface_hub)") from e
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=commit_message)
    return f"https://huggingface.co/{repo_id}"
