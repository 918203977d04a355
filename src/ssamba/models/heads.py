"""Heads over an encoder, each saved with its config so that its folder alone rebuilds it.

* :class:`WeightedSumProbe` - SUPERB's featurizer over a frozen spectrogram encoder: a softmax-weighted sum of every
  layer's (LayerNormed) tokens, mean (or per-frequency-row statistics) pooling, one Linear layer
  (``ssamba finetune --linear-probe``).
* :class:`CTCHead` - a chosen HuBERT-family layer (or the normalised last one) -> optional small Conformer
  downstream (attention Conformer blocks, Gulati et al. 2020) -> Linear to the vocabulary; trained with CTC
  (Graves et al. 2006). Mamba-HuBERT (Zhang et al. 2025, Table 2) compares exactly these two set-ups.
* :class:`ReconstructionHead` - predicts the (100 Hz) log-mel fbank from the 50 Hz representations (two fbank
  frames per representation frame), clean or from a noisy input (denoising).
* :func:`save_classifier` / :func:`load_classifier` - a fine-tuned encoder or probe with ``finetune.json``.
* :func:`save_head` / :func:`load_head` - ``head.safetensors`` + ``head.json`` (the head's kind and arguments and
  the encoder's family and config) (+ ``vocab.json``).

The fine-tuning classifier head of SSAMBA / SSAST is part of the encoder (``ClassifierHead``, ``models.spectrogram``).

Shape glossary: B batch, T frames, K tokens, S special tokens, C width, L layers, Q classes, V vocabulary (incl.
blank), F fbank frames (100 Hz), M mel bins.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.io import load_pretrained
from ssamba.models.registry import FAMILIES
from ssamba.nn.conformer import ConformerBlock
from ssamba.nn.layers import lengths_to_mask

__all__ = ["BLANK", "HEAD_CONFIG", "HEAD_WEIGHTS", "META_FILE", "PROBE_FILE", "PROBE_POOLS", "VOCAB_FILE", "CTCHead",
           "ReconstructionHead", "WeightedSumProbe", "greedy_decode", "load_classifier", "load_head", "save_classifier",
           "save_head", "select_layer"]

# A saved head folder: its weights (encoder included) and what builds it again (load_head needs nothing else).
HEAD_WEIGHTS, HEAD_CONFIG, VOCAB_FILE = "head.safetensors", "head.json", "vocab.json"
# A fine-tuned classifier folder: the encoder's save_pretrained files (its head inside when fine-tuned), the
# probe's weights, and what the run was (mode, labels, input length, normalisation).
META_FILE, PROBE_FILE = "finetune.json", "probe.safetensors"

BLANK = 0  # the CTC blank's index


PROBE_POOLS = ("mean", "row_stats")


class WeightedSumProbe(nn.Module):
    """Frozen encoder -> softmax(w)-weighted sum over layers of LayerNorm(tokens) -> pooling over the valid
    patch tokens -> Linear (SUPERB's featurizer + a linear utterance classifier).

    ``pool``: ``"mean"`` (SUPERB's, and the official ``avgtok`` head's: the mean of every valid patch token, C
    values per layer) or ``"row_stats"`` (statistics pooling, as x-vectors, per frequency row of the patch grid:
    the mean and standard deviation over each row's valid time columns, 2 * Fg * C values per layer). Each
    layer is pooled, then the layers are weighted and summed. The tokens of one frequency row share a band; the
    overall mean averages the bands together, and with them most of what tells short words apart (keywords on the
    demo corpus: 0.08 test accuracy with "mean", 0.31-0.34 with "row_stats"; benchmarks/RESULTS.md, session 7).

    ``layer_logits`` (L,) start at zero (equal weights). Only ``layer_logits`` and ``head`` are trainable;
    the encoder stays in eval mode (no dropout / stochastic depth) even when the probe trains. Before the
    weighted sum each layer's pooled vector is standardised with fixed training-set statistics
    (``feature_mean`` / ``feature_std`` (L, P) buffers, ``fit_standardization``), as a linear probe's
    affine-free BatchNorm (MAE): pooled LayerNormed tokens vary little between clips, and without it a
    short probe budget barely moves the classifier.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in PROBE_POOLS:
            raise ValueError(f"probe pool must be one of {PROBE_POOLS}, got {pool!r}")
        self.pool = pool
        self.encoder = encoder.eval().requires_grad_(False)
        c = encoder.config
        with torch.no_grad():  # layer count of any family: one tiny forward pass
            probe_in = torch.zeros(1, c.tshape, c.input_fdim)
            num_layers = len(encoder.extract_features(probe_in)[0])
        width = c.embed_dim if pool == "mean" else 2 * c.grid[0] * c.embed_dim  # P, per layer
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("feature_mean", torch.zeros(num_layers, width))
        self.register_buffer("feature_std", torch.ones(num_layers, width))

    @torch.no_grad()
    def fit_standardization(self, pooled: Tensor) -> None:
        """Per-layer, per-feature mean / std of training vectors (N, L, P)."""
        self.feature_mean.copy_(pooled.mean(0))
        self.feature_std.copy_(pooled.std(0, unbiased=False).clamp_min(1e-5))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def pooled_layers(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """fbank (B, T, F), lengths (B,) -> per-layer pooled vectors (B, L, P) (what the cache stores)."""
        return self.pool_layers(*self.encoder.extract_features(x, lengths), self.pool)

    @torch.no_grad()
    def pool_layers(self, hidden: list[Tensor], token_lengths: Tensor, pool: str) -> Tensor:
        """The encoder's per-layer outputs L x (B, K, C) and token lengths (B,) -> vectors (B, L, P) pooled by
        ``pool`` (any of PROBE_POOLS, so that one encoder pass serves probes of either pooling)."""
        s = self.encoder.num_special_tokens
        if pool == "mean":
            valid = lengths_to_mask(token_lengths, hidden[0].shape[1])  # (B, K)
            valid[:, :s] = False  # patch tokens only, as the avgtok head
            weights = (valid.float() / valid.sum(1, keepdim=True))[..., None]  # (B, K, 1)
            return torch.stack([(F.layer_norm(h, h.shape[-1:]) * weights).sum(1) for h in hidden], dim=1)
        tokens = torch.stack([F.layer_norm(h[:, s:], h.shape[-1:]) for h in hidden], dim=1)  # (B, L, K - S, C)
        patches = token_lengths - s  # (B,) valid patch tokens, packed at the front (ssamba.nn.patch)
        # Packed item b holds its Fg rows one after another, Tv = patches / Fg columns each: row f at f Tv + t.
        f_grid = self.encoder.config.grid[0]
        t_valid = torch.div(patches, f_grid, rounding_mode="floor")  # (B,)
        t_max = int(t_valid.max())
        col = torch.arange(t_max, device=tokens.device)
        in_row = col < t_valid[:, None]  # (B, Tmax)
        index = torch.arange(f_grid, device=col.device)[None, :, None] * t_valid[:, None, None] + col  # (B, Fg, Tmax)
        index = torch.where(in_row[:, None], index, 0).flatten(1)  # (B, Fg * Tmax), padding pointed in range
        valid = in_row.to(tokens.dtype)[:, None, None, :, None]  # (B, 1, 1, Tmax, 1)
        b, layers, _, c = tokens.shape
        rows = torch.gather(tokens, 2, index[:, None, :, None].expand(b, layers, -1, c))
        rows = rows.view(b, layers, f_grid, t_max, c) * valid  # (B, L, Fg, Tmax, C), padding zeroed
        count = t_valid.to(tokens.dtype)[:, None, None, None]
        mean = rows.sum(3) / count  # (B, L, Fg, C)
        var = ((rows - mean[:, :, :, None]) * valid).square().sum(3) / count
        return torch.cat([mean, var.sqrt()], dim=-1).flatten(2)  # (B, L, Fg * 2C)

    def forward_pooled(self, pooled: Tensor) -> Tensor:
        """(B, L, P) -> logits (B, Q)."""
        w = torch.softmax(self.layer_logits, dim=0)
        pooled = (pooled - self.feature_mean) / self.feature_std
        return self.head(torch.einsum("l,blc->bc", w, pooled))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.forward_pooled(self.pooled_layers(x, lengths))

    @property
    def layer_weights(self) -> list[float]:
        return torch.softmax(self.layer_logits.detach(), dim=0).tolist()


def select_layer(encoder: nn.Module, waveforms: Tensor, lengths: Tensor, layer: int | None,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Layer ``layer`` (1-based) of the encoder's outputs, or its normalised final output when None;
    ``mask`` (B, T) bool replaces frames by the mask embedding (fine-tuning augmentation)."""
    feats, frame_lengths = encoder.cnn_features(waveforms, lengths)
    outputs, final = encoder.encode(feats, frame_lengths, mask, num_layers=layer)
    return (final if layer is None else outputs[layer - 1]), frame_lengths


class CTCHead(nn.Module):
    """Encoder -> [Conformer downstream] -> Linear(V). ``forward`` returns (log-probs (B, T, V), frames (B,))."""

    def __init__(self, encoder: nn.Module, vocab_size: int, layer: int | None = None, conformer_layers: int = 0,
                 conformer_dim: int = 144, conformer_heads: int = 4, conformer_kernel: int = 15,
                 dropout: float = 0.1):
        super().__init__()
        depth = encoder.config.depth
        if layer is not None and not 1 <= layer <= depth:
            raise ValueError(f"layer must be in 1..{depth} (or None for the last, normalised), got {layer}")
        self.encoder, self.layer = encoder, layer
        # the constructor's architecture arguments, saved beside the weights by save_head
        self.args = {"vocab_size": vocab_size, "layer": layer, "conformer_layers": conformer_layers,
                     "conformer_dim": conformer_dim, "conformer_heads": conformer_heads,
                     "conformer_kernel": conformer_kernel}  # fmt: skip
        width = encoder.config.embed_dim
        self.downstream = None
        if conformer_layers:
            self.down_proj = nn.Linear(width, conformer_dim)
            self.downstream = nn.ModuleList(
                ConformerBlock(conformer_dim, "attention", num_heads=conformer_heads, kernel_size=conformer_kernel,
                               dropout=dropout) for _ in range(conformer_layers))
            width = conformer_dim
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, waveforms: Tensor, lengths: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, frame_lengths = select_layer(self.encoder, waveforms, lengths, self.layer, mask)  # (B, T, C)
        if self.downstream is not None:
            h = self.down_proj(h)
            for block in self.downstream:
                h = block(h, frame_lengths)
        return F.log_softmax(self.out(self.drop(h)).float(), dim=-1), frame_lengths

    def ctc_loss(self, log_probs: Tensor, frame_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        """Mean over items of the CTC loss divided by the target length (``reduction="mean"``)."""
        return F.ctc_loss(log_probs.transpose(0, 1), targets, frame_lengths, target_lengths, blank=BLANK,
                          zero_infinity=True)


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: (B, T, V) log-probabilities, (B,) frames -> per item the argmax ids with repeats
    collapsed and blanks removed."""
    best = log_probs.argmax(-1)  # (B, T)
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != BLANK])
    return out


class ReconstructionHead(nn.Module):
    """Encoder layer -> Linear(C, ratio * M): ``ratio`` fbank frames per representation frame (2 = 100 Hz
    fbank from 50 Hz frames). ``forward`` returns predictions (B, T * ratio, M) and their valid frames."""

    def __init__(self, encoder: nn.Module, num_mel_bins: int, layer: int | None = None, ratio: int = 2,
                 hidden: int = 0):
        super().__init__()
        self.encoder, self.layer, self.ratio, self.num_mel_bins = encoder, layer, ratio, num_mel_bins
        self.args = {"num_mel_bins": num_mel_bins, "layer": layer, "ratio": ratio, "hidden": hidden}
        width = encoder.config.embed_dim
        out = ratio * num_mel_bins
        self.proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out)) if hidden \
            else nn.Linear(width, out)

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        h, frame_lengths = select_layer(self.encoder, waveforms, lengths, self.layer)  # (B, T, C)
        pred = self.proj(h)  # (B, T, ratio * M)
        b, t, _ = pred.shape
        return pred.reshape(b, t * self.ratio, self.num_mel_bins), frame_lengths * self.ratio


_HEADS = {"ctc": CTCHead, "reconstruction": ReconstructionHead}


def save_head(head: CTCHead | ReconstructionHead, folder: str | Path, vocab: Sequence[str] | None = None) -> Path:
    """``folder``: ``head.safetensors`` (head and encoder weights), ``head.json`` (the head's kind and arguments and
    the encoder's family and config) and, for CTC, ``vocab.json``: :func:`load_head` rebuilds it from these alone."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = next(k for k, cls in _HEADS.items() if isinstance(head, cls))
    encoder = head.encoder
    meta = {"kind": kind, "args": head.args, "encoder": {"family": encoder.family, "config": encoder.config.to_dict()}}
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    if vocab is not None:
        (folder / VOCAB_FILE).write_text(json.dumps(list(vocab)) + "\n")
    return folder


def load_head(folder: str | Path) -> CTCHead | ReconstructionHead:
    """The head saved by :func:`save_head` in ``folder`` (eval mode), encoder included."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).exists():
        raise ValueError(f"{folder}: not a saved head ({HEAD_CONFIG} is missing)")
    meta = json.loads((folder / HEAD_CONFIG).read_text())
    family = meta["encoder"]["family"]
    if meta.get("kind") not in _HEADS or family not in FAMILIES:
        raise ValueError(f"{folder / HEAD_CONFIG}: unknown head kind {meta.get('kind')!r} or encoder family {family!r}")
    model_cls = FAMILIES[family]
    encoder = model_cls(model_cls.config_class.from_dict(meta["encoder"]["config"]))
    args = dict(meta["args"], dropout=0.0) if meta["kind"] == "ctc" else meta["args"]
    head = _HEADS[meta["kind"]](encoder, **args)
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return head.eval()


def _encoder(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, WeightedSumProbe) else model


def save_classifier(model: nn.Module, directory: str | os.PathLike, meta: dict) -> Path:
    """``directory``: the encoder's save_pretrained files (with its head when fine-tuned), ``probe.safetensors``
    for a probe, and ``finetune.json`` (mode, labels, input length and normalisation)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _encoder(model).save_pretrained(tmp, {"notes": (
        f"Fine-tuned by `ssamba finetune` (task {meta.get('task')}, {meta.get('mode')}; the checkpoint of the best "
        f"validation, step {meta.get('step')}); labels and normalisation are in `{META_FILE}`, load it with "
        "`ssamba.models.heads.load_classifier`.")})
    if isinstance(model, WeightedSumProbe):
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not k.startswith("encoder.")}  # fmt: skip
        save_file(state, str(tmp / PROBE_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_classifier(directory: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Inverse of :func:`save_classifier`; accepts a fine-tuning run folder (uses RUN/best)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / META_FILE).exists() and (directory / "best" / META_FILE).exists():
        directory = directory / "best"
    meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).exists() else None
    if meta is None:
        raise FileNotFoundError(f"{directory}: no {META_FILE}; expected a fine-tuning run or its best/ folder")
    encoder = load_pretrained(directory)
    if meta["mode"] == "probe":
        model = WeightedSumProbe(encoder, len(meta["labels"]["mids"]), meta.get("probe_pool", "mean"))
        model.load_state_dict({**load_file(str(directory / PROBE_FILE)),
                               **{"encoder." + k: v for k, v in encoder.state_dict().items()}})  # fmt: skip
    else:
        model = encoder
    return model.eval(), meta
