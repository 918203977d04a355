"""Per-frame hidden states of any ssamba model, paired with its input local features, for layer-wise analysis.

Shape glossary
    B  batch     T  fbank frames     S  waveform samples     Fg, Tg  patch grid (frequency rows, time columns)
    C  model width     P  = 256 values of one 16x16 input patch     N  analysis frames over the dataset
    L  layers (``extract_features`` entries)

What a "frame" is:

* **Spectrogram patch models** (``input_kind == "fbank"``: SSAMBA, SSAST). Tokens are 16x16 patches in
  frequency-major order, so one time step of the model is a *time column* of Fg patches (16 fbank frames,
  160 ms with the official stride). ``group="concat"`` (default) concatenates the column's Fg patch tokens,
  (Fg * C) per frame, which keeps everything the layer knows about that time span; ``"mean"`` averages them
  (C per frame, cheaper, loses frequency layout); ``"patch"`` makes every patch its own frame. Special
  (cls/distillation) tokens are left out. X = the raw normalised input patches (``patch_targets``, the
  pretraining reconstruction targets), grouped the same way: with ``concat`` that is the column's
  16 x 128 spectrogram slice.
* **Waveform models** (``input_kind == "waveform"``: the HuBERT family). Frames are the model's output
  frames (20 ms). X = 39-d MFCC + delta + delta-delta (the HuBERT first-iteration k-means input, 10 ms hop),
  with the r = round(MFCC frames / model frames) consecutive MFCC frames of each model frame concatenated
  (r = 2 at 20 ms: frames 2i and 2i+1, starting where model frame i starts; the last MFCC frame is repeated
  when the clip ends before the last pair is complete).
* ``x="cnn"`` (waveform models): the CNN feature extractor's output, the frames the encoder reads.
* ``x="layer:K"`` uses layer K's output (grouped like the others) as X, for any family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ssamba import features as feats

__all__ = ["GROUPS", "CTCStack", "LayerFeatures", "collect_hidden", "load_model", "resolve_checkpoint"]

GROUPS = ("concat", "mean", "patch")


@dataclass
class LayerFeatures:
    """Frames of one model over a dataset: ``x`` (N, Dx) input local features, ``layers`` L tensors (N, D_l),
    ``utterance`` (N,) index of the clip each frame comes from, ``labels`` (N,) the clip's class (or None)."""

    x: Tensor
    layers: list[Tensor]
    utterance: Tensor
    labels: Tensor | None
    x_source: str
    group: str


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``save_pretrained`` folder (has config.json + model.safetensors), or a run folder holding one in
    ``best/`` (fine-tuning's best validation model) or ``final/`` (end of training)."""
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    for sub in ("best", "final"):
        if (path / sub / "model.safetensors").exists():
            return path / sub
    raise FileNotFoundError(
        f"{path}: not a model folder (config.json + model.safetensors) nor a run folder with best/ or final/")


class CTCStack(torch.nn.Module):
    """A HuBERT CTC fine-tuning run (``ssamba hubert finetune``: RUN/best/head.json + head.safetensors)
    seen through the ``extract_features`` contract: the encoder's layers up to the one the head reads, then
    each block of the Conformer downstream (when the head has one), so the MI curve covers the whole stack
    that feeds the CTC output layer - where Zhang et al. see MI rise again."""

    family = "hubert_ctc"
    input_kind = "waveform"

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.config = head.encoder.config

    def cnn_features(self, waveforms: Tensor, lengths: Tensor | None = None):
        return self.head.encoder.cnn_features(waveforms, lengths)

    def extract_features(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """(B, S), (B,) -> ([encoder layers 1..head.layer, then each Conformer block] (B, T, C_l), frames (B,))."""
        head = self.head
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1], dtype=torch.long)
        feats, frame_lengths = head.encoder.cnn_features(waveforms, lengths)
        layers, final = head.encoder.encode(feats, frame_lengths, None, num_layers=head.layer)
        if head.downstream is not None:
            # what the head reads: the chosen layer, or the normalised last one (CTCHead / select_layer)
            h = head.down_proj(final if head.layer is None else layers[-1])
            for block in head.downstream:
                h = block(h, frame_lengths)
                layers.append(head.encoder._zero_padding(h, frame_lengths))
        return layers, frame_lengths


def _load_ctc_run(run: Path) -> tuple[CTCStack, Path]:
    from ssamba.models.heads import load_head

    return CTCStack(load_head(run / "best")), run / "best"


def _is_ctc_run(path: Path) -> bool:
    from ssamba.models.heads import HEAD_CONFIG

    return (path / "best" / HEAD_CONFIG).exists()


def load_model(spec: str, *, seed: int = 0):
    """Model from a spec: a checkpoint path (see :func:`resolve_checkpoint`), a HuBERT CTC fine-tuning run
    (:class:`CTCStack`: encoder + Conformer downstream), or ``random:PATH`` for the same architecture freshly
    initialised (seeded; the untrained baseline). Returns (model in eval mode, folder of the weights)."""
    from ssamba.models.io import load_pretrained
    from ssamba.models.registry import FAMILIES

    random_init = spec.startswith("random:")
    path = Path(spec[len("random:"):] if random_init else spec)
    if _is_ctc_run(path) and not (path / "best" / "model.safetensors").exists():
        if random_init:
            raise ValueError(f"random:{path}: untrained baselines of CTC runs are not supported; use "
                             f"random: on the encoder's folder")
        model, folder = _load_ctc_run(path)
        return model.eval(), folder
    folder = resolve_checkpoint(path)
    if not random_init:
        return load_pretrained(folder).eval(), folder
    meta = json.loads((folder / "config.json").read_text())
    family = meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{folder / 'config.json'}: unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cls.config_class.from_dict(meta["config"]))
    return model.eval(), folder


def _parse_x(x: str) -> int | str | None:
    """"input" -> None; "cnn" -> "cnn"; "layer:K" -> K."""
    if x == "input":
        return None
    if x == "cnn":
        return x
    if x.startswith("layer:") and x[6:].isdigit():
        return int(x[6:])
    raise ValueError(f"x must be 'input', 'cnn' (waveform models) or 'layer:K' (K a layer index), got {x!r}")


def _patch_columns(tokens: Tensor, f_grid: int, n_cols: int, group: str) -> Tensor:
    """One item's packed patch tokens (Fg * n_cols, D), frequency-major -> frames per ``group``."""
    if group == "patch":
        return tokens
    cols = tokens.reshape(f_grid, n_cols, -1).transpose(0, 1)  # (n_cols, Fg, D)
    return cols.reshape(n_cols, -1) if group == "concat" else cols.mean(1)


def _mfcc_frames(wave: Tensor, n_frames: int, sample_rate: int) -> Tensor:
    """(S,) waveform -> (n, 39 r) MFCC+deltas grouped to the model's frame rate, n = min(model, MFCC/r)."""
    m = feats.mfcc_with_deltas(wave, sample_rate)  # (F, 39) at 10 ms
    r = max(1, round(m.shape[0] / max(n_frames, 1)))
    deficit = n_frames * r - m.shape[0]
    if 0 < deficit < r:
        # the last model frame's second MFCC frame would reach past the clip: repeat the last MFCC frame
        m = torch.cat([m, m[-1:].expand(deficit, -1)])
    n = min(n_frames, m.shape[0] // r)
    return m[: n * r].reshape(n, r * m.shape[1])


@torch.no_grad()
def collect_hidden(
    model,
    manifest,
    *,
    labels=None,
    x: str = "input",
    group: str = "concat",
    batch_size: int = 16,
    max_items: int | None = None,
    mean: float = feats.AUDIOSET_LIBRISPEECH_MEAN,
    std: float = feats.AUDIOSET_LIBRISPEECH_STD,
    skip_bad: bool = False,
) -> LayerFeatures:
    """Run ``model.extract_features`` over a manifest (path or examples) and return per-frame features.

    labels: a ``LabelSet``; single-label clips give every frame the clip's class. Spectrogram models read
    fbank normalised with (mean, std) and cut to the model's ``input_tdim``; waveform models read samples.
    """
    from ssamba.data import AudioDataset

    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    x_layer = _parse_x(x)
    kind = getattr(model, "input_kind", None)
    if kind not in ("fbank", "waveform"):
        raise ValueError(f"{type(model).__name__}: unsupported input_kind {kind!r} (expected fbank or waveform)")
    if x_layer == "cnn" and not hasattr(model, "cnn_features"):
        raise ValueError(f"x='cnn' needs a waveform model with a CNN feature extractor, not {type(model).__name__}")
    if kind == "waveform" and group != "concat":
        raise ValueError(f"group={group!r} applies to patch models; waveform models have one vector per frame")
    ds_kwargs = dict(kind=kind, skip_bad=skip_bad, mean=mean, std=std)
    if kind == "fbank":
        ds_kwargs["target_length"] = model.config.input_tdim
    ds = AudioDataset(manifest, labels, **ds_kwargs)
    if max_items is not None:
        ds.examples = ds.examples[:max_items]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate)
    xs: list[Tensor] = []
    per_layer: list[list[Tensor]] | None = None
    utts: list[Tensor] = []
    ys: list[Tensor] = []
    for batch in loader:
        if batch["lengths"].numel() == 0:
            continue
        inputs, lengths = batch["features"], batch["lengths"]
        hidden, out_lengths = model.extract_features(inputs, lengths)
        if per_layer is None:
            if isinstance(x_layer, int) and not 0 <= x_layer < len(hidden):
                raise ValueError(f"x=layer:{x_layer} but the model has {len(hidden)} layers (0..{len(hidden) - 1})")
            per_layer = [[] for _ in hidden]
        if kind == "fbank":
            c = model.config
            s = model.num_special_tokens
            f_grid = c.grid[0]
            n_cols = torch.div(lengths - c.tshape, c.tstride, rounding_mode="floor") + 1
            patches = model.patch_targets(inputs, lengths) if x_layer is None else None
        elif x_layer == "cnn":
            cnn, _ = model.cnn_features(inputs, lengths)  # (B, T, Cc), the frames the encoder reads
        for b in range(inputs.shape[0]):
            if kind == "fbank":
                nc = int(n_cols[b])
                frames = [_patch_columns(h[b, s: s + f_grid * nc], f_grid, nc, group) for h in hidden]
                xb = (_patch_columns(patches[b, : f_grid * nc], f_grid, nc, group) if x_layer is None
                      else frames[x_layer])
            else:
                nf = int(out_lengths[b])
                frames = [h[b, :nf] for h in hidden]
                if x_layer is None:
                    xb = _mfcc_frames(inputs[b, : int(lengths[b])], nf, ds.sample_rate)
                    frames = [f[: xb.shape[0]] for f in frames]
                elif x_layer == "cnn":
                    xb = cnn[b, :nf]
                else:
                    xb = frames[x_layer]
            for store, f in zip(per_layer, frames, strict=True):
                store.append(f.float())
            xs.append(xb.float())
            n = xb.shape[0]
            utts.append(torch.full((n,), int(batch["indices"][b]), dtype=torch.long))
            if labels is not None:
                vec = batch["labels"][b]
                if int((vec > 0).sum()) != 1:
                    raise ValueError(f"{ds.examples[int(batch['indices'][b])].path}: frame labels need exactly one "
                                     f"label per clip, this clip has {int((vec > 0).sum())}")
                ys.append(torch.full((n,), int(vec.argmax()), dtype=torch.long))
    if per_layer is None:
        raise ValueError("no usable clip in the manifest")
    return LayerFeatures(
        x=torch.cat(xs),
        layers=[torch.cat(store) for store in per_layer],
        utterance=torch.cat(utts),
        labels=torch.cat(ys) if labels is not None else None,
        x_source=x,
        group=group,
    )
