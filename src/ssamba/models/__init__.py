"""Model families (``spectrogram``: SSAMBA, SSAST; ``hubert``: Mamba-HuBERT), the registry of every family's
presets (``registry``: ``create_model`` / ``list_models``), saved folders (``io``: ``load_pretrained``; ``hub``: model
card, Hub repos) and heads saved with their config (``heads``). Importing this package registers every family."""

from ssamba.models.hubert import HuBERTConfig, HuBERTModel, create_hubert  # registers the "hubert" family
from ssamba.models.io import load_pretrained
from ssamba.models.registry import (
    check_overrides,
    create_model,
    list_models,
    model_family,
    register_family,
    register_model,
)
from ssamba.models.spectrogram import (  # registers the "ssamba" and "ssast" families
    ClassifierHead,
    SpectrogramEncoder,
    SSAMBAConfig,
    SSAMBAModel,
    SSASTConfig,
    SSASTModel,
    pool_tokens,
)

__all__ = [
    "ClassifierHead",
    "HuBERTConfig",
    "HuBERTModel",
    "SSAMBAConfig",
    "SSAMBAModel",
    "SSASTConfig",
    "SSASTModel",
    "SpectrogramEncoder",
    "check_overrides",
    "create_hubert",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_family",
    "pool_tokens",
    "register_family",
    "register_model",
]
