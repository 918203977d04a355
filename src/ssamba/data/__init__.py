"""Manifests, datasets, the resumable sampler, corpus preparation and the offline demo corpus."""

from ssamba.data.check import UnusableFilesError, check_splits
from ssamba.data.datasets import AudioDataset, dataset_stats, pad_collate
from ssamba.data.manifest import Example, LabelSet, ManifestError, read_manifest, write_manifest
from ssamba.data.sampler import ResumableBatchSampler

__all__ = ["AudioDataset", "Example", "LabelSet", "ManifestError", "ResumableBatchSampler", "UnusableFilesError",
           "check_splits", "dataset_stats", "pad_collate", "read_manifest", "write_manifest"]
