"""HuBERT (Hsu et al. 2021) and Mamba-HuBERT (Zhang, Ma, Shahin, Ahmed, Epps, ICASSP 2025, arXiv 2409.07273):
a waveform CNN feature extractor, a feature projection, an optional learned mask embedding, and a context
encoder selected by ``HuBERTConfig.encoder``:

* ``"transformer"`` - convolutional position embedding + pre-norm transformer blocks (HuBERT; the pre-norm
  ``layer_norm_first`` form of HuBERT-large, which trains stably at small scale);
* ``"extbimamba"`` - pre-norm residual blocks around :class:`ssamba.nn.ExtBiMamba` (two independent Mamba
  mixers, the backward one on the reversed valid part; ``combine`` "add" or "concat" + Linear), optionally
  followed by a pre-norm FFN sub-block;
* ``"innbimamba"`` - the same blocks around :class:`ssamba.nn.InnerBiMamba` (Vim bimamba v2: shared in/out
  projections, two scan parameter sets);
* ``"conbimamba"`` - Conformer blocks whose self-attention is replaced by ExtBiMamba
  (:class:`ssamba.nn.conformer.ConformerBlock`), with or without the two macaron FFNs.

The model knows nothing of pretraining: the masked-prediction objective (``ssamba.pretrain.hubert_loss``)
draws the span mask and passes it in; fine-tuning code reads ``extract_features``.

Shape glossary
    B  batch            S  waveform samples (16 kHz)       T  frames (50 Hz, 20 ms hop, 25 ms receptive field)
    Cc CNN channels     C  encoder width (embed_dim)       F  FFN hidden width

Frame count: every CNN layer maps L -> floor((L - kernel) / stride) + 1 (no padding), so with HuBERT's
(10,5),(3,2)x4,(2,2)x2 stack the receptive field is 400 samples, the hop 320, and T = floor((S - 400) / 320) + 1
(49 frames for one second). :func:`conv_frames` computes it for any stack.

Padding: a right-padded batch gives, on every item's valid frames, the numbers the item alone gives (up to
float rounding): the CNN's valid outputs only read valid samples; the first layer's GroupNorm (one group per
channel, i.e. statistics over time) is computed over valid frames only; padded frames are zeroed before
every convolution over time (position conv, Conformer conv); attention masks padded keys; the Mamba mixers
reverse only each item's valid part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.fields import typed_fields
from ssamba.models.io import load_pretrained, save_model_folder
from ssamba.models.registry import register_family, register_model
from ssamba.nn.attention import Mlp, TransformerBlock
from ssamba.nn.conformer import ConformerBlock
from ssamba.nn.layers import lengths_to_mask
from ssamba.nn.mamba import ExtBiMamba, InnerBiMamba

__all__ = [
    "ENCODERS",
    "HuBERTConfig",
    "HuBERTModel",
    "conv_frames",
    "create_hubert",
    "hubert_presets",
]

ENCODERS = ("transformer", "extbimamba", "innbimamba", "conbimamba")
SAMPLE_RATE = 16000


@dataclass
class HuBERTConfig:
    """HuBERT / Mamba-HuBERT hyper-parameters; defaults are HuBERT-base's with a transformer encoder."""

    # context encoder: transformer | extbimamba | innbimamba | conbimamba
    encoder: str = "transformer"
    # CNN feature extractor: channels, kernels and strides per layer (HuBERT: 7 layers of 512, total hop 320)
    conv_dim: int = 512
    conv_kernels: list = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_strides: list = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    # encoder width and depth
    embed_dim: int = 768
    depth: int = 12
    # transformer heads (also the Conformer downstream's); FFN hidden width
    num_heads: int = 12
    ffn_dim: int = 3072
    # FFN sub-block in the Mamba blocks / macaron FFNs in ConBiMamba (transformer blocks always have one)
    use_ffn: bool = True
    # ExtBiMamba direction combination: "add" or "concat" (+ Linear 2C -> C)
    combine: str = "add"
    # Mamba mixer: state size, conv width, expansion
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # Mamba mixers' arithmetic (execution, not architecture; see ssamba.nn.mamba): layout-optimised projections
    # and the automatic scan backend (True), or the official operation order and the reference scan (False)
    fast_path: bool = True
    # ConBiMamba depthwise conv kernel
    conformer_kernel: int = 31
    # convolutional position embedding (HuBERT: kernel 128, 16 groups); 0 = none. None = 128 for the
    # transformer, none for the Mamba encoders (their scans are position-aware)
    pos_conv_kernel: int | None = None
    pos_conv_groups: int = 16
    # dropouts (HuBERT base: 0.1 everywhere)
    dropout: float = 0.1
    feature_dropout: float = 0.1
    # scale of the gradient reaching the CNN (HuBERT: 0.1 in pretraining; fine-tuning freezes the CNN)
    feature_grad_mult: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.combine not in ("add", "concat"):
            raise ValueError(f"combine must be 'add' or 'concat', got {self.combine!r}")
        if len(self.conv_kernels) != len(self.conv_strides) or not self.conv_kernels:
            raise ValueError(f"conv_kernels {self.conv_kernels} and conv_strides {self.conv_strides} must be "
                             "non-empty lists of equal length")
        for name in ("conv_dim", "embed_dim", "depth", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.encoder == "transformer" and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_conv_kernel is None:
            self.pos_conv_kernel = 128 if self.encoder == "transformer" else 0
        if self.pos_conv_kernel and self.embed_dim % self.pos_conv_groups:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by pos_conv_groups {self.pos_conv_groups}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HuBERTConfig:
        return cls(**typed_fields(cls, values, cls.__name__))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def hop(self) -> int:
        """Samples per frame (320 = 20 ms at 16 kHz for HuBERT's stack)."""
        hop = 1
        for s in self.conv_strides:
            hop *= s
        return hop

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.hop


def conv_frames(samples: Tensor | int, kernels: list, strides: list) -> Tensor | int:
    """Valid output frames of a stack of unpadded convolutions: L -> floor((L - k) / s) + 1 per layer,
    clamped at 0 (an input shorter than the receptive field has no frame)."""
    out = samples
    for k, s in zip(kernels, strides, strict=True):
        if isinstance(out, Tensor):
            out = torch.div(out - k, s, rounding_mode="floor") + 1
            out = out.clamp(min=0)
        else:
            out = max((out - k) // s + 1, 0)
    return out


class _MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel (HuBERT's first CNN layer) over each item's valid frames only.
    (B, Cc, L) -> (B, Cc, L); with no lengths it equals ``nn.GroupNorm(Cc, Cc)``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        if lengths is None:
            return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        valid = lengths_to_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)  # (B, 1, L)
        count = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
        mean = (x * valid).sum(-1, keepdim=True) / count  # (B, Cc, 1)
        var = ((x - mean).pow(2) * valid).sum(-1, keepdim=True) / count  # biased, as GroupNorm
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


class ConvFeatureExtractor(nn.Module):
    """HuBERT's waveform CNN (fairseq ``ConvFeatureExtractionModel``, mode "default"): conv (no bias) ->
    [GroupNorm on the first layer] -> GELU, per layer. (B, S) -> (B, T, Cc) and frame lengths (B,)."""

    def __init__(self, dim: int, kernels: list, strides: list):
        super().__init__()
        self.kernels, self.strides = list(kernels), list(strides)
        self.convs = nn.ModuleList()
        in_ch = 1
        for k, s in zip(kernels, strides, strict=True):
            self.convs.append(nn.Conv1d(in_ch, dim, k, stride=s, bias=False))
            in_ch = dim
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight)  # as fairseq
        self.norm = _MaskedGroupNorm(dim)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = waveforms[:, None, :]  # (B, 1, S)
        frame_lengths = lengths
        for i, conv in enumerate(self.convs):
            x = conv(x)  # (B, Cc, L_i)
            if frame_lengths is not None:
                frame_lengths = conv_frames(frame_lengths, [self.kernels[i]], [self.strides[i]])
            if i == 0:
                x = self.norm(x, frame_lengths)
            x = F.gelu(x)
        return x.transpose(1, 2), frame_lengths  # (B, T, Cc)


class ConvPositionEmbedding(nn.Module):
    """HuBERT's relative position embedding: grouped conv over time (kernel K, K/2 padding, the extra last
    frame of an even kernel removed) with weight norm, then GELU; added to the input. (B, T, C) -> (B, T, C)."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        # fairseq: normal init with std sqrt(4 / (K * C)), zero bias, weight norm over the kernel dim
        nn.init.normal_(conv.weight, mean=0.0, std=(4.0 / (kernel * dim)) ** 0.5)
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        h = x if lengths is None else x.masked_fill(~lengths_to_mask(lengths, x.shape[1])[..., None], 0.0)
        h = self.conv(h.transpose(1, 2))  # (B, C, T + trim)
        if self.trim:
            h = h[..., : -self.trim]
        return x + F.gelu(h).transpose(1, 2)


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: ``x + drop(mixer(LN(x)))`` then, with an FFN, ``x + drop(FFN(LN(x)))``."""

    def __init__(self, dim: int, mixer: nn.Module, ffn_dim: int | None, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim) if ffn_dim else None
        self.ffn = Mlp(dim, ffn_dim, dropout) if ffn_dim else None

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        x = x + self.drop(self.mixer(self.norm(x), lengths))
        if self.ffn is not None:
            x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x


class HuBERTModel(nn.Module):
    """HuBERT / Mamba-HuBERT encoder; see the module docstring."""

    family = "hubert"
    config_class = HuBERTConfig
    input_kind = "waveform"

    def __init__(self, config: HuBERTConfig):
        super().__init__()
        c = self.config = config
        self.feature_extractor = ConvFeatureExtractor(c.conv_dim, c.conv_kernels, c.conv_strides)
        self.feature_norm = nn.LayerNorm(c.conv_dim)
        self.post_extract_proj = nn.Linear(c.conv_dim, c.embed_dim)
        self.feature_drop = nn.Dropout(c.feature_dropout)
        # learned vector that replaces masked frames (HuBERT: uniform init)
        self.mask_emb = nn.Parameter(torch.empty(c.embed_dim).uniform_())
        self.pos_conv = ConvPositionEmbedding(c.embed_dim, c.pos_conv_kernel, c.pos_conv_groups) if c.pos_conv_kernel \
            else None
        self.drop = nn.Dropout(c.dropout)
        mamba_kwargs = {"d_state": c.d_state, "d_conv": c.d_conv, "expand": c.expand, "fast_path": c.fast_path}
        ffn = c.ffn_dim if c.use_ffn else None
        layers: list[nn.Module] = []
        for _ in range(c.depth):
            if c.encoder == "transformer":
                layers.append(TransformerBlock(c.embed_dim, c.num_heads, mlp_ratio=c.ffn_dim / c.embed_dim,
                                               drop=c.dropout, norm_eps=1e-5, attn_impl="sdpa"))
            elif c.encoder == "extbimamba":
                layers.append(MambaBlock(c.embed_dim, ExtBiMamba(c.embed_dim, combine=c.combine, **mamba_kwargs),
                                         ffn, c.dropout))
            elif c.encoder == "innbimamba":
                layers.append(MambaBlock(c.embed_dim, InnerBiMamba(c.embed_dim, **mamba_kwargs), ffn, c.dropout))
            else:
                layers.append(ConformerBlock(c.embed_dim, "extbimamba", ffn_dim=c.ffn_dim, use_ffn=c.use_ffn,
                                             kernel_size=c.conformer_kernel, dropout=c.dropout, combine=c.combine,
                                             **mamba_kwargs))
        self.layers = nn.ModuleList(layers)
        # pre-norm stacks end with a LayerNorm (ConformerBlock already normalises its output)
        self.final_norm = nn.LayerNorm(c.embed_dim) if c.encoder != "conbimamba" else nn.Identity()

    # -- the pieces, for objectives and fine-tuning
    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Samples (B,) -> frames (B,)."""
        return conv_frames(lengths, self.config.conv_kernels, self.config.conv_strides)

    def cnn_features(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, S) -> CNN features (B, T, Cc) with HuBERT's gradient scaling, frame lengths (B,) or None."""
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms (B, S), got shape {tuple(waveforms.shape)}")
        shortest = waveforms.shape[1] if lengths is None else int(lengths.min())
        if conv_frames(shortest, self.config.conv_kernels, self.config.conv_strides) < 1:
            raise ValueError(f"a waveform of {shortest} samples is shorter than the CNN's receptive field")
        mult = self.config.feature_grad_mult
        if mult <= 0 or not torch.is_grad_enabled():
            with torch.no_grad():
                feats, frame_lengths = self.feature_extractor(waveforms, lengths)
        else:
            feats, frame_lengths = self.feature_extractor(waveforms, lengths)
            if mult != 1.0:  # fairseq GradMultiply: identity forward, gradient * mult
                feats = feats * mult + feats.detach() * (1.0 - mult)
        return feats, frame_lengths

    def encode(self, features: Tensor, frame_lengths: Tensor | None, mask: Tensor | None = None,
               num_layers: int | None = None) -> tuple[list[Tensor], Tensor]:
        """CNN features (B, T, Cc) -> (per-layer outputs [(B, T, C)] x depth, final normalised (B, T, C)).

        mask (B, T) bool: frames replaced by the mask embedding (after projection, as HuBERT).
        num_layers: stop after that many layers (the final output is then that layer's, normalised).
        """
        x = self.post_extract_proj(self.feature_drop(self.feature_norm(features)))  # (B, T, C)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        if self.pos_conv is not None:
            x = self.pos_conv(x, frame_lengths)
        x = self.drop(x)
        outputs = []
        for layer in self.layers[: num_layers or len(self.layers)]:
            x = layer(x, frame_lengths)  # every block: forward(x, lengths)
            outputs.append(self._zero_padding(x, frame_lengths))
        return outputs, self._zero_padding(self.final_norm(x), frame_lengths)

    @staticmethod
    def _zero_padding(h: Tensor, lengths: Tensor | None) -> Tensor:
        if lengths is None or bool((lengths == h.shape[1]).all()):
            return h
        return h.masked_fill(~lengths_to_mask(lengths, h.shape[1])[..., None], 0.0)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """(B, S) waveforms, (B,) valid samples -> final representations (B, T, C), frame lengths (B,)."""
        feats, frame_lengths = self.cnn_features(waveforms, lengths)
        return self.encode(feats, frame_lengths, mask)[1], frame_lengths

    def extract_features(self, waveforms: Tensor, lengths: Tensor | None = None, num_layers: int | None = None
                         ) -> tuple[list[Tensor], Tensor]:
        """The shared ``extract_features`` contract: (B, S) waveforms and valid samples (B,) ->
        ([each encoder layer's output (B, T, C), first to last], frame lengths (B,)); padded frames are zero."""
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], dtype=torch.long, device=waveforms.device)
        feats, frame_lengths = self.cnn_features(waveforms, lengths)
        outputs, _ = self.encode(feats, frame_lengths, None, num_layers)
        return outputs, frame_lengths

    # -- checkpoints
    def save_pretrained(self, directory: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` ({"family": "hubert", "config"}), ``model.safetensors`` and the model card."""
        return save_model_folder(self, directory, card)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> HuBERTModel:
        return load_pretrained(directory, expect=cls, **overrides)

    def load_adapted_state_dict(self, state: dict[str, Tensor], source: HuBERTConfig) -> None:
        """Load weights of a model with config ``source``; only dropout-like fields may differ."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"state dict does not fit HuBERTModel({self.config.encoder}): missing {missing}, "
                             f"unexpected {unexpected}")


# ------------------------------------------------------------------------------------------------ presets


def hubert_presets() -> dict[str, dict[str, Any]]:
    """Named configurations. ``base`` = HuBERT-base sizes; ``small`` = a CPU-sized model for the demo
    corpus on a shared CPU (64-channel CNN, 4 layers of 128); ``tiny`` = unit tests."""
    small = {"conv_dim": 64, "embed_dim": 128, "depth": 4, "num_heads": 4, "ffn_dim": 512,
             "conformer_kernel": 15, "dropout": 0.05, "feature_dropout": 0.05}  # fmt: skip
    tiny = {"conv_dim": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "ffn_dim": 64, "pos_conv_groups": 4,
            "conformer_kernel": 7, "d_state": 4, "dropout": 0.0, "feature_dropout": 0.0}
    return {"base": {}, "small": small, "tiny": tiny}


def create_hubert(encoder: str = "transformer", size: str = "base", **overrides: Any) -> HuBERTModel:
    """``create_hubert("extbimamba", "small", combine="concat")``; overrides are HuBERTConfig fields."""
    presets = hubert_presets()
    if size not in presets:
        raise ValueError(f"unknown HuBERT size {size!r}; available: {', '.join(presets)}")
    return HuBERTModel(HuBERTConfig.from_dict({**presets[size], "encoder": encoder, **overrides}))


def _preset(encoder: str, size: str):
    """The registry entry ``hubert_<encoder>_<size>``: ``create_hubert(encoder, size, **overrides)``."""

    def preset(**overrides: Any) -> HuBERTModel:
        return create_hubert(encoder, size, **overrides)

    preset.__name__ = preset.__qualname__ = f"hubert_{encoder}_{size}"
    preset.__doc__ = f"Mamba-HuBERT preset: the {encoder} encoder at the {size!r} sizes (see hubert_presets)."
    preset.__annotations__ = {"return": HuBERTModel}  # the registry reads the model class (check_overrides)
    return preset


register_family(HuBERTModel)
for _encoder in ENCODERS:
    for _size in hubert_presets():
        register_model(_preset(_encoder, _size))
