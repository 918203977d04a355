"""Saved model folders (timm's ``_hub`` / ``_builder`` side): what ``save_pretrained`` writes and
``load_pretrained`` reads for every family: ``config.json`` ({"family", "config"}), ``model.safetensors`` (nothing
pickled) and the ``README.md`` model card (``ssamba.models.hub``): a Hugging Face Hub model repo as it stands.
Heads trained on top of an encoder are saved beside it with their own config (``ssamba.models.heads``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ssamba.models.hub import resolve_model_dir, write_model_card
from ssamba.models.registry import FAMILIES

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_pretrained", "save_model_folder"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_folder(model: nn.Module, directory: str | Path, card: dict[str, Any] | None = None) -> Path:
    """The folder every family saves (``save_pretrained``) and ``load_pretrained`` reads: ``config.json``
    ({"family": model.family, "config": model.config.to_dict()}), ``model.safetensors`` (nothing pickled) and the
    ``README.md`` model card (``ssamba.models.hub.write_model_card``; ``card``: what the caller knows of its
    training): a Hugging Face Hub model repo as it stands."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"family": model.family, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "family": model.family})
    write_model_card(model, directory, card)
    return directory


def load_pretrained(directory: str | Path, expect: type | None = None, **overrides: Any) -> nn.Module:
    """Build the model saved in ``directory`` by ``save_pretrained`` (see ``SpectrogramEncoder.from_pretrained``);
    any registered family (``register_family``) loads through here."""
    from safetensors.torch import load_file

    directory = resolve_model_dir(directory)
    if not (directory / CONFIG_FILE).exists():
        raise ValueError(f"{directory} is not a saved model folder: {CONFIG_FILE} is missing")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    family = meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    model_cls = FAMILIES[family]
    if expect is not None and not issubclass(model_cls, expect):
        raise ValueError(f"{directory} holds a {family} model, not a {expect.__name__}")
    source = model_cls.config_class.from_dict(meta["config"])
    model = model_cls(model_cls.config_class.from_dict({**meta["config"], **overrides}))
    model.load_adapted_state_dict(load_file(str(directory / WEIGHTS_FILE)), source)
    return model
