"""HuBERT masked prediction (Hsu et al. 2021, Sec. II; fairseq ``HubertModel`` / ``HubertCriterion``): span masks,
cosine-similarity logits against learned cluster embeddings, masked (and optionally unmasked) cross-entropy,
the CNN feature penalty, and masked / unmasked prediction accuracy.

Shape glossary
    B  batch      T  frames (50 Hz)      C  encoder width      D  final_dim (256)      K  clusters
    Cc CNN channels

Targets are cluster indices per frame at the model's frame rate (``-100`` = no target: padding); labels made
at 100 Hz are brought to 50 Hz by :func:`downsample_labels` (every second label, fairseq ``forward_targets``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.hubert import HuBERTModel

__all__ = ["IGNORE", "HuBERTOutput", "HuBERTPretraining", "downsample_labels", "span_mask"]

IGNORE = -100  # target of frames without a label (padding)


def span_mask(frame_lengths: Tensor, max_len: int, mask_prob: float = 0.8, span: int = 10, min_masks: int = 2,
              generator: torch.Generator | None = None, same_count: bool = True) -> Tensor:
    """HuBERT's span mask (fairseq ``compute_mask_indices``, mask_selection "static", no_mask_overlap False).

    Per item of valid length L: ``n = int(mask_prob * L / span + u)``, u ~ U[0, 1) (probabilistic rounding),
    at least ``min_masks``; n distinct span starts drawn uniformly from [0, L - span]; each start masks
    ``span`` frames; spans may overlap (so the masked fraction is below mask_prob: about
    1 - (1 - span / L)^n, ~0.55 for the defaults). With ``same_count`` (fairseq require_same_masks), every
    item keeps a random subset of its masked frames of the batch's smallest count, so items have equal
    numbers of masked frames. Returns (B, max_len) bool, True = masked; padding is never masked.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if span < 1:
        raise ValueError(f"mask span must be >= 1, got {span}")
    batch = frame_lengths.shape[0]
    mask = torch.zeros(batch, max_len, dtype=torch.bool)
    if mask_prob == 0.0:
        return mask
    for b, length in enumerate(frame_lengths.tolist()):
        width = min(span, length)
        starts_range = length - width + 1
        u = float(torch.rand((), generator=generator))
        n = max(int(mask_prob * length / span + u), min_masks)
        n = min(n, starts_range)
        starts = torch.randperm(starts_range, generator=generator)[:n]  # distinct starts
        idx = (starts[:, None] + torch.arange(width)[None, :]).reshape(-1)
        mask[b, idx] = True
    if same_count and batch > 1:
        counts = mask.sum(1)
        keep = int(counts.min())
        for b in range(batch):
            if int(counts[b]) > keep:
                on = mask[b].nonzero().squeeze(1)
                drop = on[torch.randperm(on.numel(), generator=generator)[: on.numel() - keep]]
                mask[b, drop] = False
    return mask


def downsample_labels(labels: Tensor, label_rate: float, frame_rate: float, num_frames: int) -> Tensor:
    """(B, T_label) targets at ``label_rate`` -> (B, num_frames) at ``frame_rate``: frame t takes label
    round-down(t * label_rate / frame_rate) (fairseq ``forward_targets``); IGNORE beyond the labels."""
    ratio = label_rate / frame_rate
    idx = (torch.arange(num_frames, dtype=torch.float64) * ratio).long()  # (T,)
    out = torch.full((labels.shape[0], num_frames), IGNORE, dtype=torch.long, device=labels.device)
    ok = idx < labels.shape[1]
    out[:, ok] = labels[:, idx[ok].to(labels.device)]
    return out


@dataclass
class HuBERTOutput:
    loss: Tensor  # () masked_weight * ce_m + unmasked_weight * ce_u + feature_pen_weight * pen
    loss_m: Tensor  # () mean cross-entropy over masked frames with a target
    loss_u: Tensor  # () mean cross-entropy over unmasked frames with a target
    feature_pen: Tensor  # () mean squared CNN feature
    acc_m: Tensor  # () masked prediction accuracy
    acc_u: Tensor  # () unmasked prediction accuracy
    n_masked: int
    n_unmasked: int


class HuBERTPretraining(nn.Module):
    """The HuBERT objective around a :class:`HuBERTModel`: ``final_proj`` (C -> D) and cluster embeddings
    (K, D); logits = cos(final_proj(h_t), e_k) / logit_temp (fairseq ``compute_nce`` with the target among
    all K codes, which is a softmax over the K cosine logits)."""

    def __init__(self, model: HuBERTModel, num_classes: int, final_dim: int = 256, logit_temp: float = 0.1,
                 masked_weight: float = 1.0, unmasked_weight: float = 0.0, feature_pen_weight: float = 10.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.num_classes = num_classes
        self.logit_temp = logit_temp
        self.masked_weight, self.unmasked_weight = masked_weight, unmasked_weight
        self.feature_pen_weight = feature_pen_weight
        self.final_proj = nn.Linear(model.config.embed_dim, final_dim)
        self.label_embs = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())  # fairseq init

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., C) -> (..., K) cosine logits / temperature."""
        proj = F.normalize(self.final_proj(hidden).float(), dim=-1, eps=1e-8)
        embs = F.normalize(self.label_embs.float(), dim=-1, eps=1e-8)
        return proj @ embs.t() / self.logit_temp

    def forward(self, waveforms: Tensor, lengths: Tensor, targets: Tensor, mask: Tensor) -> HuBERTOutput:
        """waveforms (B, S), lengths (B,) samples, targets (B, T) frame targets (IGNORE where none; longer
        target rows are cut to T), mask (B, T) bool from :func:`span_mask`."""
        feats, frame_lengths = self.model.cnn_features(waveforms, lengths)  # (B, T, Cc)
        t = feats.shape[1]
        if mask.shape != (feats.shape[0], t):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, frames) = {(feats.shape[0], t)}")
        if targets.shape[1] < t:
            raise ValueError(f"targets have {targets.shape[1]} frames, the model produces {t}")
        targets = targets[:, :t].to(feats.device)
        mask = mask.to(feats.device)
        pen = feats.float().pow(2).mean()
        _, hidden = self.model.encode(feats, frame_lengths, mask)  # (B, T, C)
        if frame_lengths is None:
            frame_lengths = torch.full((feats.shape[0],), t, device=feats.device)
        valid = torch.arange(t, device=feats.device)[None, :] < frame_lengths[:, None]  # (B, T)
        has_target = valid & (targets != IGNORE)
        sel_m, sel_u = has_target & mask, has_target & ~mask
        zero = hidden.new_zeros(())
        out = {}
        for name, sel in (("m", sel_m), ("u", sel_u)):
            n = int(sel.sum())
            if n == 0:
                out[name] = (zero, zero, 0)
                continue
            logits = self.logits(hidden[sel])  # (n, K)
            tgt = targets[sel]
            ce = F.cross_entropy(logits, tgt)
            acc = (logits.argmax(-1) == tgt).float().mean()
            out[name] = (ce, acc.detach(), n)
        loss = self.feature_pen_weight * pen
        if self.masked_weight:
            loss = loss + self.masked_weight * out["m"][0]
        if self.unmasked_weight:
            loss = loss + self.unmasked_weight * out["u"][0]
        return HuBERTOutput(loss=loss, loss_m=out["m"][0].detach(), loss_u=out["u"][0].detach(),
                            feature_pen=pen.detach(), acc_m=out["m"][1], acc_u=out["u"][1],
                            n_masked=out["m"][2], n_unmasked=out["u"][2])
