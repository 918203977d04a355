"""Training-time augmentation of normalised fbank batches: the official SSAST / SSAMBA fine-tuning set (mixup,
SpecAugment, noise; in their ``AudioDataset``), drawn from a given generator so that a resumed run draws the same.

Shape glossary: B batch, T frames, F mel bins, Q classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["augment_batch"]


def augment_batch(x: Tensor, lengths: Tensor, y: Tensor, gen: torch.Generator, *, freqm: int = 0, timem: int = 0,
                  mixup: float = 0.0, noise: bool = False, pad_value: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Official training-time augmentation of a normalised fbank batch x (B, T, F), lengths (B,), targets y (B, Q),
    in the official order.

    mixup: with probability ``mixup`` an item is mixed with another item of the batch, lambda ~ Beta(10, 10),
    labels mixed alike (official ``AudioDataset``: waveform mixing with a random dataset item; here fbank mixing
    with a random batch item, so it needs no second decode). SpecAugment: one frequency and one time mask per
    item of width U{0..m-1} (``freqm``, ``timem``; torchaudio ``FrequencyMasking`` / ``TimeMasking``), filled with
    ``pad_value``, what zero becomes after normalisation (upstream masks before normalising). noise: + U(0,1) *
    U(0,1)/10, then roll the time axis by U{-10..9} frames (official ``noise``).
    """
    x, lengths, y = x.clone(), lengths.clone(), y.clone()
    b, t, f = x.shape
    if mixup > 0:
        partner = torch.randint(0, b, (b,), generator=gen)
        mix = torch.rand(b, generator=gen) < mixup
        lam = _beta(b, gen)
        lam = torch.where(mix, lam, torch.ones_like(lam))
        x = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
        y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
        lengths = torch.where(mix, torch.maximum(lengths, lengths[partner]), lengths)
    for width, axis, size in ((freqm, 2, f), (timem, 1, t)):
        if width <= 0:
            continue
        w = (torch.rand(b, generator=gen) * width).long()  # U{0..width-1}
        start = (torch.rand(b, generator=gen) * (size - w + 1).float()).long()
        pos = torch.arange(size)[None, :]
        band = (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (B, size)
        x = x.masked_fill(band[:, None, :] if axis == 2 else band[:, :, None], pad_value)
    if noise:
        scale = torch.rand(b, 1, 1, generator=gen) / 10
        x = x + torch.rand(x.shape, generator=gen) * scale
        shifts = torch.randint(-10, 10, (b,), generator=gen).tolist()
        x = torch.stack([torch.roll(row, s, dims=0) for row, s in zip(x, shifts, strict=True)])
    return x, lengths, y


def _beta(n: int, gen: torch.Generator, alpha: float = 10.0) -> Tensor:
    """Beta(alpha, alpha) samples from the run's generator (ratio of Gamma variates via sums of
    exponentials: alpha is an integer here, so Gamma(alpha) = sum of alpha Exp(1))."""
    e = -torch.log(torch.rand(n, 2, int(alpha), generator=gen).clamp_min(1e-12)).sum(-1)
    return e[:, 0] / e.sum(-1)
