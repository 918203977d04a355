"""Downstream metrics: accuracy, per-class average precision / mAP, ROC AUC and d-prime, confusion matrices,
and the small markdown / PNG writers the fine-tuning runs use.

The multi-label numbers follow the official SSAST/AST ``calculate_stats`` (sklearn's ``average_precision_score``
and ``roc_auc_score`` per class, then the mean; d-prime = sqrt(2) * Phi^-1(mean AUC)); they are computed here
in NumPy with the same tie handling, so there is no sklearn/scipy dependency.

Glossary: N items, Q classes. ``scores`` (N, Q) are logits or probabilities (only their order matters for
AP/AUC, the argmax for accuracy); ``targets`` (N, Q) multi-hot (one-hot for single-label tasks) or (N,)
class indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np

__all__ = ["accuracy", "average_precision", "confusion_matrix", "d_prime", "edit_distance", "error_rates",
           "markdown_table", "mean_average_precision", "plot_confusion", "roc_auc", "task_metrics"]


def _as_indices(targets) -> np.ndarray:
    t = np.asarray(targets)
    return t.argmax(axis=1) if t.ndim == 2 else t.astype(np.int64)


def accuracy(scores, targets) -> float:
    """Fraction of items whose top-scoring class is the target (the official ``acc``: argmax vs argmax)."""
    s = np.asarray(scores)
    if s.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    return float((s.argmax(axis=1) == _as_indices(targets)).mean())


def average_precision(scores, positives) -> float:
    """AP of one class: sum over distinct thresholds of (R_k - R_{k-1}) * P_k (sklearn's definition, ties
    form one threshold). scores (N,), positives (N,) in {0, 1}. NaN when the class has no positive."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives) > 0.5
    total = int(y.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve of one class = P(score of a positive > score of a negative), ties counting
    one half (the trapezoidal ROC area). NaN when the class lacks positives or negatives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks (1-based) over ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_average_precision(scores, targets) -> float:
    """Mean over classes of the per-class AP, skipping classes without a positive (they have no AP)."""
    s, t = np.asarray(scores), np.asarray(targets)
    aps = [average_precision(s[:, q], t[:, q]) for q in range(s.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    if not aps:
        raise ValueError("no class has a positive item: mAP is undefined")
    return float(np.mean(aps))


def d_prime(auc: float) -> float:
    """Sensitivity index from an AUC (official ``d_prime``: sqrt(2) * Phi^-1(auc)); +-inf at 1 / 0."""
    if auc >= 1.0:
        return float("inf")
    if auc <= 0.0:
        return float("-inf")
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def confusion_matrix(scores, targets, num_classes: int) -> np.ndarray:
    """(Q, Q) counts, rows = true class, columns = predicted class (argmax)."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (_as_indices(targets), np.asarray(scores).argmax(axis=1)), 1)
    return m


def task_metrics(scores, targets, multilabel: bool) -> dict:
    """Everything a run reports for a split. Single-label: acc (+ mAP as a secondary number). Multi-label:
    mAP, mean AUC and d-prime (+ acc as in the official logs)."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    out = {"acc": accuracy(s, t)}
    if t.ndim == 2:
        out["mAP"] = mean_average_precision(s, t)
        if multilabel:
            aucs = [roc_auc(s[:, q], t[:, q]) for q in range(s.shape[1])]
            aucs = [a for a in aucs if not math.isnan(a)]
            out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
            out["d_prime"] = d_prime(out["auc"]) if aucs else float("nan")
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


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = ".3f") -> str:
    """A GitHub markdown table of ``rows`` (dicts), one column per key in ``columns``."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path | None:
    """Row-normalised confusion matrix as a PNG; None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    q = len(names)
    size = max(4.0, 0.28 * q + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(q))
    ax.set_yticks(range(q))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
