"""HuBERT targets: mini-batch k-means over frame features, label files, and cluster quality (``ssamba hubert labels``).

Iteration 1 clusters 39-d MFCC + delta + delta-delta at 100 Hz (fairseq ``simple_kmeans/dump_mfcc_feature.py``:
Kaldi MFCC, use_energy False, no normalisation); iteration 2 clusters one layer of a pretrained model at its
50 Hz frame rate. One k-means model is fitted once, on (a sample of) the training frames, and then applied to
every split alike: a model per split would give valid/test labels whose cluster ids mean something else.

Shape glossary: N frames, D feature dim, K clusters, R reference classes.

Label folder ``OUT/``:
    labels.json           {"k", "label_rate", "source", "layer", "model", "splits": {stem: {...}}, "inertia"}
    kmeans.safetensors    centroids (K, D)
    <manifest stem>.km    one line per manifest entry, space-separated cluster ids (fairseq ``.km`` format)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ssamba import features as feats
from ssamba.audio import SAMPLE_RATE, load_audio
from ssamba.data.check import check_splits
from ssamba.data.manifest import Example, read_manifest

__all__ = [
    "LabelError",
    "MiniBatchKMeans",
    "cluster_quality",
    "expected_label_frames",
    "make_labels",
    "read_label_file",
    "read_labels_for",
    "write_label_file",
]


class LabelError(ValueError):
    """A label file that does not fit its manifest or audio; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ k-means


def sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(1)[None, :]).clamp(min=0)


class MiniBatchKMeans:
    """Mini-batch k-means (Sculley 2010, "Web-scale k-means clustering"; what fairseq's HuBERT recipe uses
    via scikit-learn): k-means++ initialisation on a sample, then per mini-batch assign each point to its
    nearest centroid and move the centroid towards it with rate 1 / (points seen by that centroid).
    The one k-means of the package: HuBERT's targets (``make_labels``) and the clustering MI estimator
    (``ssamba.analysis.mi.discrete_mi``, with ``tol = 0``: a fixed number of iterations). Deterministic given
    ``seed``."""

    def __init__(self, k: int, batch_size: int = 10000, max_iter: int = 100, init_size: int | None = None,
                 seed: int = 0, tol: float = 1e-4):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.batch_size, self.max_iter = k, batch_size, max_iter
        self.init_size = init_size or max(3 * k, min(batch_size, 20000))
        self.seed, self.tol = seed, tol
        self.centroids: Tensor | None = None  # (K, D)
        self.inertia: float | None = None

    def _init_pp(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """k-means++ (Arthur & Vassilvitskii 2007): each next centroid drawn with probability ~ D(x)^2."""
        first = int(torch.randint(x.shape[0], (1,), generator=gen))
        centroids = [x[first]]
        d2 = sq_dist(x, x[first : first + 1]).squeeze(1)  # (N,)
        for _ in range(1, self.k):
            if float(d2.sum()) <= 0:  # fewer distinct points than k: repeat one (gets no points, stays put)
                idx = int(torch.randint(x.shape[0], (1,), generator=gen))
            else:
                idx = int(torch.multinomial(d2, 1, generator=gen))
            centroids.append(x[idx])
            d2 = torch.minimum(d2, sq_dist(x, x[idx : idx + 1]).squeeze(1))
        return torch.stack(centroids)

    def fit(self, x: Tensor) -> MiniBatchKMeans:
        """x (N, D) -> self (centroids, inertia = mean squared distance of x to its centroid)."""
        x = x.double()
        if x.shape[0] < self.k:
            raise ValueError(f"k-means with k={self.k} needs at least {self.k} frames, got {x.shape[0]}")
        gen = torch.Generator().manual_seed(self.seed)
        init = x[torch.randperm(x.shape[0], generator=gen)[: self.init_size]]
        c = self._init_pp(init, gen)
        counts = torch.zeros(self.k, dtype=torch.float64)
        previous = math.inf
        for _ in range(self.max_iter):
            batch = x[torch.randint(x.shape[0], (min(self.batch_size, x.shape[0]),), generator=gen)]
            assign = sq_dist(batch, c).argmin(1)  # (b,)
            # per-centroid update with learning rate 1/count, done in closed form for the batch:
            # c <- (count * c + sum of new points) / (count + n_new)
            sums = torch.zeros_like(c).index_add_(0, assign, batch)
            n_new = torch.bincount(assign, minlength=self.k).double()
            counts_new = counts + n_new
            moved = n_new > 0
            c[moved] = (c[moved] * counts[moved, None] + sums[moved]) / counts_new[moved, None]
            counts = counts_new
            if self.tol <= 0:
                continue
            # early stop on the smoothed batch inertia, like scikit-learn's ewa_inertia criterion
            inertia = float(sq_dist(batch, c).min(1).values.mean())
            if abs(previous - inertia) <= self.tol * max(inertia, 1e-12):
                break
            previous = inertia
        self.centroids = c.float()
        self.inertia = self.score(x)
        return self

    def predict(self, x: Tensor, chunk: int = 65536) -> Tensor:
        """(N, D) -> (N,) nearest-centroid ids."""
        if self.centroids is None:
            raise RuntimeError("k-means model is not fitted")
        c = self.centroids.double()
        return torch.cat([sq_dist(x[i : i + chunk].double(), c).argmin(1) for i in range(0, x.shape[0], chunk)])

    def score(self, x: Tensor, chunk: int = 65536) -> float:
        """Mean squared distance of x (N, D) to the nearest centroid."""
        c = self.centroids.double()
        total = sum(float(sq_dist(x[i : i + chunk].double(), c).min(1).values.sum())
                    for i in range(0, x.shape[0], chunk))
        return total / max(x.shape[0], 1)


# ------------------------------------------------------------------------------------------ cluster quality


def cluster_quality(codes: Tensor, refs: Tensor, num_codes: int | None = None, num_refs: int | None = None) -> dict:
    """Frame-level agreement of cluster ids with reference labels (HuBERT paper Sec. IV-D):
    cluster purity = E over frames of P(most frequent ref | code), ref purity = E P(most frequent code | ref),
    PNMI = I(ref; code) / H(ref). codes, refs: (N,) int."""
    if codes.shape != refs.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and reference labels {tuple(refs.shape)} differ in length")
    k = num_codes or int(codes.max()) + 1
    r = num_refs or int(refs.max()) + 1
    joint = torch.zeros(r, k, dtype=torch.float64)
    joint.index_put_((refs.long(), codes.long()), torch.ones(codes.shape[0], dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    p_ref, p_code = joint.sum(1), joint.sum(0)  # (R,), (K,)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (p_ref[:, None] * p_code[None, :])[nz]).log()).sum())
    h_ref = float(-(p_ref[p_ref > 0] * p_ref[p_ref > 0].log()).sum())
    return {"cluster_purity": float(joint.max(0).values.sum()), "ref_purity": float(joint.max(1).values.sum()),
            "pnmi": mi / h_ref if h_ref > 0 else 0.0, "frames": int(codes.shape[0])}


# ------------------------------------------------------------------------------------------------ label files


def write_label_file(path: str | os.PathLike, codes: Sequence[Tensor]) -> None:
    """One line per utterance of space-separated ids (fairseq ``.km``)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(" ".join(map(str, c.tolist())) + "\n" for c in codes))
    os.replace(tmp, path)


def read_label_file(path: str | os.PathLike) -> list[Tensor]:
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            out.append(torch.tensor([int(v) for v in line.split()], dtype=torch.long))
        except ValueError as e:
            raise LabelError(f"{path}:{lineno}: not a line of integer cluster ids ({e})") from e
    return out


def expected_label_frames(num_samples: int, label_rate: float, conv: dict | None = None) -> int:
    """Frames a label sequence must have for a clip of ``num_samples``: Kaldi frames (25 ms / 10 ms,
    snip edges) at 100 Hz, the model's CNN frames at its rate (``conv`` = {"kernels", "strides"})."""
    if conv is not None:
        from ssamba.models.hubert import conv_frames

        return conv_frames(num_samples, conv["kernels"], conv["strides"])
    if label_rate != 100:
        raise LabelError(f"label rate {label_rate} Hz without a CNN description; MFCC labels are at 100 Hz")
    return int(feats.num_frames(num_samples))


def read_labels_for(label_dir: str | os.PathLike, manifest: str | os.PathLike, check_audio: bool = True
                    ) -> tuple[list[Tensor], dict]:
    """The labels of ``manifest`` from a label folder (``<stem>.km``), checked: one line per entry, ids in
    [0, K), and (``check_audio``) each line's length equal to the frames of its audio at the label rate.
    Returns (per-utterance labels, labels.json metadata)."""
    label_dir = Path(label_dir)
    meta_path = label_dir / "labels.json"
    if not meta_path.exists():
        raise LabelError(f"{meta_path}: not found; make labels with `ssamba hubert labels`")
    meta = json.loads(meta_path.read_text())
    path = label_dir / f"{Path(manifest).stem}.km"
    if not path.exists():
        raise LabelError(f"{path}: no labels for manifest {manifest} (labelled: {', '.join(meta['splits'])})")
    labels = read_label_file(path)
    examples = read_manifest(manifest)
    if len(labels) != len(examples):
        raise LabelError(f"{path}: {len(labels)} lines for {len(examples)} entries of {manifest}")
    for i, (lab, ex) in enumerate(zip(labels, examples, strict=True)):
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= meta["k"]):
            raise LabelError(f"{path}:{i + 1}: cluster id outside [0, {meta['k']})")
        if check_audio:
            import soundfile as sf

            info = sf.info(str(ex.path))
            samples = info.frames
            if info.samplerate != SAMPLE_RATE:  # decoded at 16 kHz by load_audio
                samples = round(info.frames * SAMPLE_RATE / info.samplerate)
            want = expected_label_frames(samples, meta["label_rate"], meta.get("conv"))
            if lab.numel() != want:
                raise LabelError(f"{path}:{i + 1}: {lab.numel()} labels for {ex.path} ({samples} samples), expected "
                                 f"{want} at {meta['label_rate']} Hz")
    return labels, meta


# ------------------------------------------------------------------------------------------------ make labels


def _feature_fn(model_dir: str | None, layer: int | None) -> tuple[Callable[[Tensor], Tensor], float, dict | None]:
    """(waveform (S,) -> frames (N, D), label rate, CNN description or None)."""
    if model_dir is None:
        return (lambda wave: feats.mfcc_with_deltas(wave)), 100.0, None
    from ssamba.models import load_pretrained

    model = load_pretrained(model_dir).eval()
    if getattr(model, "family", None) != "hubert":
        raise ValueError(f"{model_dir}: iteration-2 labels need a HuBERT model, got family {model.family!r}")
    depth = model.config.depth
    if layer is None or not 1 <= layer <= depth:
        raise ValueError(f"--layer must be in 1..{depth} for {model_dir}, got {layer}")

    @torch.no_grad()
    def fn(wave: Tensor) -> Tensor:
        outputs, _ = model.extract_features(wave[None], None, num_layers=layer)
        return outputs[layer - 1][0]

    conv = {"kernels": model.config.conv_kernels, "strides": model.config.conv_strides}
    return fn, model.config.frame_rate, conv


def make_labels(train: str | os.PathLike, others: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                k: int = 100, model_dir: str | None = None, layer: int | None = None, max_fit_frames: int = 200000,
                batch_size: int = 10000, max_iter: int = 100, seed: int = 0, ref_labels: dict | None = None,
                progress: bool = False) -> dict:
    """Fit one mini-batch k-means on ``train``'s frames (a random sample of at most ``max_fit_frames``), write
    labels for ``train`` and every manifest in ``others`` with that same model. ``ref_labels``
    ({manifest stem: label-folder-style .km path of frame-aligned reference classes}) adds purity / PNMI."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fn, rate, conv = _feature_fn(model_dir, layer)
    manifests = [Path(train), *map(Path, others)]
    stems = [m.stem for m in manifests]
    if len(set(stems)) != len(stems):
        raise ValueError(f"manifests must have distinct file names (label files are named by them): {stems}")
    # every manifest's files from their headers before any feature is computed (ssamba.data.check)
    check_splits({m.stem: m for m in manifests}, skip_bad=False, log=None, hint=None)

    def frames_of(examples: list[Example], name: str) -> list[Tensor]:
        it = examples
        if progress:
            from tqdm import tqdm

            it = tqdm(examples, desc=f"features {name}", unit="file")
        return [fn(torch.from_numpy(load_audio(ex.path))).float() for ex in it]

    per_split = {m.stem: frames_of(read_manifest(m), m.stem) for m in manifests}
    train_frames = torch.cat(per_split[manifests[0].stem])
    gen = torch.Generator().manual_seed(seed)
    fit_on = train_frames
    if fit_on.shape[0] > max_fit_frames:
        fit_on = fit_on[torch.randperm(fit_on.shape[0], generator=gen)[:max_fit_frames]]
    km = MiniBatchKMeans(k, batch_size=batch_size, max_iter=max_iter, seed=seed).fit(fit_on)

    from safetensors.torch import save_file

    save_file({"centroids": km.centroids.contiguous()}, str(out / "kmeans.safetensors"))
    meta = {"k": k, "label_rate": rate, "source": "mfcc" if model_dir is None else "layer", "layer": layer,
            "model": None if model_dir is None else str(model_dir), "conv": conv, "fit_frames": int(fit_on.shape[0]),
            "inertia": km.inertia, "splits": {}}  # fmt: skip
    for manifest in manifests:
        frames = per_split[manifest.stem]
        codes = [km.predict(f) for f in frames]
        write_label_file(out / f"{manifest.stem}.km", codes)
        all_codes = torch.cat(codes)
        used = torch.bincount(all_codes, minlength=k)
        entry = {"manifest": str(manifest), "utterances": len(codes), "frames": int(all_codes.numel()),
                 "clusters_used": int((used > 0).sum()), "inertia": km.score(torch.cat(frames))}  # fmt: skip
        if ref_labels and manifest.stem in ref_labels:
            refs = read_label_file(ref_labels[manifest.stem])
            if len(refs) != len(codes) or any(r.numel() != c.numel() for r, c in zip(refs, codes, strict=False)):
                raise LabelError(f"{ref_labels[manifest.stem]}: reference labels are not frame-aligned with "
                                 f"{manifest} at {rate} Hz")
            entry.update(cluster_quality(all_codes, torch.cat(refs), num_codes=k))
        meta["splits"][manifest.stem] = entry
    (out / "labels.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
