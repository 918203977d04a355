"""Mutual-information estimators for layer-wise analysis: MINE (continuous I(X; T)), a clustering-based
discrete estimator (I(cluster(T); Y) / H(Y)) and linear CCA.

Shape glossary
    N  frames (samples)     Dx, Dt  feature widths of X and T      H  statistics-network width
    B  mini-batch           K  clusters                            L  label classes

MINE (Belghazi et al. 2018, "Mutual Information Neural Estimation") maximises the Donsker-Varadhan lower
bound I(X; T) >= E_p(x,t)[f(x, t)] - log E_p(x)p(t)[exp f(x, t)] over a statistics network f. Samples of the
product of marginals are joint pairs whose T has been shuffled. Choices, and why:

* A **fresh statistics network per estimate**, initialised from ``seed`` inside a forked RNG: the public code
  of Zhang et al. (ICASSP 2025) trains one network across every layer's estimate, so each estimate starts
  where the previous layer's ended and the curve depends on the order layers are visited.
* A **train / held-out split** of the frames (by utterance when ``groups`` is given, since neighbouring
  frames of one utterance are nearly copies): the network is fitted on one part and the bound is evaluated
  on the other, so a network that memorises its training pairs cannot inflate the estimate.
* The **EMA bias-corrected gradient** (MINE section 3.2): the gradient of log E[exp f] over a mini-batch is
  biased; dividing by a moving average of E[exp f] instead of the batch mean corrects it. The average is
  kept in log space so it never overflows.
* Inputs are standardised with the training part's statistics (the bound is invariant to invertible maps,
  the optimiser is not).

The estimate of a deterministic encoder's I(X; T_l) is finite only because of the finite sample and network;
what is comparable is the curve over layers at fixed estimator settings, which is how it is used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssamba.pretrain.kmeans import MiniBatchKMeans, sq_dist

__all__ = [
    "MineResult",
    "cca",
    "discrete_mi",
    "kmeans",
    "mine",
    "mine_mi",
    "mine_seeds",
    "seed_summary",
    "split_indices",
]


# ------------------------------------------------------------------------------------------------ helpers


def _check_pair(x: Tensor, t: Tensor, name_t: str = "t") -> tuple[Tensor, Tensor]:
    x, t = torch.as_tensor(x), torch.as_tensor(t)
    if x.dim() != 2:
        raise ValueError(f"x must be (frames, dim), got shape {tuple(x.shape)}")
    if t.dim() != 2 and name_t == "t":
        raise ValueError(f"t must be (frames, dim), got shape {tuple(t.shape)}")
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"x and {name_t} need the same number of frames, got {x.shape[0]} and {t.shape[0]}")
    for name, v in (("x", x), (name_t, t)):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} contains NaN or inf")
    return x, t


def split_indices(n: int, held_out: float, seed: int, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Random train / held-out split of ``n`` frames; with ``groups`` (N,) (e.g. utterance ids) whole groups
    go to one side. Returns (train index, held-out index), both non-empty."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=g)
        n_held = min(max(1, round(held_out * n)), n - 1)
        return order[n_held:].sort().values, order[:n_held].sort().values
    groups = torch.as_tensor(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    ids = groups.unique()
    if len(ids) < 2:
        raise ValueError("a grouped split needs at least two groups (utterances)")
    order = ids[torch.randperm(len(ids), generator=g)]
    n_held = min(max(1, round(held_out * len(ids))), len(ids) - 1)
    held = torch.isin(groups, order[:n_held])
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """z-score every column with the training part's mean and std (constant columns stay 0)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-8)
    return [(v - mean) / std for v in (train, *others)]


def _logmeanexp(v: Tensor) -> Tensor:
    return torch.logsumexp(v, dim=0) - math.log(v.shape[0])


# --------------------------------------------------------------------------------------------------- MINE


class StatisticsNetwork(nn.Module):
    """f(x, t): an MLP on the concatenated pair, (N, Dx), (N, Dt) -> (N,). ELU keeps gradients alive on
    standardised inputs; no normalisation layers (they would couple the joint and marginal batches)."""

    def __init__(self, dx: int, dt: int, hidden: int, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = []
        width = dx + dt
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t], dim=1)).squeeze(1)


@dataclass
class MineResult:
    """One MINE estimate: ``mi`` is the DV bound on the held-out frames (nats) of the final network;
    ``train_mi`` the same bound on the training frames (the gap shows over-fitting); ``history`` the
    held-out bound every ``eval_every`` steps as (step, value)."""

    mi: float
    train_mi: float
    history: list[tuple[int, float]]


def _dv_bound(net: StatisticsNetwork, x: Tensor, t: Tensor, shuffles: int, g: torch.Generator) -> float:
    """DV bound on a fixed sample: joint mean of f minus log-mean-exp of f over ``shuffles`` random
    derangements of t (each frame paired with another frame's t, never its own)."""
    n = x.shape[0]
    with torch.no_grad():
        joint = net(x, t).mean()
        marginal = []
        for _ in range(shuffles):
            order = torch.randperm(n, generator=g)
            partner = order.roll(1)  # order[i] is paired with order[i-1]: a derangement
            marginal.append(net(x[order], t[partner]))
        return float(joint - _logmeanexp(torch.cat(marginal)))


def mine(
    x: Tensor,
    t: Tensor,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    ema: float | None = 0.01,
    held_out: float = 0.3,
    groups: Tensor | None = None,
    eval_every: int = 100,
    eval_shuffles: int = 32,
) -> MineResult:
    """MINE estimate of I(X; T) in nats with a freshly initialised statistics network (see module docstring).

    x: (N, Dx), t: (N, Dt) paired frames. seed fixes the split, the network's initialisation and the batches
    (the global RNG is left untouched). ema: moving-average rate of the bias-corrected gradient, None for the
    plain (biased) DV gradient. groups: (N,) ids whose frames stay on one side of the split.
    """
    x, t = _check_pair(x, t)
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    if ema is not None and not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be in (0, 1] or None, got {ema}")
    x, t = x.detach().float().cpu(), t.detach().float().cpu()
    train_idx, held_idx = split_indices(x.shape[0], held_out, seed, groups)
    x_tr, x_ho = _standardise(x[train_idx], x[held_idx])
    t_tr, t_ho = _standardise(t[train_idx], t[held_idx])
    n = x_tr.shape[0]
    batch = min(batch_size, n)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # fresh, seed-determined initialisation for this estimate only
        net = StatisticsNetwork(x.shape[1], t.shape[1], hidden, layers)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    # cosine decay to 0: the bound is read off the final network, which must not sit on a noisy Adam step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed + 1)
    g_eval = torch.Generator().manual_seed(seed + 2)
    log_ma: Tensor | None = None  # log of the moving average of E_marginal[exp f]
    history: list[tuple[int, float]] = []
    for step in range(1, steps + 1):
        rows = torch.randint(n, (batch,), generator=g)
        shuffled = torch.randint(n, (batch,), generator=g)  # independent draw: a sample of p(x) p(t)
        # one pass over [joint pairs; shuffled pairs]: (2B,) scores
        scores = net(x_tr[rows].repeat(2, 1), torch.cat([t_tr[rows], t_tr[shuffled]]))
        joint, marginal = scores[:batch], scores[batch:]
        lme = _logmeanexp(marginal)
        if ema is None:
            loss = -(joint.mean() - lme)
        else:
            with torch.no_grad():
                log_ma = lme.detach() if log_ma is None else torch.logaddexp(
                    log_ma + math.log1p(-ema), lme.detach() + math.log(ema))
            # d/dθ of mean(exp(f - log_ma)) = E[exp f ∇f] / MA: the bias-corrected gradient of log E[exp f]
            loss = -(joint.mean() - torch.exp(marginal - log_ma).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            history.append((step, _dv_bound(net, x_ho, t_ho, eval_shuffles, g_eval)))
    train_mi = _dv_bound(net, x_tr, t_tr, eval_shuffles, g_eval)
    return MineResult(mi=history[-1][1], train_mi=train_mi, history=history)


def mine_mi(x: Tensor, t: Tensor, *, seed: int = 0, **options) -> float:
    """MINE estimate of I(X; T) in nats on held-out frames; ``options`` as :func:`mine`."""
    return mine(x, t, seed=seed, **options).mi


def mine_seeds(x: Tensor, t: Tensor, seeds: list[int] | tuple[int, ...] = (0, 1, 2), **options) -> dict:
    """:func:`mine_mi` for several seeds (each a fresh network and split): {"mean", "std", "values"} in nats;
    std is the sample standard deviation (0 for one seed)."""
    values = [mine_mi(x, t, seed=s, **options) for s in seeds]
    return seed_summary(values)


def seed_summary(values: list[float]) -> dict:
    """{mean, std (over seeds; 0 for one), values} of one estimate repeated over seeds."""
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(a) for a in values]}


# ------------------------------------------------------------------------------------------------ k-means


def kmeans(x: Tensor, k: int, *, seed: int = 0, batch_size: int = 1024, iters: int = 100,
           init_size: int = 4096) -> Tensor:
    """Centres (K, D) of (N, D) frames: the package's mini-batch k-means (``ssamba.pretrain.kmeans``, k-means++
    initialisation on ``init_size`` frames) for ``iters`` mini-batches of ``batch_size``. Deterministic given
    ``seed``."""
    x = torch.as_tensor(x).detach().float()
    if x.dim() != 2:
        raise ValueError(f"kmeans needs (frames, dim) data, got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of frames ({x.shape[0]}), got {k}")
    return MiniBatchKMeans(k, batch_size, iters, max(init_size, k), seed, tol=0.0).fit(x).centroids


def _entropy(counts: Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def _plugin_mi(a: Tensor, b: Tensor, na: int, nb: int) -> float:
    joint = torch.bincount(a * nb + b, minlength=na * nb).reshape(na, nb)
    return _entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.flatten())


def discrete_mi(
    t: Tensor,
    labels: Tensor,
    *,
    k: int = 32,
    seed: int = 0,
    held_out: float | None = 0.3,
    groups: Tensor | None = None,
    batch_size: int = 1024,
    iters: int = 100,
) -> float:
    """Normalised I(cluster(T); Y) / H(Y) in [0, 1] (plug-in estimate), the clustering-based layer-wise
    measure of e.g. Pasad et al. (2023): mini-batch k-means with ``k`` centres on standardised T, each frame
    assigned to its nearest centre, then the mutual information of (cluster, label) counts.

    t: (N, D) features, labels: (N,) integer classes. With ``held_out`` the centres are fitted on one part
    of the frames (split by ``groups`` when given) and the counts come from the other; None uses all
    frames for both. The plug-in estimate is biased upwards by about (K-1)(L-1) / (2 N) nats; compare
    layers at fixed K and N, or against shuffled labels.
    """
    t, labels = _check_pair(t, labels, "labels")
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-d integer tensor, got dtype {labels.dtype}, shape {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    t = t.detach().float().cpu()
    labels = labels.cpu().long()
    if held_out is None:
        fit_idx = eval_idx = torch.arange(t.shape[0])
    else:
        fit_idx, eval_idx = split_indices(t.shape[0], held_out, seed, groups)
    t_fit, t_eval = _standardise(t[fit_idx], t[eval_idx])
    centres = kmeans(t_fit, min(k, t_fit.shape[0]), seed=seed, batch_size=batch_size, iters=iters)
    clusters = sq_dist(t_eval, centres).argmin(1)
    y = labels[eval_idx]
    h_y = _entropy(torch.bincount(y))
    if h_y <= 0:
        raise ValueError("the evaluated labels have a single class (H(labels) = 0); MI cannot be normalised")
    return _plugin_mi(clusters, y, centres.shape[0], int(labels.max()) + 1) / h_y


# ---------------------------------------------------------------------------------------------------- CCA


def cca(
    x: Tensor, t: Tensor, *, dims: int | None = None, ridge: float = 1e-3, seed: int = 0, held_out: float = 0.3,
    groups: Tensor | None = None,
) -> dict:
    """Linear CCA of X and T: canonical directions fitted on the training frames (ridge-regularised
    covariances), correlations of the projected held-out frames. Returns {"correlations": [...] (held-out,
    in fitted order), "mean": their mean, "gaussian_mi": -1/2 sum log(1 - rho^2) (the MI of jointly Gaussian
    data with those correlations, nats)}. ``dims`` limits the number of canonical pairs (default min(Dx, Dt))."""
    x, t = _check_pair(x, t)
    x, t = x.detach().double().cpu(), t.detach().double().cpu()
    train_idx, held_idx = split_indices(x.shape[0], held_out, seed, groups)
    x_tr, x_ho = _standardise(x[train_idx], x[held_idx])
    t_tr, t_ho = _standardise(t[train_idx], t[held_idx])
    n = x_tr.shape[0]

    def inv_sqrt(c: Tensor) -> Tensor:
        w, v = torch.linalg.eigh(c + ridge * torch.eye(c.shape[0], dtype=c.dtype))
        return v @ torch.diag(w.clamp_min(1e-12).rsqrt()) @ v.T

    wx = inv_sqrt(x_tr.T @ x_tr / (n - 1))
    wt = inv_sqrt(t_tr.T @ t_tr / (n - 1))
    u, _, vh = torch.linalg.svd(wx @ (x_tr.T @ t_tr / (n - 1)) @ wt)
    m = min(x.shape[1], t.shape[1]) if dims is None else min(dims, x.shape[1], t.shape[1])
    a, b = wx @ u[:, :m], wt @ vh.T[:, :m]  # canonical directions (Dx, m), (Dt, m)
    px, pt = x_ho @ a, t_ho @ b
    px, pt = px - px.mean(0), pt - pt.mean(0)
    rho = (px * pt).sum(0) / (px.norm(dim=0) * pt.norm(dim=0)).clamp_min(1e-12)
    rho = rho.clamp(-0.999999, 0.999999)
    return {
        "correlations": [float(r) for r in rho],
        "mean": float(rho.mean()),
        "gaussian_mi": float(-0.5 * torch.log1p(-rho.pow(2)).sum()),
    }
