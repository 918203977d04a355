"""ViT / DeiT transformer block as in timm 0.4.5 ``vision_transformer.Block`` (the SSAST backbone), with the
block signature every mixer of this package shares: ``forward(x, lengths)``, lengths (B,) the valid tokens of a
right-padded batch (None: no padding); padded keys are masked out of every query's attention.

Shape glossary
    B  batch       N  tokens        C  embed dim        H  heads        Dh  head dim = C / H

Attention implementations:
    "explicit" - ``softmax(q k^T * Dh^-0.5) v`` written out, the published computation; reproduces the
                 official SSAST numbers (default).
    "sdpa"     - ``torch.nn.functional.scaled_dot_product_attention`` (fused, less memory); equal to the
                 explicit path up to float rounding.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.nn.layers import DropPath, lengths_to_mask

__all__ = ["ATTENTION_IMPLS", "Attention", "Mlp", "TransformerBlock"]

ATTENTION_IMPLS = ("explicit", "sdpa")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention``): (B, N, C) -> (B, N, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "explicit",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x (B, N, C); lengths (B,) valid tokens per item, or None -> (B, N, C)."""
        b, n, c = x.shape
        key_mask = None if lengths is None else lengths_to_mask(lengths, n)  # (B, N), True = a real token
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh) each
        if self.impl == "sdpa":
            mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
            if key_mask is not None:
                attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, as timm) -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + drop_path(attn(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "explicit",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, impl=attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x (B, N, C); lengths (B,) or None -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), lengths))
        return x + self.drop_path(self.mlp(self.norm2(x)))
