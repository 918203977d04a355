"""Per-layer representations of audio files (``ssamba embed``).

For every clip of a manifest (or a list of audio files): every layer's output of ``extract_features`` (the
raw residual stream, one entry per SSAMBA layer pair / SSAST block) and the final normalised tokens of
``forward_features``, either mean-pooled over the clip's valid patch tokens (default) or as all tokens.

Outputs: ``OUT.npy`` (N, L + 1, C) float32 pooled vectors (last row = final tokens), or
``OUT.safetensors``: pooled ``layers`` (N, L + 1, C), or with ``pool="none"`` one ``clip{i}`` (L + 1, K_i, C)
tensor per clip; always ``OUT.json`` with the files in row order, the model folder and the normalisation.
Clips are decoded at their own length (no padding to a target length); longer ones than the model's
``input_tdim`` are cut to it, and counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ssamba import features as feats
from ssamba.data.check import check_splits
from ssamba.data.datasets import AudioDataset
from ssamba.data.manifest import AUDIO_SUFFIXES, Example, read_manifest
from ssamba.nn.layers import lengths_to_mask

__all__ = ["embed"]


def _examples(inputs: list[str | os.PathLike]) -> list[Example]:
    """A manifest (.json/.jsonl/folder per class) or audio files."""
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() not in AUDIO_SUFFIXES:
        return read_manifest(inputs[0])
    examples = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise ValueError(f"{path}: not an audio file ({', '.join(AUDIO_SUFFIXES)}) and more than one input given")
        examples.append(Example(path=path))
    return examples


@torch.no_grad()
def embed(model_dir: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
          pool: str = "mean", fmt: str = "npy", batch_size: int = 16, skip_bad: bool = False) -> dict:
    """Write the representations described in the module docstring; returns the OUT.json summary."""
    from ssamba.models.spectrogram import load_pretrained
    from ssamba.tasks.finetune import META_FILE, load_classifier, resolve_init

    if pool not in ("mean", "none"):
        raise ValueError(f"pool must be mean or none, got {pool!r}")
    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"format must be npy or safetensors, got {fmt!r}")
    if pool == "none" and fmt == "npy":
        raise ValueError("pool none gives clips of different lengths: use the safetensors format")
    path = Path(model_dir)
    mean, std = feats.AUDIOSET_LIBRISPEECH_MEAN, feats.AUDIOSET_LIBRISPEECH_STD
    if (path / META_FILE).exists() or (path / "best" / META_FILE).exists():  # a fine-tuned model
        model, meta = load_classifier(path)
        encoder = model.encoder if hasattr(model, "layer_logits") else model
        mean, std = meta["mean"], meta["std"]
    else:
        init = resolve_init(path)
        if init.kind != "folder":
            raise ValueError(f"{model_dir}: embed needs a model folder or a run, not a {init.kind}")
        encoder = load_pretrained(init.path)
        if init.norm is not None:
            mean, std = init.norm
    encoder.eval()
    examples = _examples(list(inputs))
    # every file from its header before any is decoded (ssamba.data.check): an unusable one stops here, named
    check_splits({"input": examples}, skip_bad=skip_bad, log=None, hint="pass --skip-bad")
    limit = encoder.config.input_tdim
    ds = AudioDataset(examples, target_length=None, mean=mean, std=std, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate)
    s = encoder.num_special_tokens
    pooled, tokens, files, cut = [], {}, [], 0
    for batch in loader:
        if batch["features"].numel() == 0:
            continue
        x, lengths = batch["features"][:, :limit], batch["lengths"].clamp(max=limit)
        cut += int((batch["lengths"] > limit).sum())
        hidden, token_lengths = encoder.extract_features(x, lengths)
        final, _ = encoder.forward_features(x, lengths)
        stack = torch.stack([*hidden, final], dim=1)  # (B, L + 1, K, C)
        valid = lengths_to_mask(token_lengths, stack.shape[2])
        valid[:, :s] = False
        if pool == "mean":
            w = valid.float() / valid.sum(1, keepdim=True)
            pooled.append(torch.einsum("blkc,bk->blc", stack, w))
        else:
            for row in range(stack.shape[0]):
                tokens[f"clip{len(files) + row}"] = stack[row, :, : int(token_lengths[row])].contiguous()
        files.extend(str(examples[i].path) for i in batch["indices"].tolist())
    if not files:
        raise ValueError("no usable audio file to embed")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix in (".npy", ".safetensors") else out
    if pool == "mean":
        array = torch.cat(pooled).float()
        if fmt == "npy":
            np.save(stem.with_suffix(".npy"), array.numpy())
        else:
            from safetensors.torch import save_file

            save_file({"layers": array}, str(stem.with_suffix(".safetensors")))
    else:
        from safetensors.torch import save_file

        save_file(tokens, str(stem.with_suffix(".safetensors")))
    summary = {"model": str(model_dir), "pool": pool, "format": fmt, "layers": len(hidden) + 1,
               "last_is_final_norm": True, "width": encoder.config.embed_dim, "mean": mean, "std": std,
               "files": files, "cut_to_input_tdim": cut, "skipped": len(ds.skipped)}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
