"""Saved model folders (timm's ``_hub`` / ``_builder`` side): what ``save_pretrained`` writes and
``load_pretrained`` reads for every family: ``config.json`` ({"family", "config"}), ``model.safetensors`` (nothing
pickled) and the ``README.md`` model card (``ssamba.models.hub``): a Hugging Face Hub model repo as it stands.
Heads trained on top of an encoder are saved beside it with their own config (``ssamba.models.heads``).
:func:`resolve_init` says what a path given as a model source (``--init``, ``embed``, the s3prl upstream) holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ssamba.models.hub import resolve_model_dir, write_model_card
from ssamba.models.registry import FAMILIES

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "InitSource", "load_pretrained", "resolve_init", "save_model_folder"]

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


# ------------------------------------------------------------------------------------- model sources


@dataclass
class InitSource:
    """Where encoder weights come from. kind: "none", "folder" (save_pretrained) or "checkpoint"
    (a pretraining checkpoint step folder); ``pretrain`` is the pretraining run's config when known."""

    kind: str
    path: Path | None = None
    pretrain: dict | None = None

    @property
    def norm(self) -> tuple[float, float] | None:
        """(mean, std) the encoder was pretrained with, when known."""
        data = (self.pretrain or {}).get("data") or {}
        return (data["mean"], data["std"]) if "mean" in data and "std" in data else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_init(init: str | os.PathLike | None) -> InitSource:
    """``none`` | pretraining run folder (RUN/final) | save_pretrained folder | RUN/checkpoints/step_N."""
    if init is None or str(init) == "none":
        return InitSource("none")
    p = Path(init)
    if (p / "final" / "config.json").exists():
        return InitSource("folder", p / "final", _read_json(p / "config.json"))
    meta = _read_json(p / "config.json")
    if meta is not None and "family" in meta:
        run_cfg = _read_json(p.parent / "config.json")  # RUN/final -> RUN/config.json
        return InitSource("folder", p, run_cfg if run_cfg and "data" in run_cfg else None)
    if (p / "state.json").exists() and (p / "tensors.safetensors").exists():
        state = _read_json(p / "state.json") or {}
        if "config" not in state or "model" not in state["config"]:
            raise ValueError(f"{p}: a checkpoint without its run config; cannot rebuild the encoder")
        return InitSource("checkpoint", p, state["config"])
    raise FileNotFoundError(
        f"--init {p}: not a pretraining run (RUN/final), a save_pretrained folder (config.json + "
        "model.safetensors) or a checkpoint folder (state.json + tensors.safetensors)"
    )
