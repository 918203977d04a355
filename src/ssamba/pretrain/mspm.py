"""Masked spectrogram patch modelling (MSPM, Gong et al. 2022 "SSAST", Sec. 2.2; reused by SSAMBA).

The objective wraps an encoder; the encoder knows nothing of masking. One training step is the official
``pretrain_joint`` two-pass structure (``traintest_mask.py``): a discriminative pass (``mpc``: masked
patch classification, InfoNCE against the other masked patches of the same clip) and a separate
generative pass (``mpg``: masked patch reconstruction, MSE) with its own mask, loss = nce + 10 * mse.
Mask indices are explicit arguments (a mask generator lives elsewhere).

Shape glossary
    B  batch      N  patches per item (packed, see ssamba.models.spectrogram)      C  embed dim
    M  masked patches per item (mask_patch)       P  values per patch = fshape * tshape (256)
    S  special tokens of the encoder (1 SSAMBA, 2 SSAST)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.io import load_pretrained
from ssamba.models.spectrogram import SpectrogramEncoder

__all__ = ["MPCResult", "MPGResult", "MSPMOutput", "MaskedPatchPretraining"]

HEADS_FILE = "mspm.safetensors"
NCE_ORIENTATIONS = ("official", "paper")


@dataclass
class MPCResult:
    acc: Tensor  # () fraction of masked patches whose prediction picks the right patch
    nce: Tensor  # () InfoNCE loss
    pred: Tensor  # (B, M, P) cpredlayer outputs


@dataclass
class MPGResult:
    mse: Tensor  # () reconstruction loss
    pred: Tensor  # (B, M, P) gpredlayer outputs


@dataclass
class MSPMOutput:
    loss: Tensor  # () nce + mpg_weight * mse
    acc: Tensor
    nce: Tensor
    mse: Tensor


def _pred_layer(dim: int, out: int) -> nn.Sequential:
    # Official cpredlayer / gpredlayer: Linear-ReLU-Linear from token space to raw patch space.
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


class MaskedPatchPretraining(nn.Module):
    """MSPM heads around a :class:`SpectrogramEncoder`.

    Parameters carry the official names: ``mask_embed`` (1, 1, C), ``cpredlayer.{0,2}``,
    ``gpredlayer.{0,2}``; the encoder is ``encoder``. The prediction layers map to P = fshape*tshape
    values (the official code hard-codes 256, which is P for both its 16x16 and 128x2 patches).
    """

    def __init__(self, encoder: SpectrogramEncoder, nce_orientation: str = "official"):
        super().__init__()
        if nce_orientation not in NCE_ORIENTATIONS:
            raise ValueError(f"nce_orientation must be one of {NCE_ORIENTATIONS}, got {nce_orientation!r}")
        c = encoder.config
        self.encoder = encoder
        # "official": softmax over predictions for each true patch (upstream code); "paper": softmax over the
        # true patches for each prediction (SSAST paper eq. 1, InfoNCE with the other masked patches as negatives)
        self.nce_orientation = nce_orientation
        patch_dim = c.fshape * c.tshape
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        nn.init.xavier_normal_(self.mask_embed)  # learnable mask token, following BEiT (official comment)
        self.cpredlayer = _pred_layer(c.embed_dim, patch_dim)
        self.gpredlayer = _pred_layer(c.embed_dim, patch_dim)

    def _masked_pass(self, x: Tensor, mask_index: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Encode with the patches at ``mask_index`` replaced by ``mask_embed``.

        x (B, T, F), mask_index (B, M) positions in each item's packed patch sequence (special tokens not
        counted) -> (final tokens at the masked positions (B, M, C), their raw input patches (B, M, P)).
        """
        enc = self.encoder
        patches, patch_lengths = enc.embed_patches(x, lengths)  # (B, N, C), (B,)
        targets = enc.patch_targets(x, lengths)  # (B, N, P), from the normalised input
        mask_index = mask_index.to(device=patches.device, dtype=torch.long)
        if mask_index.dim() != 2 or mask_index.shape[0] != patches.shape[0]:
            raise ValueError(f"mask_index must be (batch={patches.shape[0]}, M), got {tuple(mask_index.shape)}")
        if bool((mask_index < 0).any()) or bool((mask_index >= patch_lengths[:, None]).any()):
            raise ValueError("mask_index holds positions outside an item's patches")
        masked = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        masked.scatter_(1, mask_index, True)
        # official: x * mask_dense + (1 - mask_dense) * mask_tokens (a select, value for value)
        patches = torch.where(masked[..., None], self.mask_embed.to(patches.dtype), patches)
        tokens, _ = enc.forward_patches(patches, patch_lengths)  # (B, K, C)
        picked = torch.gather(
            tokens, 1, (mask_index + enc.num_special_tokens)[..., None].expand(-1, -1, tokens.shape[-1])
        )  # (B, M, C)
        target = torch.gather(targets, 1, mask_index[..., None].expand(-1, -1, targets.shape[-1]))  # (B, M, P)
        return picked, target

    def mpc(self, x: Tensor, mask_index: Tensor, lengths: Tensor | None = None) -> MPCResult:
        """Discriminative pass (official ``mpc``).

        Per item: ``total = target @ pred^T`` (M, M; rows = true patches, columns = predictions);
        nce = -mean of diag(log_softmax(total, dim=-1)); a prediction j counts as correct when
        argmax over rows of softmax(total, dim=-1)[:, j] is j - the official orientation (row-wise
        softmax, column-wise argmax), kept as is.
        """
        picked, target = self._masked_pass(x, mask_index, lengths)
        return self._nce(self.cpredlayer(picked), target)

    def _nce(self, pred: Tensor, target: Tensor) -> MPCResult:
        """pred, target (B, M, P) -> InfoNCE over the M masked patches of each item."""
        total = torch.bmm(target, pred.transpose(1, 2))  # (B, M, M)
        m = total.shape[-1]
        if self.nce_orientation == "paper":
            log_p = F.log_softmax(total, dim=1)  # over true patches, per prediction (column)
            hits = torch.argmax(total, dim=1) == torch.arange(m, device=total.device)  # (B, M)
            nce = -torch.diagonal(log_p, dim1=-2, dim2=-1).mean()
            return MPCResult(acc=hits.sum().to(total.dtype) / hits.numel(), nce=nce, pred=pred)
        hits = torch.argmax(F.softmax(total, dim=-1), dim=1) == torch.arange(m, device=total.device)  # (B, M)
        acc = hits.sum().to(total.dtype) / hits.numel()
        # Sum each item's diagonal from a contiguous copy (as upstream's torch.diag(...).sum()) and
        # accumulate item by item (upstream ``nce += ...``): the float32 result is then bit-identical.
        per_item = torch.diagonal(F.log_softmax(total, dim=-1), dim1=-2, dim2=-1).contiguous().sum(dim=1)  # (B,)
        nce = per_item.new_zeros(())
        for item_sum in per_item:
            nce = nce + item_sum
        nce = nce / (-1.0 * hits.numel())
        return MPCResult(acc=acc, nce=nce, pred=pred)

    def mpg(self, x: Tensor, mask_index: Tensor, lengths: Tensor | None = None) -> MPGResult:
        """Generative pass (official ``mpg``): mse = mean((gpredlayer(tokens) - target patches)^2)."""
        picked, target = self._masked_pass(x, mask_index, lengths)
        pred = self.gpredlayer(picked)  # (B, M, P)
        return MPGResult(mse=torch.mean((pred - target) ** 2), pred=pred)

    def forward(
        self,
        x: Tensor,
        mpc_mask_index: Tensor,
        mpg_mask_index: Tensor | None,
        lengths: Tensor | None = None,
        mpg_weight: float = 10.0,
    ) -> MSPMOutput:
        """One pretraining step's losses: loss = nce + mpg_weight * mse (10 upstream).

        Official ``pretrain_joint``: two encoder passes with separate masks. ``mpg_mask_index=None`` runs a
        single pass: both heads read the same masked encoding (half the encoder cost).
        """
        if mpg_mask_index is None:
            picked, target = self._masked_pass(x, mpc_mask_index, lengths)
            c = self._nce(self.cpredlayer(picked), target)
            mse = torch.mean((self.gpredlayer(picked) - target) ** 2)
            return MSPMOutput(loss=c.nce + mpg_weight * mse, acc=c.acc, nce=c.nce, mse=mse)
        c = self.mpc(x, mpc_mask_index, lengths)
        g = self.mpg(x, mpg_mask_index, lengths)
        return MSPMOutput(loss=c.nce + mpg_weight * g.mse, acc=c.acc, nce=c.nce, mse=g.mse)

    def save_pretrained(self, directory: str | Path, card: dict | None = None) -> Path:
        """The encoder's ``save_pretrained`` files plus ``mspm.safetensors`` (mask_embed, c/gpredlayer)."""
        from safetensors.torch import save_file

        directory = self.encoder.save_pretrained(directory, card)
        heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        save_file(heads, str(directory / HEADS_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MaskedPatchPretraining:
        """Inverse of :meth:`save_pretrained` (safetensors only)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(load_pretrained(directory))
        model.load_state_dict(
            {
                **load_file(str(directory / HEADS_FILE)),
                **{"encoder." + k: v for k, v in model.encoder.state_dict().items()},
            }
        )
        return model
