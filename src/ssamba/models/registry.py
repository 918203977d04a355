"""The model registry of every family (timm's ``_registry`` / ``_factory``): presets are small functions
``name(**overrides) -> model`` registered under their names (SSAMBA and SSAST in ``models.spectrogram``, Mamba-HuBERT
in ``models.hubert``), and model classes register their family so that ``ssamba.models.io.load_pretrained`` can
rebuild any saved folder. Importing ``ssamba.models`` registers every family.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from ssamba.fields import typed_fields

__all__ = ["FAMILIES", "check_overrides", "create_model", "list_models", "model_family", "register_family",
           "register_model"]

# family name -> model class (``family``, ``config_class`` with ``from_dict``, ``load_adapted_state_dict``)
FAMILIES: dict[str, type] = {}


def register_family(model_cls: type) -> type:
    """Make ``load_pretrained`` know another model family (a class with ``family``, ``config_class`` with
    ``from_dict``, and ``load_adapted_state_dict(state, source_config)``), e.g. the HuBERT models."""
    FAMILIES[model_cls.family] = model_cls
    return model_cls


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a preset function ``name(**overrides) -> model`` under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def _preset(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def _model_class(name: str) -> type | None:
    """The model class a preset returns (its return annotation), or None for a preset registered without it."""
    return typing.get_type_hints(_preset(name)).get("return")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset; ``overrides`` replace config fields (unknown keys raise ValueError)."""
    return _preset(name)(**overrides)


def model_family(name: str) -> str | None:
    """The family (``"ssamba"``, ``"ssast"``, ``"hubert"``, ...) of a registered preset, from its model class; None
    for a preset registered without its model class as return annotation."""
    return getattr(_model_class(name), "family", None)


def check_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` for ``create_model(name, **overrides)``, checked without building the model: the preset
    exists, every key is a field of its config and every value has that field's type (converted where lossless;
    a ValueError names the culprit otherwise). Cross-field checks (patch grid, ...) happen when it is built."""
    config_class = getattr(_model_class(name), "config_class", None)
    if config_class is None:  # a preset registered without its model class as return annotation
        return dict(overrides)
    return typed_fields(config_class, overrides, "model.overrides")
