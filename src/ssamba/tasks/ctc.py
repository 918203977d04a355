"""Speech recognition and reconstruction downstreams over HuBERT-family representations.

* :class:`CharVocab` - characters of the training transcripts, blank = 0 (CTC), space = word boundary.
* :class:`CTCHead` - a chosen encoder layer (or the normalised last one) -> optional small Conformer
  downstream (attention Conformer blocks, Gulati et al. 2020) -> Linear to the vocabulary; trained with CTC
  (Graves et al. 2006). Mamba-HuBERT (Zhang et al. 2025, Table 2) compares exactly these two set-ups.
* :func:`greedy_decode`, :func:`edit_distance`, :func:`error_rates` - best-path decoding and CER / WER.
* :class:`ReconstructionHead` - predicts the (100 Hz) log-mel fbank from the 50 Hz representations (two fbank
  frames per representation frame), clean or from a noisy input (denoising): the "reconstruction" kind of task
  of the seed's reconstruction-vs-classification hypothesis.

Shape glossary: B batch, T frames (50 Hz), C width, V vocabulary (incl. blank), U transcript length,
F fbank frames (100 Hz), M mel bins.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.nn.conformer import ConformerBlock

__all__ = ["BLANK", "CTCHead", "CharVocab", "ReconstructionHead", "edit_distance", "error_rates", "greedy_decode",
           "load_head", "phonemize", "save_head"]

# A saved head folder: its weights (encoder included) and what builds it again (load_head needs nothing else).
HEAD_WEIGHTS, HEAD_CONFIG, VOCAB_FILE = "head.safetensors", "head.json", "vocab.json"

BLANK = 0
_STRESS = str.maketrans("", "", "\u02c8\u02cc")  # IPA primary / secondary stress marks


def phonemize(text: str, voice: str = "en-us") -> str:
    """IPA phoneme string of a transcript from espeak-ng (the tool the demo corpus is rendered with), stress
    marks removed, words separated by spaces; its symbols are the CTC units of ``units = "phonemes"``."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed; phoneme targets need it (apt-get install espeak-ng)")
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", voice, text], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.translate(_STRESS).split())


class CharVocab:
    """Character vocabulary; transcripts are lower-cased, runs of white space become one space."""

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError(f"vocabulary must be distinct single characters, got {list(chars)}")
        self.chars = list(chars)
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}  # 0 is the CTC blank

    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(text.lower().split())

    @classmethod
    def from_transcripts(cls, transcripts: Sequence[str]) -> CharVocab:
        return cls(sorted({c for t in transcripts for c in cls.normalize(t)}))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        text = self.normalize(text)
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"transcript {text!r} has characters outside the vocabulary: {unknown}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != BLANK)


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: (B, T, V) log-probabilities, (B,) frames -> per item the argmax ids with repeats
    collapsed and blanks removed."""
    best = log_probs.argmax(-1)  # (B, T)
    out = []
    for row, n in zip(best, lengths.tolist(), strict=True):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != BLANK])
    return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus CER and WER: total edits / total reference characters (words)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ce = cn = we = wn = 0
    for r, h in zip(refs, hyps, strict=True):
        ce += edit_distance(r, h)
        cn += len(r)
        we += edit_distance(r.split(), h.split())
        wn += len(r.split())
    return {"cer": ce / max(cn, 1), "wer": we / max(wn, 1), "chars": cn, "words": wn}


def _select_layer(encoder: nn.Module, waveforms: Tensor, lengths: Tensor, layer: int | None,
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
        h, frame_lengths = _select_layer(self.encoder, waveforms, lengths, self.layer, mask)  # (B, T, C)
        if self.downstream is not None:
            h = self.down_proj(h)
            for block in self.downstream:
                h = block(h, frame_lengths)
        return F.log_softmax(self.out(self.drop(h)).float(), dim=-1), frame_lengths

    def ctc_loss(self, log_probs: Tensor, frame_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        """Mean over items of the CTC loss divided by the target length (``reduction="mean"``)."""
        return F.ctc_loss(log_probs.transpose(0, 1), targets, frame_lengths, target_lengths, blank=BLANK,
                          zero_infinity=True)


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
        h, frame_lengths = _select_layer(self.encoder, waveforms, lengths, self.layer)  # (B, T, C)
        pred = self.proj(h)  # (B, T, ratio * M)
        b, t, _ = pred.shape
        return pred.reshape(b, t * self.ratio, self.num_mel_bins), frame_lengths * self.ratio


_HEADS = {"ctc": CTCHead, "reconstruction": ReconstructionHead}


def save_head(head: CTCHead | ReconstructionHead, folder: str | Path, vocab: CharVocab | None = None) -> Path:
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
        (folder / VOCAB_FILE).write_text(json.dumps(vocab.chars) + "\n")
    return folder


def load_head(folder: str | Path) -> CTCHead | ReconstructionHead:
    """The head saved by :func:`save_head` in ``folder`` (eval mode), encoder included."""
    from safetensors.torch import load_file

    from ssamba.models.spectrogram import FAMILIES

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
