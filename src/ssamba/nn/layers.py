"""Small building blocks shared by the Mamba and transformer encoders: stochastic depth and helpers for
right-padded batches.

Shape glossary
    B  batch        L  sequence length (tokens)        ...  any trailing dimensions

Padding convention used throughout ssamba: item b's valid elements are ``x[b, :lengths[b]]`` and the
rest is padding whose values are arbitrary (but finite).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DropPath", "lengths_to_mask", "reverse_padded"]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), as timm's ``DropPath``: in training, zero a
    residual branch for a random subset of batch items and rescale the kept ones by 1/keep_prob."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one draw per batch item
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) valid lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def reverse_padded(x: Tensor, lengths: Tensor | None, dim: int = 1) -> Tensor:
    """Reverse the valid part of each item along ``dim`` and leave the padding where it is.

    x: (B, ..., L, ...) with the sequence along ``dim``; lengths: (B,) or None (no padding: plain flip).
    A plain ``flip`` would move the padding to the front, so a causal scan over the flipped sequence
    would read padding before the item's last valid element. This reordering is its own inverse.
    """
    if lengths is None:
        return x.flip(dim)
    dim = dim % x.dim()
    seq_len = x.shape[dim]
    pos = torch.arange(seq_len, device=x.device)[None, :]  # (1, L)
    lengths = lengths.to(x.device)[:, None]  # (B, 1)
    index = torch.where(pos < lengths, lengths - 1 - pos, pos)  # (B, L)
    view = [1] * x.dim()
    view[0], view[dim] = x.shape[0], seq_len
    return torch.gather(x, dim, index.view(view).expand_as(x))
