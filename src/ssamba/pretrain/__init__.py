"""Pretraining objectives."""

from ssamba.pretrain.mspm import MaskedPatchPretraining, MPCResult, MPGResult, MSPMOutput

__all__ = ["MPCResult", "MPGResult", "MSPMOutput", "MaskedPatchPretraining"]
