"""The units of transcripts for CTC (``ssamba hubert finetune``): a character vocabulary (blank = 0, space = word
boundary) and espeak-ng phonemes, as ``LabelSet`` (``ssamba.data.manifest``) is the class labels' vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssamba.models.heads import BLANK

__all__ = ["CharVocab", "phonemize"]

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
