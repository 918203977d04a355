"""An s3prl-style upstream around our spectrogram encoders, so SUPERB downstreams (s3prl's
``run_downstream.py -u ... -s hidden_states``) can use SSAMBA / SSAST.

The s3prl upstream contract: ``forward(wavs)`` takes a list of unpadded 16 kHz waveforms (T_i,) and returns
``{"hidden_states": [ (B, T_max, C) per layer ], ...}`` with frame-level features padded at the end;
``get_downsample_rates(key)`` gives the input samples per output frame.

From waveform to frames: each waveform gets the official fbank (25 ms window, 10 ms hop, 128 mel bins) and
the encoder's normalisation alone (so padding never changes it); the batch is padded and encoded with its
lengths, so every item's outputs equal the item's alone. Special tokens are dropped; the Fg frequency
patches of one time column are averaged, one output frame per patch column, i.e. one frame every
``tstride`` fbank frames: downsample rate = 160 * tstride samples. (The official SSAST s3prl upstream
serves frame-based 128x2 models; for 16x16 patch models the column mean is our choice.)

Glossary: B waveforms, T samples, Tf fbank frames, Fg patch rows, Tg patch columns, C width.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ssamba import features as feats
from ssamba.audio import SAMPLE_RATE
from ssamba.models.spectrogram import SpectrogramEncoder
from ssamba.tasks.embed import FRAME_LENGTH, FRAME_SHIFT, column_vectors, load_encoder

__all__ = ["UpstreamExpert"]


class UpstreamExpert(nn.Module):
    """``UpstreamExpert(ckpt)``: ckpt is a save_pretrained folder, a pretraining run (RUN/final) or a
    fine-tuning run (RUN/best); or pass ``model=`` directly. ``mean``/``std``: fbank normalisation (default:
    the run's values when the folder records them, else the official AudioSet ones). ``input_tdim``:
    longest input in fbank frames (the position embedding is converted to it, official method)."""

    def __init__(self, ckpt: str | os.PathLike | None = None, *, model: SpectrogramEncoder | None = None,
                 mean: float | None = None, std: float | None = None, input_tdim: int | None = None, **kwargs):
        super().__init__()
        if (ckpt is None) == (model is None):
            raise ValueError("give exactly one of ckpt (a model folder) or model")
        known_mean, known_std = feats.AUDIOSET_LIBRISPEECH_MEAN, feats.AUDIOSET_LIBRISPEECH_STD
        if model is None:
            overrides = {"num_classes": 0, **({"input_tdim": input_tdim} if input_tdim else {}), **kwargs}
            model, known_mean, known_std = load_encoder(ckpt, **overrides)
        if getattr(model, "input_kind", "fbank") != "fbank":
            raise ValueError("UpstreamExpert wraps spectrogram encoders (input_kind 'fbank')")
        self.model = model.eval()
        self.mean = known_mean if mean is None else mean
        self.std = known_std if std is None else std

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Input samples per output frame: 10 ms fbank hop x tstride."""
        return FRAME_SHIFT * self.model.config.tstride

    def _fbank(self, wav: Tensor) -> Tensor:
        if wav.dim() != 1:
            raise ValueError(f"each waveform must be 1-D (samples,), got shape {tuple(wav.shape)}")
        fbank = feats.official_fbank(wav.float().cpu(), sample_rate=SAMPLE_RATE,
                                     num_mel_bins=self.model.config.input_fdim)  # fmt: skip
        return feats.normalize(fbank, self.mean, self.std)

    def forward(self, wavs: list[Tensor]) -> dict:
        """list of (T_i,) -> {"hidden_states": L x (B, Tg_max, C), "last_hidden_state": (B, Tg_max, C),
        "lengths": (B,) valid output frames}. Padding frames are zero."""
        if not wavs:
            raise ValueError("forward needs at least one waveform")
        device = next(self.model.parameters()).device
        fbanks = [self._fbank(w) for w in wavs]  # Tf_i x F
        lengths = torch.tensor([f.shape[0] for f in fbanks])
        c = self.model.config
        if int(lengths.min()) < c.tshape:
            shortest = (c.tshape - 1) * FRAME_SHIFT + FRAME_LENGTH
            raise ValueError(f"a waveform gives {int(lengths.min())} fbank frames, fewer than one patch "
                             f"({c.tshape}); the shortest accepted is {shortest} samples")
        x = torch.zeros(len(wavs), int(lengths.max()), c.input_fdim)
        for row, f in zip(x, fbanks, strict=True):
            row[: f.shape[0]] = f
        hidden, token_lengths = self.model.extract_features(x.to(device), lengths.to(device))
        s, f_grid = self.model.num_special_tokens, c.grid[0]
        columns = (token_lengths - s) // f_grid  # (B,) valid time columns
        stack = torch.stack(hidden, dim=1)  # (B, L, K, C)
        out = stack.new_zeros(len(hidden), len(wavs), int(columns.max()), stack.shape[-1])  # (L, B, Tg_max, C)
        for b, t in enumerate(columns.tolist()):  # the mean over the Fg rows of each time column
            out[:, b, :t] = column_vectors(stack[b], s, f_grid, t)
        frames = list(out.unbind(0))
        return {"hidden_states": frames, "last_hidden_state": frames[-1], "lengths": columns}
