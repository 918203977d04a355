"""Model families and the model registry (``create_model`` / ``list_models``)."""

from ssamba.models.hubert import HuBERTConfig, HuBERTModel, create_hubert  # registers the "hubert" family
from ssamba.models.spectrogram import (
    ClassifierHead,
    SpectrogramEncoder,
    SSAMBAConfig,
    SSAMBAModel,
    SSASTConfig,
    SSASTModel,
    check_overrides,
    create_model,
    list_models,
    load_pretrained,
    model_family,
    pool_tokens,
    register_family,
    register_model,
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
