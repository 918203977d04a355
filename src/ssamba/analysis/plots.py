"""Plots of layer-wise MI results (the dict of ``analysis.layerwise.analyze``); needs matplotlib (`plot` extra)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_mi"]


def plot_mi(result: dict, path: str | Path) -> Path:
    """One column per panel; rows: normalised MINE I(X; T_l) (curve / its maximum), raw MINE in nats, and
    I(T_l; Y) / H(Y) when labels were given. Error bars: std over the MINE / k-means seeds."""
    panels = result["panels"]
    has_discrete = any(m["discrete"] for p in panels for m in p["models"])
    rows = [("mine_normalised", "I(X; T_l) / max"), ("mine", "I(X; T_l) [nats]")]
    if has_discrete:
        rows.append(("discrete", "I(T_l; Y) / H(Y)"))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.0 * len(rows)),
                             squeeze=False, sharex="col")
    for col, panel in enumerate(panels):
        for row, (key, ylabel) in enumerate(rows):
            ax = axes[row][col]
            for m in panel["models"]:
                curve = m[key]
                if not curve:
                    continue
                layers = list(range(1, len(curve) + 1))
                ax.errorbar(layers, [c["mean"] for c in curve], yerr=[c["std"] for c in curve], marker="o",
                            markersize=3, capsize=2, label=m["label"])
                if key == "discrete" and "discrete_chance" in m:
                    ax.axhline(m["discrete_chance"], linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
            if row == 0:
                ax.set_title(panel["title"])
                ax.legend(fontsize=7)
            if row == len(rows) - 1:
                ax.set_xlabel("layer")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    cfg = result["config"]
    fig.suptitle(f"MINE (DV, {len(cfg['seeds'])} seeds, PCA {cfg['dims']}, X = {cfg['x']}, frames = {cfg['group']})",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
