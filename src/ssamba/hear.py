"""The HEAR 2021 API over any saved ssamba model, so that hear-eval-kit can evaluate it.

    model = ssamba.hear.load_model("RUN/final")       # a save_pretrained folder, pretraining or fine-tuning run
    emb, ts = ssamba.hear.get_timestamp_embeddings(audio, model)   # audio (n_sounds, n_samples) at 16 kHz
    scene = ssamba.hear.get_scene_embeddings(audio, model)

Per the HEAR specification (hearbenchmark.com, "Common API"): audio is float32 in [-1, 1] at
``model.sample_rate`` Hz, every sound of a batch has the same number of samples; timestamp embeddings are
(n_sounds, n_timestamps, ``model.timestamp_embedding_size``) with timestamps (n_sounds, n_timestamps) in
**milliseconds** at the centre of each frame; scene embeddings are (n_sounds, ``model.scene_embedding_size``).

One timestamp per time column of the encoder (every ``tstride`` fbank frames: 160 ms for 16x16 patches): the
mean of the column's patch tokens of the chosen layer (default the final normalised tokens). Sounds longer than
the model's input run in windows (``ssamba.tasks.embed``): any duration works, in memory bounded by the window.
The scene embedding is the mean of the timestamp embeddings (= the mean of all patch tokens, the official
``avgtok`` pooling).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ssamba.audio import SAMPLE_RATE
from ssamba.tasks.embed import embed_waveform, load_encoder

__all__ = ["HearModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


class HearModel(torch.nn.Module):
    """An encoder with what HEAR asks of a model: ``sample_rate``, ``scene_embedding_size``,
    ``timestamp_embedding_size``; ``layer`` picks the representation (-1: final normalised tokens; 0 .. L-1:
    the residual stream after that layer / layer pair), ``hop_frames`` the windows of long sounds."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: torch.nn.Module, mean: float, std: float, layer: int = -1,
                 hop_frames: int | None = None):
        super().__init__()
        self.encoder, self.mean, self.std = encoder.eval(), mean, std
        self.layer, self.hop_frames = layer, hop_frames
        self.scene_embedding_size = self.timestamp_embedding_size = encoder.config.embed_dim


def load_model(model_file_path: str | os.PathLike = "", *, layer: int = -1, hop_frames: int | None = None
               ) -> HearModel:
    """The HEAR entry point: ``model_file_path`` is a save_pretrained folder or an ssamba run folder."""
    if not str(model_file_path):
        raise ValueError("ssamba.hear.load_model needs a model folder (save_pretrained) or a run folder")
    encoder, mean, std = load_encoder(model_file_path)
    return HearModel(encoder, mean, std, layer, hop_frames)


@torch.no_grad()
def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """audio (n_sounds, n_samples) -> (embeddings (n_sounds, n_timestamps, D), timestamps (n_sounds,
    n_timestamps) in milliseconds), on the audio's device."""
    if audio.dim() != 2:
        raise ValueError(f"HEAR audio is (n_sounds, n_samples), got shape {tuple(audio.shape)}")
    embeddings = []
    for sound in audio:
        vectors, seconds = embed_waveform(model.encoder, sound.float().cpu(), model.mean, model.std,
                                          hop_frames=model.hop_frames)
        embeddings.append(vectors[model.layer])  # (T, D)
    times = (seconds * 1000.0).float()
    return (torch.stack(embeddings).to(audio.device),
            times[None].expand(audio.shape[0], -1).contiguous().to(audio.device))


@torch.no_grad()
def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """audio (n_sounds, n_samples) -> (n_sounds, D): the mean of the timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)
