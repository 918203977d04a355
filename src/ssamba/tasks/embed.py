"""Per-layer representations of audio files of any length (``ssamba embed``, and ``ssamba.hear``).

Every layer's output of ``extract_features`` (the raw residual stream, one entry per SSAMBA layer pair / SSAST
block) and the final normalised tokens of ``forward_features``: L + 1 rows per position.

Clips up to the model's ``input_tdim`` frames run whole, batched across files. Longer recordings (minutes to
hours) run in **windows** of ``input_tdim`` frames (the length the model was trained at) every ``hop`` frames
(default half a window), read from the file window by window, so memory is bounded by the window, not by the
recording (16 kHz files are read block by block; files at other rates are decoded and resampled whole first).
The time columns of the recording (one per ``tstride`` frames) lie on one grid in every window, and each column
is taken from the window whose centre is nearest (the middle of each overlap is the boundary), so a column
always has the context of at least ``(window - hop) / 2`` frames on both sides where the recording allows it.
Each window is treated as one clip of the official pipeline (clip-mean removal, fbank, normalisation); the
mean removal differs from the whole recording's by float rounding only, since Kaldi removes each frame's DC.

Outputs, by ``pool``:
  ``mean``   (N, L + 1, C) float32 per clip: the mean over the clip's patch tokens (for a long recording, over
             all its columns' tokens), ``OUT.npy`` or ``OUT.safetensors`` (``layers``);
  ``frames`` per clip ``clip{i}`` (L + 1, T_i, C): one vector per time column (the mean of the column's patch
             tokens) and ``clip{i}.times`` (T_i,) the column centres in seconds (``OUT.safetensors``);
  ``none``   per clip ``clip{i}`` (L + 1, K_i, C): every token (clips within ``input_tdim`` only).
Always ``OUT.json``: the files in row order, the model folder, the normalisation and the windowing.

Glossary: L layers (+1: final tokens), C width, K tokens, Fg patch rows, T_i time columns of clip i.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from ssamba import features as feats
from ssamba.audio import SAMPLE_RATE, audio_info, load_audio
from ssamba.data.check import check_splits, header_problem
from ssamba.data.datasets import AudioDataset
from ssamba.data.manifest import read_inputs
from ssamba.models.heads import META_FILE
from ssamba.models.io import load_pretrained, resolve_init

__all__ = ["FRAME_LENGTH", "FRAME_SHIFT", "WindowPlan", "column_times", "column_vectors", "embed", "embed_recording",
           "embed_waveform", "load_encoder"]

POOLS = ("mean", "frames", "none")
# fbank geometry of the official pipeline: 25 ms frames every 10 ms at 16 kHz
FRAME_SHIFT, FRAME_LENGTH = 160, 400


def load_encoder(model_dir: str | os.PathLike, **overrides) -> tuple[torch.nn.Module, float, float]:
    """(encoder in eval mode, fbank mean, fbank std) of a save_pretrained folder, a pretraining run or a
    fine-tuning run or its best/ folder (its encoder, with the normalisation it was trained with); ``overrides``
    change the encoder's config as ``load_pretrained`` does."""
    path = Path(model_dir)
    if not (path / META_FILE).exists() and (path / "best" / META_FILE).exists():
        path = path / "best"
    if (path / META_FILE).exists():  # a fine-tuned model (or probe): its encoder, its own normalisation
        meta = json.loads((path / META_FILE).read_text())
        source, norm = path, (meta["mean"], meta["std"])
    else:
        init = resolve_init(path)
        if init.kind != "folder":
            raise ValueError(f"{model_dir}: needs a model folder or a run, not a {init.kind}")
        source, norm = init.path, init.norm
    mean, std = norm or (feats.AUDIOSET_LIBRISPEECH_MEAN, feats.AUDIOSET_LIBRISPEECH_STD)
    return load_pretrained(source, **overrides).eval(), float(mean), float(std)


# ------------------------------------------------------------------------------------- time columns


def column_times(columns: int, tshape: int, tstride: int, first_column: int = 0) -> torch.Tensor:
    """Centres (seconds) of time columns ``first_column ..``: column j spans frames [j tstride, j tstride +
    tshape), frame i spans samples [160 i, 160 i + 400) at 16 kHz."""
    j = torch.arange(first_column, first_column + columns, dtype=torch.float64)
    start = FRAME_SHIFT * j * tstride
    end = FRAME_SHIFT * (j * tstride + tshape - 1) + FRAME_LENGTH
    return (start + end) / 2 / SAMPLE_RATE


def column_vectors(stack: torch.Tensor, special: int, f_grid: int, t_valid: int) -> torch.Tensor:
    """One item's tokens (L + 1, K, C) -> (L + 1, t_valid, C): the mean of each time column's Fg patch tokens
    (patches are packed frequency-major: token S + f t_valid + t)."""
    patches = stack[:, special : special + f_grid * t_valid]
    return patches.unflatten(1, (f_grid, t_valid)).mean(1)


def _encode(encoder, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fbank (B, T, F), frames (B,) -> (tokens of every layer + final (B, L + 1, K, C), time columns (B,))."""
    device = next(encoder.parameters()).device
    hidden, final, _ = encoder.extract_features_with_final(x.to(device), lengths.to(device))
    lengths = lengths.cpu()
    c = encoder.config
    t_valid = torch.div(lengths - c.tshape, c.tstride, rounding_mode="floor") + 1
    return torch.stack([*hidden, final], dim=1).cpu(), t_valid


# ---------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of a recording of ``total_frames`` fbank frames lie. ``windows`` holds (first frame,
    frames, first owned column, end owned column): window k is encoded on its frames and contributes the
    recording's columns [first owned, end owned), which tile 0 .. ``columns`` exactly once."""

    total_frames: int
    columns: int
    windows: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def make(cls, total_frames: int, window: int, hop: int, tshape: int, tstride: int) -> WindowPlan:
        if total_frames < tshape:
            raise ValueError(f"a recording of {total_frames} frames is shorter than one patch ({tshape} frames)")
        if hop % tstride or not tstride <= hop <= window - tshape + tstride:
            raise ValueError(f"hop must be a multiple of the patch stride {tstride} between {tstride} and "
                             f"{window - tshape + tstride} frames (one window's columns), got {hop}")
        columns = (total_frames - tshape) // tstride + 1
        per_window = (window - tshape) // tstride + 1
        step = hop // tstride
        starts = list(range(0, max(columns - per_window, 0) + 1, step))
        if starts[-1] + per_window < columns:  # the last window ends with the recording
            starts.append(columns - per_window)
        # the middle of each overlap is where one window's columns end and the next one's begin
        bounds = [0, *((a + b + per_window) // 2 for a, b in itertools.pairwise(starts)), columns]
        windows = tuple((s * tstride, min(window, total_frames - s * tstride), bounds[k], bounds[k + 1])
                        for k, s in enumerate(starts))  # fmt: skip
        return cls(total_frames, columns, windows)


def _fbank_windows(read: Callable[[int, int], np.ndarray], plan: WindowPlan, mean: float, std: float
                   ) -> Iterator[torch.Tensor]:
    """Normalised fbank (frames, M) of each window; ``read(first sample, samples)`` gives the 16 kHz audio."""
    for first, frames, _, _ in plan.windows:
        wave = torch.from_numpy(np.ascontiguousarray(read(first * FRAME_SHIFT, (frames - 1) * FRAME_SHIFT
                                                          + FRAME_LENGTH), dtype=np.float32))
        yield feats.normalize(feats.official_fbank(wave)[:frames], mean, std)


@torch.no_grad()
def _embed_windows(encoder, plan: WindowPlan, windows: Iterator[torch.Tensor], batch_size: int,
                   progress: bool = False) -> torch.Tensor:
    """(L + 1, columns, C) column vectors of a recording from its windows' fbank, ``batch_size`` windows per
    forward; only the owned columns of each window are kept."""
    c = encoder.config
    f_grid, special = c.grid[0], encoder.num_special_tokens
    out: list[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.windows), unit="window", leave=False, dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    done = 0

    def flush() -> None:
        nonlocal done
        lengths = torch.tensor([w.shape[0] for w in pending])
        x = torch.nn.utils.rnn.pad_sequence(pending, batch_first=True)
        stack, t_valid = _encode(encoder, x, lengths)
        for row in range(len(pending)):
            first_frame, _, own_from, own_to = plan.windows[done + row]
            cols = column_vectors(stack[row], special, f_grid, int(t_valid[row]))
            first_column = first_frame // c.tstride
            out.append(cols[:, own_from - first_column : own_to - first_column].float())
        done += len(pending)
        pending.clear()
        if bar is not None:
            bar.update(len(lengths))

    for window in windows:
        pending.append(window)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if bar is not None:
        bar.close()
    return torch.cat(out, dim=1)


def _hop(encoder, hop_frames: int | None) -> tuple[int, int]:
    c = encoder.config
    window = c.input_tdim
    if hop_frames is None:  # half a window, on the column grid
        hop_frames = max(c.tstride, (window // 2) // c.tstride * c.tstride)
    return window, hop_frames


def _embed_signal(encoder, samples: int, read: Callable[[int, int], np.ndarray], mean: float, std: float,
                  hop_frames: int | None, batch_size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(column vectors (L + 1, T, C), column centres (T,) in seconds) of a 16 kHz signal of ``samples`` samples
    that ``read(first sample, samples)`` gives, window by window."""
    c = encoder.config
    window, hop = _hop(encoder, hop_frames)
    plan = WindowPlan.make(feats.num_frames(samples), window, hop, c.tshape, c.tstride)
    vectors = _embed_windows(encoder, plan, _fbank_windows(read, plan, mean, std), batch_size,
                             progress=progress and len(plan.windows) > 8)
    return vectors, column_times(plan.columns, c.tshape, c.tstride)


def embed_waveform(encoder, wave: torch.Tensor | np.ndarray, mean: float, std: float, *,
                   hop_frames: int | None = None, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16 kHz mono waveform (S,) of any length -> (column vectors (L + 1, T, C), column centres (T,) in
    seconds), windowed as the module docstring says."""
    wave = torch.as_tensor(wave, dtype=torch.float32).detach().cpu().numpy()
    return _embed_signal(encoder, wave.shape[-1], lambda a, n: wave[a : a + n], mean, std, hop_frames, batch_size)


def embed_recording(encoder, path: str | os.PathLike, mean: float, std: float, *, hop_frames: int | None = None,
                    batch_size: int = 4, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An audio file of any length -> (column vectors (L + 1, T, C), column centres (T,) in seconds). A 16 kHz
    file is read window by window (memory bounded by the window); other rates are decoded and resampled whole."""
    with soundfile.SoundFile(str(path)) as f:
        if f.samplerate != SAMPLE_RATE:
            return embed_waveform(encoder, load_audio(path), mean, std, hop_frames=hop_frames, batch_size=batch_size)

        def read(first: int, count: int) -> np.ndarray:
            f.seek(first)
            block = f.read(count, dtype="float32", always_2d=True)
            if not np.isfinite(block).all():
                raise ValueError(f"{path}: contains NaN or infinite samples")
            return block.mean(axis=1, dtype=np.float64).astype(np.float32) if block.shape[1] > 1 else block[:, 0]

        return _embed_signal(encoder, f.frames, read, mean, std, hop_frames, batch_size, progress)


# ------------------------------------------------------------------------------------------ embed


def _header_frames(path: Path) -> int:
    """fbank frames of the file once at 16 kHz, from its header."""
    return feats.num_frames(round(audio_info(path)[2] * SAMPLE_RATE))


@torch.no_grad()
def embed(model_dir: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
          pool: str = "mean", fmt: str = "npy", batch_size: int = 16, skip_bad: bool = False,
          hop_frames: int | None = None, progress: bool = False) -> dict:
    """Write the representations described in the module docstring; returns the OUT.json summary."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if fmt not in ("npy", "safetensors"):
        raise ValueError(f"format must be npy or safetensors, got {fmt!r}")
    if pool != "mean" and fmt == "npy":
        raise ValueError(f"pool {pool} gives clips of different lengths: use the safetensors format")
    encoder, mean, std = load_encoder(model_dir)
    c = encoder.config
    window, hop = _hop(encoder, hop_frames)
    examples = read_inputs(list(inputs))
    # every file from its header before any is decoded (ssamba.data.check): an unusable one stops here, named
    unusable = check_splits({"input": examples}, skip_bad=skip_bad, log=None, hint="pass --skip-bad")["input"]
    usable = [(i, e) for i, e in enumerate(examples) if not unusable or header_problem(e.path) is None]
    long = {i for i, e in usable if _header_frames(e.path) > window}
    if pool == "none" and long:
        first = examples[min(long)].path
        raise ValueError(f"{first} is longer than the model's input ({window} frames): pool none gives whole-clip "
                         "tokens only; use pool frames (one vector per time column, with timestamps) or mean")
    results: dict[int, torch.Tensor] = {}  # example index -> (L + 1, C), (L + 1, T, C) or (L + 1, K, C)
    times: dict[int, torch.Tensor] = {}
    short = [e for i, e in usable if i not in long]
    short_index = [i for i, _ in usable if i not in long]
    ds = AudioDataset(short, target_length=None, mean=mean, std=std, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate)
    for batch in loader:
        if batch["features"].numel() == 0:
            continue
        stack, t_valid = _encode(encoder, batch["features"], batch["lengths"])
        for row, local in enumerate(batch["indices"].tolist()):
            i, t = short_index[local], int(t_valid[row])
            if pool == "none":
                results[i] = stack[row, :, : encoder.num_special_tokens + c.grid[0] * t].contiguous()
                continue
            results[i] = column_vectors(stack[row], encoder.num_special_tokens, c.grid[0], t)
            times[i] = column_times(t, c.tshape, c.tstride)
    for i in sorted(long):
        results[i], times[i] = embed_recording(encoder, examples[i].path, mean, std, hop_frames=hop,
                                               batch_size=max(1, min(batch_size, 4)), progress=progress)
    if not results:
        raise ValueError("no usable audio file to embed")
    order = sorted(results)
    if pool == "mean":  # every column holds Fg tokens: the mean of the columns is the mean of the patch tokens
        results = {i: results[i].mean(1) for i in order}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix in (".npy", ".safetensors") else out
    from safetensors.torch import save_file

    if pool == "mean":
        array = torch.stack([results[i] for i in order]).float()
        if fmt == "npy":
            np.save(stem.with_suffix(".npy"), array.numpy())
        else:
            save_file({"layers": array}, str(stem.with_suffix(".safetensors")))
    else:
        tensors = {}
        for row, i in enumerate(order):
            tensors[f"clip{row}"] = results[i].float().contiguous()
            if pool == "frames":
                tensors[f"clip{row}.times"] = times[i].float()
        save_file(tensors, str(stem.with_suffix(".safetensors")))
    summary = {"model": str(model_dir), "pool": pool, "format": fmt, "layers": results[order[0]].shape[0],
               "last_is_final_norm": True,
               "width": c.embed_dim, "mean": mean, "std": std, "files": [str(examples[i].path) for i in order],
               "windowed": len(long), "window_frames": window, "hop_frames": hop,
               "skipped": len(examples) - len(order)}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
