"""Kaldi-compatible features in pure PyTorch: fbank, MFCC (+deltas), and the official SSAST/SSAMBA
spectrogram pipeline (clip-mean removal, fbank, pad/cut, normalisation).

Batched and device-agnostic: functions take (..., time) waveforms and return (..., frames, bins).
They follow Kaldi's `compute-fbank-feats` / `compute-mfcc-feats` as `torchaudio.compliance.kaldi` does,
step for step in the same float32 order, so the official features are reproduced to float rounding
(`../shared/conformance/fbank`). Note `torch.stft` alone is not equivalent: Kaldi removes each frame's
DC offset and pre-emphasises inside the frame before windowing.

Glossary: B batch, T samples, F frames = 1 + (T - frame_length) // frame_shift (Kaldi `snip_edges`),
M mel bins, C cepstra.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
# float32 machine epsilon: Kaldi's (and torchaudio's) floor before the log; log(eps) = -15.942385.
_LOG_FLOOR = torch.finfo(torch.float32).eps

# The official SSAST/SSAMBA fbank arguments (src/dataloader.py, `_wav2fbank`): htk_compat=True,
# use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10; Kaldi
# defaults for the rest (25 ms frames, pre-emphasis 0.97, DC removal, 20 Hz low cut-off).
OFFICIAL_MEL_BINS = 128
# Normalisation statistics the official pretraining scripts use (AudioSet + LibriSpeech,
# run_mask_patch_amba.sh).
AUDIOSET_LIBRISPEECH_MEAN = -4.2677393
AUDIOSET_LIBRISPEECH_STD = 4.5689974


def num_frames(num_samples: int | torch.Tensor, sample_rate: int = SAMPLE_RATE,
               frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0):
    """Frames Kaldi produces for `num_samples` (snip_edges=True); 0 when shorter than one frame."""
    length, shift = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples < length, 0, 1 + torch.div(num_samples - length, shift, rounding_mode="floor"))
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def _frame_geometry(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int]:
    # Kaldi rounds the frame geometry in samples (int(rate * ms / 1000)).
    return int(sample_rate * frame_length_ms * 0.001), int(sample_rate * frame_shift_ms * 0.001)


def _window(kind: str, length: int, device, dtype) -> torch.Tensor:
    if kind == "hanning":  # Kaldi's "hanning" is the symmetric Hann window
        return torch.hann_window(length, periodic=False, device=device, dtype=dtype)
    if kind == "povey":  # Kaldi's default: Hann to the power 0.85
        return torch.hann_window(length, periodic=False, device=device, dtype=dtype).pow(0.85)
    if kind == "hamming":
        return torch.hamming_window(length, periodic=False, alpha=0.54, beta=0.46, device=device, dtype=dtype)
    if kind == "rectangular":
        return torch.ones(length, device=device, dtype=dtype)
    raise ValueError(f"unknown window_type {kind!r}; choose hanning, povey, hamming or rectangular")


def _mel(freq: torch.Tensor | float):
    """Kaldi's mel scale, 1127 ln(1 + f / 700) (written as log(1 + x), not log1p: same rounding as Kaldi)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=16)
def _mel_banks(num_bins: int, fft_size: int, sample_rate: int, low_freq: float, high_freq: float) -> torch.Tensor:
    """Triangular filters (M, fft_size // 2 + 1) on the mel scale, as Kaldi's MelBanks.

    Computed in float32 like torchaudio's `get_mel_banks`, so that the filter weights (and therefore
    the features) agree to the last bit. The Nyquist bin gets weight 0 (Kaldi only uses fft_size/2 bins).
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist  # Kaldi: non-positive high_freq is an offset from Nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"bad mel range low_freq={low_freq}, high_freq={high_freq} at {sample_rate} Hz")
    num_fft_bins = fft_size // 2
    fft_bin_width = sample_rate / fft_size
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * mel_delta
    center = mel_low + (b + 1.0) * mel_delta
    right = mel_low + (b + 2.0) * mel_delta
    mel = _mel(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (M, fft_size // 2)
    return F.pad(banks, (0, 1))  # (M, fft_size // 2 + 1)


def _log_mel_energies(
    waveform: torch.Tensor,
    *,
    sample_rate: int,
    num_mel_bins: int,
    frame_length_ms: float,
    frame_shift_ms: float,
    window_type: str,
    preemphasis: float,
    remove_dc_offset: bool,
    dither: float,
    low_freq: float,
    high_freq: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T) -> log mel energies (..., F, M) and the log frame energies (..., F) before windowing."""
    length, shift = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    if waveform.shape[-1] < length:
        raise ValueError(f"waveform of {waveform.shape[-1]} samples is shorter than one frame ({length} samples)")
    fft_size = 1 << (length - 1).bit_length()  # Kaldi round_to_power_of_two: 400 -> 512
    frames = waveform.unfold(-1, length, shift)  # (..., F, length)
    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, dtype=frames.dtype).to(frames.device)
        frames = frames + dither * noise
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    log_energy = torch.clamp(frames.pow(2).sum(-1), min=_LOG_FLOOR).log()  # (..., F)
    if preemphasis != 0.0:
        # x[i] - k * x[i-1], with x[-1] := x[0] (Kaldi replicates the first sample)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * previous
    frames = frames * _window(window_type, length, frames.device, frames.dtype)
    frames = F.pad(frames, (0, fft_size - length))  # (..., F, fft_size)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (..., F, fft_size // 2 + 1)
    banks = _mel_banks(num_mel_bins, fft_size, sample_rate, float(low_freq), float(high_freq))
    mel = torch.matmul(power, banks.to(power.device, power.dtype).T)  # (..., F, M)
    return torch.clamp(mel, min=_LOG_FLOOR).log(), log_energy


def fbank(
    waveform: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    *,
    num_mel_bins: int = OFFICIAL_MEL_BINS,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: str = "hanning",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_energy: bool = False,
    htk_compat: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Kaldi log mel filterbank of (..., T) waveforms -> (..., F, M) (M+1 with `use_energy`).

    Defaults are the official SSAST/SSAMBA arguments. Waveforms are floats in [-1, 1] as the official
    loader passes them (Kaldi itself works on int16-scaled samples: multiply by 32768 for that).
    """
    logmel, log_energy = _log_mel_energies(
        waveform, sample_rate=sample_rate, num_mel_bins=num_mel_bins, frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms, window_type=window_type, preemphasis=preemphasis,
        remove_dc_offset=remove_dc_offset, dither=dither, low_freq=low_freq, high_freq=high_freq,
        generator=generator,
    )
    if use_energy:  # htk_compat puts the energy last, Kaldi first
        energy = log_energy.unsqueeze(-1)
        logmel = torch.cat([logmel, energy] if htk_compat else [energy, logmel], dim=-1)
    return logmel


@lru_cache(maxsize=8)
def _dct_matrix(num_ceps: int, num_mel_bins: int) -> torch.Tensor:
    """(M, C) orthonormal DCT-II with Kaldi's first column sqrt(1/M)."""
    n = torch.arange(num_mel_bins, dtype=torch.float32)
    k = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
    dct = torch.cos(math.pi / num_mel_bins * (n + 0.5) * k)  # (M, M): row k is basis k
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / num_mel_bins)
    dct = dct.t().contiguous()  # (M, M): column k is basis k
    dct[:, 0] = math.sqrt(1.0 / num_mel_bins)
    return dct[:, :num_ceps]


def mfcc(
    waveform: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    *,
    num_ceps: int = 13,
    num_mel_bins: int = 23,
    cepstral_lifter: float = 22.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: str = "povey",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    dither: float = 0.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_energy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Kaldi MFCC of (..., T) -> (..., F, C), Kaldi defaults (HuBERT uses them with use_energy=False)."""
    if num_ceps > num_mel_bins:
        raise ValueError(f"num_ceps ({num_ceps}) cannot exceed num_mel_bins ({num_mel_bins})")
    logmel, log_energy = _log_mel_energies(
        waveform, sample_rate=sample_rate, num_mel_bins=num_mel_bins, frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms, window_type=window_type, preemphasis=preemphasis,
        remove_dc_offset=remove_dc_offset, dither=dither, low_freq=low_freq, high_freq=high_freq,
        generator=generator,
    )
    ceps = torch.matmul(logmel, _dct_matrix(num_ceps, num_mel_bins).to(logmel.device, logmel.dtype))
    if cepstral_lifter != 0.0:
        i = torch.arange(num_ceps, device=ceps.device, dtype=ceps.dtype)
        ceps = ceps * (1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * i / cepstral_lifter))
    if use_energy:  # Kaldi replaces c0 by the log energy
        ceps = torch.cat([log_energy.unsqueeze(-1), ceps[..., 1:]], dim=-1)
    return ceps


def deltas(features: torch.Tensor, window: int = 2) -> torch.Tensor:
    """Regression deltas along frames of (..., F, D): sum_k k (x[t+k] - x[t-k]) / (2 sum_k k^2),
    edges replicated (Kaldi `add-deltas`, torchaudio `compute_deltas` with win_length 5)."""
    if features.shape[-2] == 0:
        return features.clone()
    denom = 2 * sum(k * k for k in range(1, window + 1))
    first, last = features[..., :1, :], features[..., -1:, :]
    padded = torch.cat([first.expand(*first.shape[:-2], window, -1), features,
                        last.expand(*last.shape[:-2], window, -1)], dim=-2)
    n = features.shape[-2]
    out = torch.zeros_like(features)
    for k in range(1, window + 1):
        out = out + k * (padded[..., window + k:window + k + n, :] - padded[..., window - k:window - k + n, :])
    return out / denom


def mfcc_with_deltas(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The 39-d HuBERT first-iteration k-means input: 13 MFCC (use_energy=False) + Δ + ΔΔ, (..., F, 39)."""
    ceps = mfcc(waveform, sample_rate, use_energy=False)
    d1 = deltas(ceps)
    return torch.cat([ceps, d1, deltas(d1)], dim=-1)


# --- the official spectrogram pipeline -------------------------------------------------------------

def pad_or_cut(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end or cut (..., F, M) to `target_length` frames (official `_wav2fbank`)."""
    n = features.shape[-2]
    if n < target_length:
        return F.pad(features, (0, 0, 0, target_length - n))
    return features[..., :target_length, :]


def normalize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The official normalisation (x - mean) / (2 * std)."""
    return (features - mean) / (2.0 * std)


def official_fbank(waveform: torch.Tensor, target_length: int | None = None, *,
                   sample_rate: int = SAMPLE_RATE, num_mel_bins: int = OFFICIAL_MEL_BINS) -> torch.Tensor:
    """Official `AudioDataset._wav2fbank` for one clip (T,) or (1, T): remove the clip mean, fbank,
    then pad/cut to `target_length` frames (when given). Un-normalised (F, M)."""
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"expected one mono clip (T,) or (1, T), got shape {tuple(waveform.shape)}")
    feats = fbank(waveform - waveform.mean(), sample_rate, num_mel_bins=num_mel_bins)
    return feats if target_length is None else pad_or_cut(feats, target_length)


def batch_fbank(waveforms: torch.Tensor, lengths: torch.Tensor | None = None, *,
                sample_rate: int = SAMPLE_RATE, num_mel_bins: int = OFFICIAL_MEL_BINS,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official clip-mean removal + fbank for a padded batch (B, T) with valid `lengths` (B,).

    Returns (B, F, M) features and valid frame counts (B,); each item's valid frames equal
    `official_fbank` of the item alone (the mean is taken over its valid samples only), and the
    frames past an item's length are zeros (the official padding value before normalisation).
    """
    if lengths is None:
        lengths = torch.full((waveforms.shape[0],), waveforms.shape[-1], device=waveforms.device)
    lengths = lengths.to(waveforms.device)
    valid = torch.arange(waveforms.shape[-1], device=waveforms.device) < lengths[:, None]  # (B, T)
    # Per item, as `waveform.mean()` over its valid samples: a masked sum would round differently.
    mean = torch.stack([w[:n].mean() for w, n in zip(waveforms, lengths.tolist(), strict=True)]).unsqueeze(1)
    feats = fbank((waveforms - mean) * valid, sample_rate, num_mel_bins=num_mel_bins)  # (B, F, M)
    frame_lengths = num_frames(lengths, sample_rate)
    keep = torch.arange(feats.shape[-2], device=feats.device) < frame_lengths[:, None]  # (B, F)
    return feats * keep.unsqueeze(-1), frame_lengths
