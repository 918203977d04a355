"""Pretraining objectives and their mask generators."""

from ssamba.pretrain.masking import cluster_patch_mask, frame_mask, mask_count, official_cluster_mask
from ssamba.pretrain.mspm import MaskedPatchPretraining, MPCResult, MPGResult, MSPMOutput

__all__ = [
    "MPCResult",
    "MPGResult",
    "MSPMOutput",
    "MaskedPatchPretraining",
    "cluster_patch_mask",
    "frame_mask",
    "mask_count",
    "official_cluster_mask",
]
