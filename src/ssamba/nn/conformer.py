"""Conformer block (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for Speech Recognition",
Sec. 2) with a selectable sequence mixer, padding-correct for right-padded batches.

    x = x + 1/2 FFN(x)           (macaron half-step feed-forward; left out when use_ffn=False)
    x = x + Mixer(LN(x))         ("attention": multi-head self-attention; "extbimamba": ExtBiMamba, the
                                  ConBiMamba of Mamba-HuBERT, Zhang et al. 2025 Sec. 2.2)
    x = x + ConvModule(x)
    x = x + 1/2 FFN(x)
    y = LN(x)

Shape glossary
    B  batch      L  sequence length (frames)      C  model dim      K  depthwise kernel width

Padding: every step is per frame except the mixer (which takes ``lengths``) and the depthwise convolution,
whose input is zeroed past each item's length, so a valid frame sees exactly what it would see if the item
were alone (the convolution's own zero padding). The paper's BatchNorm in the convolution module is replaced
by a LayerNorm over channels: batch statistics would mix padding and other items into every frame.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.nn.attention import Attention
from ssamba.nn.layers import lengths_to_mask
from ssamba.nn.mamba import ExtBiMamba

__all__ = ["CONFORMER_MIXERS", "ConformerBlock", "ConformerConvModule", "FeedForward"]

CONFORMER_MIXERS = ("attention", "extbimamba")


def _zero_padding(x: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        return x
    return x.masked_fill(~lengths_to_mask(lengths, x.shape[1])[..., None], 0.0)


class FeedForward(nn.Module):
    """LN -> Linear(C, hidden) -> SiLU -> dropout -> Linear(hidden, C) -> dropout (Conformer FFN module)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.silu(self.fc1(self.norm(x))))))


class ConformerConvModule(nn.Module):
    """LN -> pointwise conv (2C) + GLU -> depthwise conv (K) -> LN -> SiLU -> pointwise conv -> dropout."""

    def __init__(self, dim: int, kernel_size: int = 31, dropout: float = 0.0):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conformer depthwise kernel_size must be odd (same-length output), got {kernel_size}")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x (B, L, C), lengths (B,) or None -> (B, L, C)."""
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)  # (B, L, C)
        h = _zero_padding(h, lengths)  # padding must not leak into valid frames through the kernel
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)  # (B, L, C)
        h = F.silu(self.conv_norm(h))
        return self.drop(self.pointwise_out(h))


class ConformerBlock(nn.Module):
    """One Conformer block, (B, L, C) -> (B, L, C), mixer ``"attention"`` or ``"extbimamba"``."""

    def __init__(
        self,
        dim: int,
        mixer: str = "attention",
        *,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        use_ffn: bool = True,
        kernel_size: int = 31,
        dropout: float = 0.0,
        combine: str = "add",
        **mamba_kwargs,
    ):
        super().__init__()
        if mixer not in CONFORMER_MIXERS:
            raise ValueError(f"conformer mixer must be one of {CONFORMER_MIXERS}, got {mixer!r}")
        hidden = 4 * dim if ffn_dim is None else ffn_dim
        self.ffn1 = FeedForward(dim, hidden, dropout) if use_ffn else None
        self.ffn2 = FeedForward(dim, hidden, dropout) if use_ffn else None
        self.mixer_norm = nn.LayerNorm(dim)
        if mixer == "attention":
            self.mixer = Attention(dim, num_heads, proj_drop=dropout, impl="sdpa")
        else:
            self.mixer = ExtBiMamba(dim, combine=combine, **mamba_kwargs)
        self.mixer_drop = nn.Dropout(dropout)
        self.conv = ConformerConvModule(dim, kernel_size, dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x (B, L, C), lengths (B,) or None -> (B, L, C)."""
        if self.ffn1 is not None:
            x = x + 0.5 * self.ffn1(x)
        h = self.mixer_norm(x)
        h = self.mixer(h, lengths)  # attention and Mamba mixers alike: forward(x, lengths)
        x = x + self.mixer_drop(h)
        x = x + self.conv(x, lengths)
        if self.ffn2 is not None:
            x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)
