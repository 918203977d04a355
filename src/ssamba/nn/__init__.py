"""Neural-network building blocks: Mamba mixers, transformer blocks, patch embedding, padding helpers."""

from ssamba.nn.attention import Attention, Mlp, TransformerBlock
from ssamba.nn.conformer import ConformerBlock
from ssamba.nn.layers import DropPath, lengths_to_mask, reverse_padded
from ssamba.nn.mamba import ExtBiMamba, InnerBiMamba, Mamba
from ssamba.nn.patch import PatchEmbed, official_resize_pos_embed

__all__ = [
    "Attention",
    "ConformerBlock",
    "DropPath",
    "ExtBiMamba",
    "InnerBiMamba",
    "Mamba",
    "Mlp",
    "PatchEmbed",
    "TransformerBlock",
    "lengths_to_mask",
    "official_resize_pos_embed",
    "reverse_padded",
]
