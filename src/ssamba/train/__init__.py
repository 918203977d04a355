"""Training machinery: pretraining loop, config, checkpoints, distributed helpers, run logs."""

from ssamba.train.config import PretrainConfig, apply_overrides, load_config, recipe
from ssamba.train.loop import NonFiniteLossError, pretrain

__all__ = ["NonFiniteLossError", "PretrainConfig", "apply_overrides", "load_config", "pretrain", "recipe"]
