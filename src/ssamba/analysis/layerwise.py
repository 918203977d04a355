"""Layer-wise MI curves of several models, grouped into panels: hidden states -> PCA -> MINE I(X; T_l) over
seeds (+ clustering I(T_l; Y), CCA) -> JSON (+ PNG through ``plots``).

Shape glossary: N frames, Dx / D_l widths of X and of layer l, d = ``dims`` PCA components, L layers.

Why PCA: the grouped frames are wide (a time column of SSAMBA-tiny is 8 x 192 = 1536 values) and a few
thousand frames are all a small corpus has; MINE in that many dimensions measures the statistics network's
capacity more than the data. Both X and every T_l are projected on their ``dims`` leading principal
components (fitted on all frames: unsupervised, no labels involved), so each point of a curve estimates
I(PCA(X); PCA(T_l)) <= I(X; T_l) (data processing) at identical estimator settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ssamba.analysis.hidden import collect_hidden, load_model
from ssamba.analysis.mi import cca, discrete_mi, mine_mi, seed_summary

__all__ = ["AnalysisConfig", "ModelSpec", "Panel", "analyze", "format_table", "pca"]


@dataclass
class AnalysisConfig:
    # MINE seeds: each a fresh statistics network, split and batch order; curves show mean +- std
    seeds: tuple[int, ...] = (0, 1, 2)
    # PCA components kept of X and of each layer (0 = no reduction)
    dims: int = 16
    # X: "input" (raw input patches / MFCC) or "layer:K"
    x: str = "input"
    # how patch tokens become frames: "concat" | "mean" | "patch" (see analysis.hidden)
    group: str = "concat"
    # at most this many clips of the dataset, then at most this many frames (random, seed 0); None = all
    max_items: int | None = None
    max_frames: int | None = 6000
    # MINE: statistics-network width, optimiser steps, batch, learning rate, EMA rate (None = plain DV)
    hidden: int = 64
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    ema: float | None = 0.01
    # fraction of utterances held out for evaluating the bound (and the clustering counts)
    held_out: float = 0.3
    # clustering estimator of I(T_l; Y) (only with labels): k-means centres
    k: int = 32
    # linear CCA of X and T_l (held-out canonical correlations, Gaussian MI)
    cca: bool = False
    # fbank normalisation of the models' inputs (must match their training); extraction batch size
    mean: float = -4.2677393
    std: float = 4.5689974
    extract_batch_size: int = 16


@dataclass
class ModelSpec:
    label: str
    spec: str  # checkpoint path, run folder, or random:PATH


@dataclass
class Panel:
    title: str
    models: list[ModelSpec] = field(default_factory=list)


def pca(v: Tensor, dims: int) -> Tensor:
    """(N, D) -> (N, min(dims, D)) projection on the leading principal components. Randomised SVD
    (Halko et al.; ``torch.svd_lowrank`` with 4 power iterations, seeded inside a forked RNG, so it is
    deterministic and leaves the global RNG alone): O(N D dims) instead of an O(D^3) eigendecomposition of
    the 2048-wide covariance. The sign of each component is fixed by its largest loading."""
    if dims <= 0 or v.shape[1] <= dims:
        return v
    centred = v.float() - v.float().mean(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, _, vec = torch.svd_lowrank(centred, q=min(dims + 10, *v.shape), niter=4)
    top = vec[:, :dims]  # (D, dims), singular values in descending order
    top = top * torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return centred @ top


def _analyze_model(features, cfg: AnalysisConfig, log) -> dict:
    x, utt, labels = features.x, features.utterance, features.labels
    layers = features.layers
    if cfg.max_frames is not None and x.shape[0] > cfg.max_frames:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.max_frames].sort().values
        x, utt, layers = x[keep], utt[keep], [h[keep] for h in layers]
        labels = None if labels is None else labels[keep]
    xr = pca(x, cfg.dims)
    mine_opts = dict(hidden=cfg.hidden, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema=cfg.ema,
                     held_out=cfg.held_out, groups=utt)
    out: dict = {"frames": int(x.shape[0]), "utterances": int(utt.unique().numel()), "x_dim": int(features.x.shape[1]),
                 "layer_dims": [int(h.shape[1]) for h in features.layers], "mine": [], "discrete": [], "cca": []}
    for i, h in enumerate(layers):
        t0 = time.perf_counter()
        hr = pca(h, cfg.dims)
        out["mine"].append(seed_summary([mine_mi(xr, hr, seed=s, **mine_opts) for s in cfg.seeds]))
        if labels is not None:
            out["discrete"].append(seed_summary([
                discrete_mi(hr, labels, k=cfg.k, seed=s, held_out=cfg.held_out, groups=utt) for s in cfg.seeds]))
        if cfg.cca:
            out["cca"].append(cca(xr, hr, seed=cfg.seeds[0], held_out=cfg.held_out, groups=utt))
        m = out["mine"][-1]
        log(f"    layer {i + 1}/{len(layers)}: MINE {m['mean']:.3f} +- {m['std']:.3f} nats"
            + (f", I(T;Y)/H(Y) {out['discrete'][-1]['mean']:.3f}" if labels is not None else "")
            + f"  ({time.perf_counter() - t0:.1f} s)")
    if labels is not None:
        # chance level of the clustering measure: the last layer with labels shuffled across utterances
        ids = utt.unique()
        perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
        utt_label = {int(u): int(labels[utt == u][0]) for u in ids}
        shuffled = torch.tensor([utt_label[int(perm[(ids == u).nonzero()[0, 0]])] for u in utt.tolist()])
        out["discrete_chance"] = discrete_mi(pca(layers[-1], cfg.dims), shuffled, k=cfg.k, seed=0,
                                             held_out=cfg.held_out, groups=utt)
    means = torch.tensor([m["mean"] for m in out["mine"]])
    top = float(means.max())
    # normalised curve: MI / the curve's maximum, so models of different estimator scale overlay on [0, 1]
    out["mine_normalised"] = [{"mean": m["mean"] / top, "std": m["std"] / top} if top > 0 else
                              {"mean": 0.0, "std": 0.0} for m in out["mine"]]
    out["argmin_layer"] = int(means.argmin()) + 1
    out["v_shape"] = _v_shape(out["mine"])
    return out


def _v_shape(curve: list[dict]) -> dict:
    """Does the mean curve fall and then rise again? Reports the minimum layer (1-based) and how far the
    last layer rises above it, in nats and in pooled seed standard deviations (a rise within ~2 std is noise)."""
    means = [c["mean"] for c in curve]
    stds = [c["std"] for c in curve]
    i = min(range(len(means)), key=means.__getitem__)
    rise = means[-1] - means[i]
    pooled = (0.5 * (stds[i] ** 2 + stds[-1] ** 2)) ** 0.5
    return {"min_layer": i + 1, "rise_nats": rise, "rise_in_std": rise / pooled if pooled > 0 else None,
            "interior_min": 0 < i < len(means) - 1}


def _cache_key(spec: str, folder: Path, cfg: AnalysisConfig, examples: list, labels) -> str:
    """Hash of what a model's curves depend on: its architecture (config.json), its weights (unless random:,
    whose weights follow from the seed), the clips, the labels and the analysis settings."""
    h = hashlib.sha256()
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.exists():  # a CTC run's RUN/best: head.json + head.safetensors
        weights, config = folder / "head.safetensors", folder / "head.json"
    h.update(config.read_bytes())
    if spec.startswith("random:"):
        h.update(b"random")
    else:
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update("\n".join(f"{e.path}|{','.join(e.labels)}" for e in examples).encode())
    h.update(repr(None if labels is None else labels.mids).encode())
    return h.hexdigest()[:16]


def analyze(panels: list[Panel], manifests: list, *, labels=None, cfg: AnalysisConfig | None = None,
            out: str | Path | None = None, log=print) -> dict:
    """MI curves of every model of every panel on the clips of ``manifests`` (paths or Example lists).
    Writes ``out/mi.json`` (and ``out/mi.png`` when matplotlib is installed) when ``out`` is given, and each
    model's results to ``out/models/<hash>.json``, reused by a rerun with the same weights, data and settings."""
    from ssamba.data import check_splits, read_manifest

    cfg = cfg or AnalysisConfig()
    if not panels or not any(p.models for p in panels):
        raise ValueError("no model to analyse: give at least one model")
    examples = []
    for m in manifests:
        examples.extend(read_manifest(m) if isinstance(m, (str, Path)) else m)
    # every file's header before any model runs: a bad file stops the analysis in seconds, naming it
    check_splits({"data": examples}, skip_bad=False, log=None, hint=None)
    result: dict = {"config": asdict(cfg), "data": [str(m) for m in manifests if isinstance(m, (str, Path))],
                    "panels": []}
    for panel in panels:
        entry = {"title": panel.title, "models": []}
        for spec in panel.models:
            log(f"[{panel.title}] {spec.label}: {spec.spec}")
            t0 = time.perf_counter()
            model, folder = load_model(spec.spec, seed=cfg.seeds[0])
            cache = None
            if out is not None:
                key = _cache_key(spec.spec, folder, cfg, examples, labels)
                cache = Path(out) / "models" / f"{key}.json"
                if cache.exists():  # the same weights, data and settings: reuse (rerunning adds models cheaply)
                    res = json.loads(cache.read_text())
                    log(f"  reused {cache}")
                    entry["models"].append({**res, "label": spec.label, "spec": spec.spec})
                    continue
            features = collect_hidden(model, examples, labels=labels, x=cfg.x, group=cfg.group,
                                      batch_size=cfg.extract_batch_size, max_items=cfg.max_items,
                                      mean=cfg.mean, std=cfg.std)
            log(f"  {features.x.shape[0]} frames, {len(features.layers)} layers, X {features.x.shape[1]}-d "
                f"(extracted in {time.perf_counter() - t0:.1f} s)")
            res = _analyze_model(features, cfg, log)
            entry["models"].append({"label": spec.label, "spec": spec.spec, "checkpoint": str(folder),
                                    "family": type(model).family, **res})
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(entry["models"][-1]) + "\n")
            del model, features
        result["panels"].append(entry)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mi.json").write_text(json.dumps(result, indent=1) + "\n")
        try:
            from ssamba.analysis.plots import plot_mi
        except ImportError:  # matplotlib is the optional `plot` extra
            log("matplotlib is not installed: no PNG (pip install 'ssamba[plot]')")
        else:
            result["png"] = str(plot_mi(result, out / "mi.png"))
    return result


def format_table(result: dict) -> str:
    """Markdown table: one row per model, MINE mean +- std per layer, the V-shape summary."""
    lines: list[str] = []
    previous = None
    for panel in result["panels"]:
        for m in panel["models"]:
            n_layers = len(m["mine"])
            if n_layers != previous:  # a new header whenever the depth changes
                header = "| panel | model | " + " | ".join(f"L{i + 1}" for i in range(n_layers)) + " | min layer |"
                lines += ([""] if lines else []) + [header, "|" + "---|" * (n_layers + 3)]
                previous = n_layers
            cells = " | ".join(f"{c['mean']:.3f}±{c['std']:.3f}" for c in m["mine"])
            v = m["v_shape"]
            rise = f"{v['rise_nats']:+.3f}" + (f" ({v['rise_in_std']:.1f} sd)" if v["rise_in_std"] is not None else "")
            lines.append(f"| {panel['title']} | {m['label']} | {cells} | {v['min_layer']}, last {rise} |")
    return "\n".join(lines)
