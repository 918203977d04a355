"""Spectrogram patches: the patch-embedding convolution, the patch targets of masked patch modelling,
the packing of variable-length items, and the official position-embedding cut/interpolation.

Shape glossary
    B  batch         T  frames          F  mel bins (input_fdim)        C  embed dim
    fs, ts  patch size (frequency, time)        fst, tst  patch stride (frequency, time)
    Fg, Tg  patch grid (rows = frequency, columns = time)             P  = fs * ts (one flattened patch)
    S  number of special (cls / distillation) tokens                  N  patches per item (packed)

Patch order is frequency-major, as the official SSAST/SSAMBA code (Conv2d output ``flatten(2)``):
patch index = f * Tg + t. An item with fewer frames than the batch has fewer time columns; "packing"
gathers its valid patches to the front in the order the item alone would have (f * Tg_item + t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchEmbed", "grid_size", "official_resize_pos_embed", "pack_index", "patchify", "to_image"]


def grid_size(fdim: int, tdim: int, fshape: int, tshape: int, fstride: int, tstride: int) -> tuple[int, int]:
    """Patch grid (Fg, Tg) of an (fdim x tdim) spectrogram: what ``AMBAModel/ASTModel.get_shape`` measures
    with a test convolution."""
    if fdim < fshape or tdim < tshape:
        raise ValueError(f"input {fdim}x{tdim} (freq x time) is smaller than one {fshape}x{tshape} patch")
    return (fdim - fshape) // fstride + 1, (tdim - tshape) // tstride + 1


def to_image(x: Tensor) -> Tensor:
    """(B, T, F) fbank -> (B, 1, F, T), as the official ``x.unsqueeze(1).transpose(2, 3)``."""
    return x.unsqueeze(1).transpose(2, 3)


class PatchEmbed(nn.Module):
    """Linear patch projection as a Conv2d over (freq, time): (B, T, F) -> (B, C, Fg, Tg).
    One input channel; 16x16 patches with a configurable stride, or 128x2 frame patches."""

    def __init__(self, embed_dim: int, fshape: int, tshape: int, fstride: int, tstride: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=(fshape, tshape), stride=(fstride, tstride))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(to_image(x))


def patchify(x: Tensor, fshape: int, tshape: int, fstride: int, tstride: int) -> Tensor:
    """(B, T, F) -> (B, Fg*Tg, P): every patch of the (normalised) input flattened freq-row-major, in patch
    order; the targets of masked patch modelling (the official ``nn.Unfold`` on the input)."""
    return F.unfold(to_image(x), kernel_size=(fshape, tshape), stride=(fstride, tstride)).transpose(1, 2)


def pack_index(t_valid: Tensor, f_grid: int, t_grid: int) -> Tensor:
    """Gather index that packs each item's valid patches to the front.

    t_valid: (B,) valid time columns per item; source layout: f_grid rows of t_grid columns.
    Returns (B, Nmax) long, Nmax = f_grid * max(t_valid): position p < f_grid * t_valid[b] takes source
    patch (p // t_valid[b]) * t_grid + p % t_valid[b]; later positions (padding) take source p, any
    in-range index would do.
    """
    t_valid = t_valid.to(torch.long)
    n_max = f_grid * int(t_valid.max())
    pos = torch.arange(n_max, device=t_valid.device)[None, :]  # (1, Nmax)
    tv = t_valid[:, None]  # (B, 1)
    valid = torch.div(pos, tv, rounding_mode="floor") * t_grid + pos % tv
    return torch.where(pos < f_grid * tv, valid, pos.clamp(max=f_grid * t_grid - 1))


def official_resize_pos_embed(
    pos_embed: Tensor, num_special: int, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> Tensor:
    """Adapt a learned position embedding to a new patch grid exactly as the official fine-tuning
    constructor does (``ASTModel/AMBAModel.__init__``, ``pretrain_stage=False``).

    pos_embed: (1, S + Fs*Ts, C), src_grid (Fs, Ts), dst_grid (Fd, Td) -> (1, S + Fd*Td, C).
    Special-token rows are kept. Time first: if Td < Ts a centre cut, else bilinear interpolation to
    (8, Td) - the 8 is hard-coded upstream (it equals Fs for 128 mel bins and 16-row patches). Then
    frequency: if Fd < Fs a centre cut whose upper bound upstream adds Td instead of Fd (an upstream bug,
    only correct when Td == Fd), else bilinear interpolation to (Fd, Td). Same-size bilinear = identity.
    """
    (fs, ts), (fd, td) = src_grid, dst_grid
    c = pos_embed.shape[-1]
    special = pos_embed[:, :num_special].detach()
    grid = pos_embed[:, num_special:].detach().reshape(1, fs * ts, c).transpose(1, 2).reshape(1, c, fs, ts)
    if td < ts:
        start = ts // 2 - td // 2
        grid = grid[:, :, :, start : start + td]
    else:
        grid = F.interpolate(grid, size=(8, td), mode="bilinear")
    if fd < fs:
        start = fs // 2 - fd // 2
        grid = grid[:, :, start : start + td, :]  # sic: "+ t_dim" upstream
    else:
        grid = F.interpolate(grid, size=(fd, td), mode="bilinear")
    if tuple(grid.shape[-2:]) != (fd, td):
        raise ValueError(
            f"the official position-embedding conversion from grid {src_grid} to {dst_grid} yields "
            f"{tuple(grid.shape[-2:])} (it cuts frequency rows with the time size), so the official code "
            "cannot build this model either"
        )
    grid = grid.reshape(1, c, fd * td).transpose(1, 2)
    return torch.cat([special, grid], dim=1)
