"""Spectrogram patch encoders: SSAMBA (bidirectional Mamba, Shams et al. 2024) and SSAST (ViT/DeiT,
Gong et al. 2022), with optional classification heads, presets, and safetensors checkpoints.

Both mirror the official code (SiavashShams/ssamba ``AMBAModel``, YuanGongND/ssast ``ASTModel``):
fbank (B, T, F) -> Conv2d patches in frequency-major order -> [special tokens, patches] + learned
absolute position embedding -> backbone -> final norm -> pooling head (``avgtok`` or ``cls``).

* SSAMBA backbone (``AMBAModel.finetuningavgtok`` loop over Vim ``Block``s): layers run in pairs over the
  same input; the second layer of a pair sees the reversed sequence (cls token included) and its
  outputs are reversed back and summed with the first's, hidden and residual alike (so the residual
  stream doubles per pair, as upstream). Block = Add -> LayerNorm -> InnerBiMamba (Vim bimamba v2).
  After the last pair: ``norm_f(residual + hidden)``, then ``norm_f`` once more (upstream applies the
  same LayerNorm twice).
* SSAST backbone (timm 0.4.5 DeiT-distilled): [cls, dist] tokens, pre-norm transformer blocks
  (LayerNorm eps 1e-6), one final ``norm``.

Shape glossary
    B  batch       T  frames        F  mel bins       C  embed dim       S  special tokens (1 or 2)
    Fg, Tg  patch grid (frequency rows, time columns)     N  patches per item (Fg * Tg_item, packed)
    K  tokens = S + N        Q  classes

Variable lengths: ``lengths`` (B,) are valid frame counts of right-padded fbank batches. Item b has
``(lengths[b] - tshape) // tstride + 1`` time columns; its patches are packed to the front of the token
axis in the order the item alone would have, so ``tokens[b, :token_lengths[b]]`` equals the item run
alone (position embedding columns are taken from the left of the configured grid). Padding never reaches
valid tokens: Mamba scans are causal over valid-part-reversed sequences, attention masks padded keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssamba.fields import typed_fields
from ssamba.models.io import load_pretrained, save_model_folder
from ssamba.models.registry import register_family, register_model
from ssamba.nn.attention import ATTENTION_IMPLS, TransformerBlock
from ssamba.nn.layers import DropPath, lengths_to_mask, reverse_padded
from ssamba.nn.mamba import InnerBiMamba
from ssamba.nn.patch import PatchEmbed, grid_size, official_resize_pos_embed, pack_index, patchify

__all__ = [
    "POOLS",
    "ClassifierHead",
    "SSAMBAConfig",
    "SSAMBAModel",
    "SSASTConfig",
    "SSASTModel",
    "SpectrogramEncoder",
    "pool_tokens",
]

POOLS = ("avgtok", "cls")


# ------------------------------------------------------------------------------------------------ configs


@dataclass
class SpectrogramConfig:
    """Fields shared by both families. Build from a dict with ``from_dict`` (unknown keys are errors)."""

    # mel bins of the input fbank (the official input_fdim)
    input_fdim: int = 128
    # frames the position embedding is laid out for; the longest accepted input (official input_tdim)
    input_tdim: int = 1024
    # patch height (frequency) and width (time): 16x16 patches, or 128x2 frame tokens
    fshape: int = 16
    tshape: int = 16
    # patch stride; equal to the patch size in pretraining, smaller (overlap) in official fine-tuning
    fstride: int = 16
    tstride: int = 16
    # token width
    embed_dim: int = 192
    # number of layers (SSAMBA: Vim blocks, run as forward/backward pairs; SSAST: transformer blocks)
    depth: int = 12
    # dropout after adding the position embedding (official pos_drop; 0 in every official recipe)
    drop_rate: float = 0.0
    # stochastic-depth rate of the last layer; earlier layers get a linear ramp
    drop_path_rate: float = 0.0
    # classifier outputs; 0 = encoder only (no head)
    num_classes: int = 0
    # clip-level pooling of the head: "avgtok" (mean of patch tokens) or "cls" (mean of special tokens)
    pool: str = "avgtok"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        for name in ("fshape", "tshape", "fstride", "tstride", "embed_dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        grid_size(self.input_fdim, self.input_tdim, self.fshape, self.tshape, self.fstride, self.tstride)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        return cls(**typed_fields(cls, values, cls.__name__))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def grid(self) -> tuple[int, int]:
        """(Fg, Tg) patch grid of an input of ``input_tdim`` frames."""
        return grid_size(self.input_fdim, self.input_tdim, self.fshape, self.tshape, self.fstride, self.tstride)


@dataclass
class SSAMBAConfig(SpectrogramConfig):
    """SSAMBA: Vim (bimamba v2) encoder as configured by SSAMBA's run scripts."""

    # Vim layers; must be even (consecutive layers form a forward/backward pair)
    depth: int = 24
    # SSM state size N per channel (Vim default)
    d_state: int = 16
    # causal depthwise conv kernel width
    d_conv: int = 4
    # d_inner = expand * embed_dim
    expand: int = 2
    # rank of the delta projection; None = ceil(embed_dim / 16) as mamba_ssm's "auto"
    dt_rank: int | None = None
    # LayerNorm eps of the blocks and norm_f (Vim norm_epsilon)
    norm_eps: float = 1e-5
    # halve the sum of the two scan directions before out_proj (Vim if_devide_out=True)
    divide_out: bool = True
    # SSAMBA scripts use drop_path_rate 0.1
    drop_path_rate: float = 0.1
    # execution, not architecture: layout-optimised projections and the automatic scan backend (True), or the
    # official operation order and the reference scan, bit for bit (False: `ssamba conformance`); see nn/mamba.py
    fast_path: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth % 2:
            raise ValueError(f"SSAMBA depth must be even (layers run in forward/backward pairs), got {self.depth}")


@dataclass
class SSASTConfig(SpectrogramConfig):
    """SSAST: DeiT encoder (timm 0.4.5 ``vit_deit_*_distilled``) as used by ``ASTModel``."""

    # attention heads (DeiT tiny/small/base: 3/6/12)
    num_heads: int = 3
    # MLP hidden width = mlp_ratio * embed_dim
    mlp_ratio: float = 4.0
    # bias on the fused qkv projection (timm DeiT: True)
    qkv_bias: bool = True
    # LayerNorm eps inside blocks and of the final norm (timm ViT: 1e-6)
    norm_eps: float = 1e-6
    # special tokens: 2 = cls + distillation token (DeiT distilled, official tiny/small/base), 1 = cls only
    # (official base_nokd)
    num_cls_tokens: int = 2
    # dropout on attention probabilities (timm default 0)
    attn_drop_rate: float = 0.0
    # "explicit" (published softmax(QK^T)V, reproduces official numbers) or "sdpa" (fused kernel)
    attn_impl: str = "explicit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_cls_tokens not in (1, 2):
            raise ValueError(f"num_cls_tokens must be 1 or 2, got {self.num_cls_tokens}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got {self.attn_impl!r}")


# ------------------------------------------------------------------------------------------------- heads


class ClassifierHead(nn.Module):
    """Official ``mlp_head``: LayerNorm (eps 1e-5, PyTorch default) -> Linear. (B, C) -> (B, Q)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


def pool_tokens(tokens: Tensor, token_lengths: Tensor | None, num_special: int, mode: str) -> Tensor:
    """Clip-level vector from final tokens (B, K, C) -> (B, C).

    "avgtok": mean of the valid patch tokens (``finetuningavgtok``: ``x[:, S:].mean(1)``);
    "cls": mean of the special tokens - the cls token for SSAMBA, ``(cls + dist) / 2`` for DeiT
    (``finetuningcls``).
    """
    if mode == "cls":
        return tokens[:, :num_special].mean(dim=1)
    if mode != "avgtok":
        raise ValueError(f"pool must be one of {POOLS}, got {mode!r}")
    if token_lengths is None or bool((token_lengths == tokens.shape[1]).all()):
        return tokens[:, num_special:].mean(dim=1)
    # per item, so that a padded item averages exactly the tokens it has alone
    return torch.stack([tokens[b, num_special:n].mean(dim=0) for b, n in enumerate(token_lengths.tolist())])


# ------------------------------------------------------------------------------------------ shared encoder


class SpectrogramEncoder(nn.Module):
    """Patch embedding, special tokens, position embedding, optional head; subclasses add the backbone.

    Public API: ``extract_features``, ``forward_features``, ``forward_head``, ``forward``, and the
    pieces a pretraining objective needs (``embed_patches``, ``patch_targets``, ``forward_patches``),
    ``save_pretrained`` / ``from_pretrained``.
    """

    family: ClassVar[str]
    config_class: ClassVar[type[SpectrogramConfig]]
    # what extract_features takes: normalised fbank (B, T, F) here; waveform models (HuBERT) say "waveform"
    input_kind: ClassVar[str] = "fbank"
    num_special_tokens: int

    def __init__(self, config: SpectrogramConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.embed_dim, c.fshape, c.tshape, c.fstride, c.tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        f_grid, t_grid = c.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_special_tokens + f_grid * t_grid, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.head = ClassifierHead(c.embed_dim, c.num_classes) if c.num_classes > 0 else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # -- subclass hooks
    def special_tokens(self, batch: int) -> Tensor:
        """(B, S, C) tokens prepended to the patches."""
        return self.cls_token.expand(batch, -1, -1)

    def _backbone(self, tokens: Tensor, lengths: Tensor | None, keep_layers: bool) -> tuple[list[Tensor], Tensor]:
        """tokens (B, K, C), lengths (B,) or None (no padding) -> (per-layer outputs, or [] without
        ``keep_layers``; final tokens)."""
        raise NotImplementedError

    # -- input side
    def _time_columns(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate (B, T, F) input; returns x cut to the longest item and valid time columns per item."""
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.input_fdim:
            raise ValueError(f"expected fbank of shape (batch, frames, {c.input_fdim}), got {tuple(x.shape)}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device).to(torch.long)
            if lengths.shape != (x.shape[0],):
                raise ValueError(f"lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
            if int(lengths.max()) > x.shape[1]:
                raise ValueError(f"a length ({int(lengths.max())}) exceeds the input's {x.shape[1]} frames")
            x = x[:, : int(lengths.max())]
        else:
            lengths = torch.full((x.shape[0],), x.shape[1], device=x.device, dtype=torch.long)
        if int(lengths.min()) < c.tshape:
            raise ValueError(f"every item needs at least tshape={c.tshape} frames, got {int(lengths.min())}")
        if int(lengths.max()) > c.input_tdim:
            raise ValueError(
                f"input of {int(lengths.max())} frames exceeds input_tdim={c.input_tdim} (the position embedding)"
            )
        return x, torch.div(lengths - c.tshape, c.tstride, rounding_mode="floor") + 1

    def embed_patches(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fbank (B, T, F), frame lengths (B,) -> packed patch embeddings (B, N, C), patch counts (B,)."""
        x, t_valid = self._time_columns(x, lengths)
        grid = self.patch_embed(x)  # (B, C, Fg, Tg)
        f_grid, t_grid = grid.shape[-2:]
        tokens = grid.flatten(2).transpose(1, 2)  # (B, Fg*Tg, C), frequency-major
        if bool((t_valid == t_grid).all()):
            return tokens, t_valid * f_grid
        index = pack_index(t_valid, f_grid, t_grid)  # (B, N)
        return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1])), t_valid * f_grid

    def patch_targets(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """fbank (B, T, F) -> raw patches (B, N, fshape*tshape), packed like ``embed_patches``."""
        c = self.config
        x, t_valid = self._time_columns(x, lengths)
        patches = patchify(x, c.fshape, c.tshape, c.fstride, c.tstride)  # (B, Fg*Tg, P)
        f_grid = c.grid[0]
        t_grid = patches.shape[1] // f_grid
        if bool((t_valid == t_grid).all()):
            return patches
        index = pack_index(t_valid, f_grid, t_grid)
        return torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))

    def _add_tokens(self, patches: Tensor, patch_lengths: Tensor) -> Tensor:
        """[special, patches] + position embedding: (B, N, C) -> (B, K, C) (official ``cat`` + ``pos_embed``)."""
        s = self.num_special_tokens
        f_grid, t_grid = self.config.grid
        t_valid = torch.div(patch_lengths, f_grid, rounding_mode="floor")
        index = pack_index(t_valid, f_grid, t_grid)  # (B, N) rows of the configured pos grid
        pos_patch = self.pos_embed[:, s:].expand(patches.shape[0], -1, -1)
        pos_patch = torch.gather(pos_patch, 1, index[..., None].expand(-1, -1, patches.shape[-1]))
        pos = torch.cat([self.pos_embed[:, :s].expand(patches.shape[0], -1, -1), pos_patch], dim=1)
        tokens = torch.cat([self.special_tokens(patches.shape[0]), patches], dim=1) + pos
        return self.pos_drop(tokens)

    def _encode(
        self, patches: Tensor, patch_lengths: Tensor | None, keep_layers: bool = False
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Packed patches (B, N, C) -> (per-layer outputs, final tokens (B, K, C), token lengths (B,)). The
        per-layer list is empty unless ``keep_layers``: holding every layer's (B, K, C) output until the end of the
        forward would cost depth x B x K x C of memory that only feature extraction needs."""
        if patch_lengths is None:
            patch_lengths = torch.full((patches.shape[0],), patches.shape[1], device=patches.device, dtype=torch.long)
        token_lengths = patch_lengths + self.num_special_tokens
        padded = not bool((token_lengths == patches.shape[1] + self.num_special_tokens).all())
        # The tokens are made inside the call so that only the backbone holds them (and can let them go).
        layers, final = self._backbone(self._add_tokens(patches, patch_lengths), token_lengths if padded else None,
                                       keep_layers)  # fmt: skip
        return layers, final, token_lengths

    # -- public forward API
    def forward_patches(self, patches: Tensor, patch_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Packed patch embeddings (B, N, C) (e.g. after masking) -> (final tokens (B, K, C), token lengths)."""
        _, final, token_lengths = self._encode(patches, patch_lengths)
        return final, token_lengths

    def extract_features(self, x: Tensor, lengths: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """fbank (B, T, F), valid frames (B,) or None -> (one (B, K, C) tensor per layer, token lengths (B,)).

        Per-layer outputs are the raw residual stream (before the final norm): for SSAMBA one entry per
        forward/backward layer pair (depth / 2 entries, residual + hidden after the pair), for SSAST one per
        block. The normalised final tokens come from ``forward_features``. Padding positions are zero.
        """
        layers, _, token_lengths = self._encode(*self.embed_patches(x, lengths), keep_layers=True)
        return [self._zero_padding(h, token_lengths) for h in layers], token_lengths

    def extract_features_with_final(self, x: Tensor, lengths: Tensor | None = None
                                    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """``extract_features`` and ``forward_features`` from one forward: (per-layer outputs, final normalised
        tokens (B, K, C), token lengths (B,)); padding positions are zero."""
        layers, final, token_lengths = self._encode(*self.embed_patches(x, lengths), keep_layers=True)
        return ([self._zero_padding(h, token_lengths) for h in layers], self._zero_padding(final, token_lengths),
                token_lengths)

    def forward_features(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fbank (B, T, F), valid frames (B,) or None -> (final normalised tokens (B, K, C), token lengths).
        Special tokens first, then patches frequency-major; padding positions are zero."""
        _, final, token_lengths = self._encode(*self.embed_patches(x, lengths))
        return self._zero_padding(final, token_lengths), token_lengths

    def forward_head(self, tokens: Tensor, token_lengths: Tensor | None = None, pool: str | None = None) -> Tensor:
        """Final tokens (B, K, C) -> logits (B, Q), or the pooled (B, C) vector when there is no head."""
        pooled = pool_tokens(tokens, token_lengths, self.num_special_tokens, pool or self.config.pool)
        return pooled if self.head is None else self.head(pooled)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """fbank (B, T, F), valid frames (B,) or None -> logits (B, Q) (pooled (B, C) without a head)."""
        return self.forward_head(*self.forward_features(x, lengths))

    @staticmethod
    def _zero_padding(h: Tensor, token_lengths: Tensor) -> Tensor:
        if bool((token_lengths == h.shape[1]).all()):
            return h
        return h.masked_fill(~lengths_to_mask(token_lengths, h.shape[1])[..., None], 0.0)

    # -- checkpoints
    def save_pretrained(self, directory: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` ({"family", "config"}), ``model.safetensors`` and the ``README.md`` model card
        (``card``: training command, config, metrics, source; see ``ssamba.models.hub``) into ``directory``."""
        return save_model_folder(self, directory, card)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> SpectrogramEncoder:
        """Load a ``save_pretrained`` folder, or a Hub repo id with ``huggingface_hub`` installed (safetensors
        only, nothing is unpickled).

        ``overrides`` change config fields: a new stride / input_tdim converts the position embedding with
        the official cut/interpolation; a different ``num_classes`` gets a freshly initialised head.
        """
        return load_pretrained(directory, expect=cls, **overrides)

    def load_adapted_state_dict(self, state: dict[str, Tensor], source: SpectrogramConfig) -> None:
        """Load weights saved from a model with config ``source`` into this model: the position embedding
        is converted to this model's grid (official method), a head of another shape (or none) is left as
        initialised, everything else must match exactly."""
        state = dict(state)
        if source.grid != self.config.grid:
            state["pos_embed"] = official_resize_pos_embed(
                state["pos_embed"], self.num_special_tokens, source.grid, self.config.grid
            )
        own = self.state_dict()
        head_keys = [k for k in state if k.startswith("head.")]
        if self.head is None or any(k not in own or own[k].shape != state[k].shape for k in head_keys):
            for k in head_keys:
                del state[k]
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(
                f"state dict does not fit {type(self).__name__}: missing {missing}, unexpected {unexpected}"
            )


# ------------------------------------------------------------------------------------------------- SSAMBA


class VimBlock(nn.Module):
    """Vim ``Block`` (non-fused): Add -> LayerNorm -> mixer; returns (mixer output, residual)."""

    def __init__(self, dim: int, mixer: nn.Module, norm_eps: float, drop_path: float):
        super().__init__()
        self.mixer = mixer
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden_states: Tensor, residual: Tensor | None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """hidden_states, residual (B, K, C) (residual None for the first layer) -> same shapes."""
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        return self.mixer(self.norm(residual), lengths), residual


class SSAMBAModel(SpectrogramEncoder):
    """SSAMBA encoder (+ optional head). State-dict keys follow the official ``v.*`` names without the
    ``v.`` prefix (``layers.{i}.mixer.A_log``, ``norm_f.weight``, ...); the head is ``head.norm/fc``."""

    family = "ssamba"
    config_class = SSAMBAConfig
    num_special_tokens = 1
    config: SSAMBAConfig

    def __init__(self, config: SSAMBAConfig):
        super().__init__(config)
        c = config
        # Vim's schedule: layer i gets ([0] + linspace(0, rate, depth))[i]; the final add uses the full rate.
        rates = [0.0] + torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.layers = nn.ModuleList(
            VimBlock(
                c.embed_dim,
                InnerBiMamba(
                    c.embed_dim,
                    divide_out=c.divide_out,
                    d_state=c.d_state,
                    d_conv=c.d_conv,
                    expand=c.expand,
                    dt_rank=c.dt_rank,
                    fast_path=c.fast_path,
                ),
                c.norm_eps,
                rates[i],
            )
            for i in range(c.depth)
        )
        self.drop_path = DropPath(c.drop_path_rate)
        self.norm_f = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        # Vim's _init_weights (GPT-2 scheme, one residual branch per layer): out_proj ~ default / sqrt(depth)
        with torch.no_grad():
            for layer in self.layers:
                layer.mixer.out_proj.weight.div_(math.sqrt(c.depth))

    def _backbone(self, tokens: Tensor, lengths: Tensor | None, keep_layers: bool) -> tuple[list[Tensor], Tensor]:
        hidden, residual = tokens, None
        del tokens  # the first pair's input is `hidden`; no other name may keep it alive past that pair
        outputs = []
        for i in range(0, len(self.layers), 2):
            first, second = self.layers[i], self.layers[i + 1]
            if not (self.training and (first.drop_path.drop_prob > 0 or second.drop_path.drop_prob > 0)):
                # Without stochastic depth the pair's two residual sums are one sum in two orders, bit for bit:
                # reverse(residual) + reverse(hidden) = reverse(residual + hidden), and reversing that back gives
                # residual + hidden again. So the second layer is handed the reversed first sum as its residual
                # (a block given residual None takes its input as the residual), and the pair's residual is that
                # sum twice: 3 reversals and 1 addition of (B, K, C) fewer than the loop below, same numbers.
                # Each (B, K, C) tensor is dropped as soon as it is dead, since an inference forward's peak memory
                # is its live set: the first layer's sum (residual + hidden, which drop_path leaves alone here) is
                # made before its block runs (handed to it as its input, with residual None) so that hidden and
                # residual die first, and the sum is let go during the second layer and got back afterwards by
                # reversing its reversal (a permutation: exact).
                residual_f = hidden if residual is None else residual + hidden
                del hidden, residual
                hidden_f = first(residual_f, None, lengths)[0]
                reversed_f = reverse_padded(residual_f, lengths)
                del residual_f
                hidden_b = second(reversed_f, None, lengths)[0]
                residual_f = reverse_padded(reversed_f, lengths)
                del reversed_f
                hidden = hidden_f + reverse_padded(hidden_b, lengths)
                del hidden_f, hidden_b
                residual = residual_f + residual_f
                del residual_f
                if keep_layers:
                    outputs.append(residual + hidden)
                continue
            # AMBAModel's pairing: both layers read the same state; the second one in reversed order.
            hidden_f, residual_f = self.layers[i](hidden, residual, lengths)
            hidden_b, residual_b = self.layers[i + 1](
                reverse_padded(hidden, lengths),
                None if residual is None else reverse_padded(residual, lengths),
                lengths,
            )
            hidden = hidden_f + reverse_padded(hidden_b, lengths)
            residual = residual_f + reverse_padded(residual_b, lengths)
            if keep_layers:
                outputs.append(residual + hidden)
        residual = residual + self.drop_path(hidden)
        hidden = self.norm_f(residual)
        return outputs, self.norm_f(hidden)  # norm_f twice, as AMBAModel's forward


# -------------------------------------------------------------------------------------------------- SSAST


class SSASTModel(SpectrogramEncoder):
    """SSAST encoder (+ optional head). Keys follow the official ``v.*`` names without ``v.``
    (``blocks.{i}.attn.qkv.weight``, ``norm.weight``, ``dist_token``, ...); the head is ``head.norm/fc``."""

    family = "ssast"
    config_class = SSASTConfig
    config: SSASTConfig

    def __init__(self, config: SSASTConfig):
        self.num_special_tokens = config.num_cls_tokens
        super().__init__(config)
        c = config
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.num_cls_tokens == 2 else None
        rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.embed_dim,
                c.num_heads,
                c.mlp_ratio,
                c.qkv_bias,
                c.drop_rate,
                c.attn_drop_rate,
                rates[i],
                c.norm_eps,
                c.attn_impl,
            )
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        # timm ViT init: Linear weights ~ trunc_normal(0.02), biases 0; tokens ~ trunc_normal(0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)

    def special_tokens(self, batch: int) -> Tensor:
        tokens = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        return torch.cat(tokens, dim=1).expand(batch, -1, -1)

    def _backbone(self, tokens: Tensor, lengths: Tensor | None, keep_layers: bool) -> tuple[list[Tensor], Tensor]:
        outputs = []
        x = tokens
        del tokens  # as SSAMBA's backbone: no second name keeps the first block's input alive
        for block in self.blocks:
            x = block(x, lengths)
            if keep_layers:
                outputs.append(x)
        return outputs, self.norm(x)


# ------------------------------------------------------------------------------------------------ presets

register_family(SSAMBAModel)
register_family(SSASTModel)


def _ssamba(embed_dim: int, overrides: dict[str, Any]) -> SSAMBAModel:
    return SSAMBAModel(SSAMBAConfig.from_dict({"embed_dim": embed_dim, "depth": 24, **overrides}))


def _ssast(embed_dim: int, num_heads: int, overrides: dict[str, Any]) -> SSASTModel:
    return SSASTModel(SSASTConfig.from_dict({"embed_dim": embed_dim, "num_heads": num_heads, "depth": 12, **overrides}))


@register_model
def ssamba_tiny(**overrides: Any) -> SSAMBAModel:
    """SSAMBA-tiny: 192-d, 24 Vim layers (12 pairs)."""
    return _ssamba(192, overrides)


@register_model
def ssamba_small(**overrides: Any) -> SSAMBAModel:
    """SSAMBA-small: 384-d, 24 Vim layers."""
    return _ssamba(384, overrides)


@register_model
def ssamba_base(**overrides: Any) -> SSAMBAModel:
    """SSAMBA-base: 768-d, 24 Vim layers."""
    return _ssamba(768, overrides)


@register_model
def ssast_tiny(**overrides: Any) -> SSASTModel:
    """SSAST-tiny: DeiT-tiny distilled, 192-d, 3 heads, 12 blocks."""
    return _ssast(192, 3, overrides)


@register_model
def ssast_small(**overrides: Any) -> SSASTModel:
    """SSAST-small: DeiT-small distilled, 384-d, 6 heads, 12 blocks."""
    return _ssast(384, 6, overrides)


@register_model
def ssast_base(**overrides: Any) -> SSASTModel:
    """SSAST-base: DeiT-base distilled, 768-d, 12 heads, 12 blocks."""
    return _ssast(768, 12, overrides)
