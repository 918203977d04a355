"""Downstream tasks on the training engine: fine-tuning and linear probes (with their recipes), CTC and
reconstruction over HuBERT-family encoders; metrics, embeddings, the s3prl-style upstream adapter.

Imports are lazy (PEP 562), so ``import ssamba.tasks`` stays cheap and never pulls in modules a caller does
not use (e.g. the HuBERT CTC task in ``ssamba.tasks.ctc``)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "recipes", "task_recipe": "recipes", "TASKS": "recipes",
    "finetune": "finetune", "evaluate": "finetune", "build_classifier": "finetune",
    "UpstreamExpert": "upstream", "compare": "compare", "embed": "embed",
    "CTCConfig": "ctc", "finetune_ctc": "ctc", "ReconstructConfig": "reconstruct", "reconstruct": "reconstruct",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ssamba.tasks.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ssamba.tasks' has no attribute {name!r}")
