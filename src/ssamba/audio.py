"""Audio decoding and resampling.

`load_audio` is the one way audio enters ssamba: decode with libsndfile (through `soundfile`: WAV, FLAC,
OGG/Vorbis, MP3 and more), mix down to mono, resample to the target rate with a band-limited polyphase
resampler, return float32. Every way a file can be bad raises `AudioError` naming the file.

Shapes: a waveform is a 1-D float32 array of samples; `resample` also takes (..., time).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import torch

SAMPLE_RATE = 16000
# One fbank frame (25 ms at 16 kHz): a shorter clip yields no feature frame at all.
MIN_SAMPLES = 400


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    *,
    min_samples: int = MIN_SAMPLES,
) -> np.ndarray:
    """Decode `path` to a mono float32 waveform at `sample_rate` Hz.

    Raises `AudioError` (naming the file) when the file is missing, unreadable, empty, truncated,
    holds NaN/inf samples, or is shorter than `min_samples` after resampling (default: one 25 ms
    frame at 16 kHz).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    try:
        with soundfile.SoundFile(str(path)) as f:
            declared = f.frames
            file_rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)  # (time, channels)
            # a truncated data chunk is read short without an error: see _truncation_note
            header_log = f.extra_info
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: unreadable or corrupt audio ({e})") from e
    if declared == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    shortened = _truncation_note(header_log)
    if shortened or 0 < declared < 2**62 and data.shape[0] < declared:
        detail = shortened or f"{data.shape[0]} of {declared} declared samples readable"
        raise AudioError(f"{path}: truncated audio ({detail})")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    wave = data.mean(axis=1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        wave = resample(wave, file_rate, sample_rate)
    if wave.shape[-1] < min_samples:
        raise AudioError(f"{path}: {_too_short(wave.shape[-1], sample_rate, min_samples)}")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _truncation_note(header_log: str | None) -> str | None:
    """libsndfile shortens a WAV/AIFF whose data chunk runs past the end of the file without an error; its header
    log then reads "data : 16000 (should be 7978)". That line, or None."""
    lines = [ln.strip() for ln in (header_log or "").splitlines()
             if ln.startswith(("data", "SSND")) and "should be" in ln]  # fmt: skip
    return lines[0] if lines else None


def _too_short(samples: int, sample_rate: int, min_samples: int) -> str:
    return f"too short ({samples} samples at {sample_rate} Hz; at least {min_samples} needed for one analysis frame)"


def header_problem(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
                   min_samples: int = MIN_SAMPLES) -> str | None:
    """Why `load_audio(path, sample_rate)` would reject the file, judged from its header alone (nothing decoded:
    ``ssamba.data.check`` runs it over whole splits before training); None when it looks usable. What only decoding
    shows (NaN samples, a corrupt stream behind a valid header) is for `load_audio` to find."""
    path = Path(path)
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a directory, not an audio file"
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        return f"unreadable or corrupt audio ({e})"
    frames = info.frames
    if frames == 0:
        return "empty audio (0 samples)"
    shortened = _truncation_note(info.extra_info)
    if shortened:  # libsndfile reads such a file short without an error
        return f"truncated audio ({shortened})"
    if 0 < frames < 2**62:  # streams of unknown length report a huge count: their length is the loader's to judge
        samples = frames if info.samplerate == sample_rate else math.ceil(frames * sample_rate / info.samplerate)
        if samples < min_samples:
            return _too_short(samples, sample_rate, min_samples)
    return None


def audio_info(path: str | os.PathLike) -> tuple[int, int, float]:
    """(sample_rate, channels, seconds) from the header alone; `AudioError` when unreadable."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from e
    return info.samplerate, info.channels, info.frames / max(info.samplerate, 1)


# --- band-limited polyphase resampling -------------------------------------------------------------
#
# Output sample k of a resampling by new/orig (reduced by their gcd) sits at input time k*orig/new.
# Its value is the input convolved with a Kaiser-windowed sinc low-pass at `rolloff` times the lower
# Nyquist rate. Output samples fall into `new` phases, each with its own fixed filter, so the whole
# operation is one strided conv1d with `new` output channels (the classic polyphase structure).
# The Kaiser window (beta 14.77 over 16 zero crossings) keeps aliasing below about -100 dB.

_ZERO_CROSSINGS = 16
_KAISER_BETA = 14.769656459379492
_ROLLOFF = 0.945


@lru_cache(maxsize=32)
def _polyphase_kernels(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Filters (new, 1, taps) in float64 and the left padding, for gcd-reduced rates."""
    # Twice the low-pass cutoff, in units of the gcd rate (so `cutoff / orig` is relative to the input rate).
    cutoff = min(orig, new) * _ROLLOFF
    half_width = math.ceil(_ZERO_CROSSINGS * orig / cutoff)  # taps on each side, in input samples
    # Input offsets j - k*orig/new relative to each phase's output time, in input samples.
    taps = torch.arange(-half_width, half_width + orig + 1, dtype=torch.float64)
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new
    t = (taps[None, :] - phase) * cutoff / orig  # time in units of the cutoff period
    window = torch.special.i0(_KAISER_BETA * torch.sqrt((1 - (t / _ZERO_CROSSINGS) ** 2).clamp(min=0)))
    window = window / torch.special.i0(torch.tensor(_KAISER_BETA, dtype=torch.float64))
    window = torch.where(t.abs() <= _ZERO_CROSSINGS, window, torch.zeros_like(window))
    kernels = torch.sinc(t) * window * (cutoff / orig)
    return kernels[:, None, :], half_width


def resample(wave: np.ndarray | torch.Tensor, orig_rate: int, new_rate: int):
    """Band-limited resampling of (..., time) from `orig_rate` to `new_rate` Hz.

    Returns the same kind (numpy array or tensor) and dtype it was given; the output has
    ceil(time * new_rate / orig_rate) samples. Computed in float64 for accuracy.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    is_numpy = isinstance(wave, np.ndarray)
    x = torch.from_numpy(np.asarray(wave)) if is_numpy else wave
    if orig_rate == new_rate:
        return wave
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    kernels, half_width = _polyphase_kernels(orig, new)
    shape, length = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, 1, length).to(torch.float64)
    flat = torch.nn.functional.pad(flat, (half_width, half_width + orig))
    y = torch.nn.functional.conv1d(flat, kernels.to(flat.device), stride=orig)  # (batch, new, blocks)
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)
    out_len = math.ceil(new * length / orig)
    y = y[:, :out_len].reshape(*shape, out_len).to(x.dtype)
    return y.numpy() if is_numpy else y


def save_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
               subtype: str = "PCM_16") -> None:
    """Write a mono waveform (float in [-1, 1]) to `path`; the format follows the suffix."""
    soundfile.write(str(path), np.asarray(wave), sample_rate, subtype=subtype)
