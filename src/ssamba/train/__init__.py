"""Training machinery: the one engine (``engine``), the one config system (``config``), checkpoints, distributed
helpers, run logs, the non-finite guard, and the two pretraining runs on the engine (``loop``, ``hubert``)."""

from ssamba.train.config import PretrainConfig, RunConfig, apply_overrides, load_config, recipe
from ssamba.train.engine import Engine
from ssamba.train.loop import NonFiniteLossError, pretrain

__all__ = ["Engine", "NonFiniteLossError", "PretrainConfig", "RunConfig", "apply_overrides", "load_config", "pretrain",
           "recipe"]
