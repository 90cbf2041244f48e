"""Rank statistics in numpy: Spearman correlation (average ties), LDS, noise ceiling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties get the average of their ranks (like scipy's "average")."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="mergesort")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    n = x.shape[-1]
    ranks = np.empty_like(x)
    flat_sorted, flat_order, flat_ranks = (a.reshape(-1, n) for a in (sorted_x, order, ranks))
    for row in range(flat_sorted.shape[0]):
        values = flat_sorted[row]
        # Start of each run of equal values; a run [s, e) gets the mean rank (s + e + 1) / 2.
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        ends = np.r_[starts[1:], n]
        run_rank = np.repeat((starts + ends + 1) / 2.0, ends - starts)
        flat_ranks[row, flat_order[row]] = run_rank
    return flat_ranks.reshape(x.shape)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side is constant."""
    a = np.asarray(a, np.float64) - np.mean(a, axis=-1, keepdims=True)
    b = np.asarray(b, np.float64) - np.mean(b, axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis: Pearson of average-tie ranks."""
    return pearson(rankdata(a), rankdata(b))


@dataclass(frozen=True)
class MeanSE:
    """Mean over queries with its standard error (std / sqrt(n), ddof 1); NaN queries are dropped."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: np.ndarray) -> "MeanSE":
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(float("nan"), float("nan"), 0)
        se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
        return cls(float(v.mean()), se, int(v.size))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f}"


def lds_per_query(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Linear datamodeling score of each query (Park et al. 2023; paper App. A.3).

    Sign convention: a score I(t, q) > 0 marks t as a proponent (removing t raises the query loss),
    so the predicted *goodness* of subset S for q is Σ_{t∈S} I(t, q), and it is compared with the
    negated actual loss: LDS_q = Spearman_over_subsets(Σ_{t∈S} I(t,q), −loss_S(q)).

    Args:
        scores: (nq, N) attribution scores.
        subsets: (M, N) boolean (or 0/1) subset membership.
        losses: (M, nq) actual query losses of models trained on each subset (seed-averaged).

    Returns:
        (nq,) Spearman correlations (NaN for a query whose losses or predictions are constant).
    """
    predicted = np.asarray(scores, np.float64) @ np.asarray(subsets, np.float64).T  # (nq, M)
    return spearman(predicted, -np.asarray(losses, np.float64).T)


def noise_ceiling(losses_by_seed: np.ndarray) -> dict:
    """How reproducible the ground truth is across training seeds.

    Args:
        losses_by_seed: (S, M, nq) query losses per seed and subset, S >= 2.

    Returns:
        ``two_seeds``: mean over queries and seed pairs of Spearman(loss_seed_a, loss_seed_b) across
        subsets (with its s.e. over queries); ``averaged``: the Spearman–Brown estimate of the
        correlation of the S-seed average with a replicate average, ρ_S = Sρ / (1 + (S−1)ρ).
    """
    s = losses_by_seed.shape[0]
    if s < 2:
        return {"two_seeds": None, "two_seeds_se": None, "averaged": None, "seeds": s}
    pairs = [spearman(losses_by_seed[a].T, losses_by_seed[b].T) for a in range(s) for b in range(a + 1, s)]
    per_query = np.nanmean(np.stack(pairs), axis=0)
    stat = MeanSE.of(per_query)
    rho = stat.mean
    return {"two_seeds": rho, "two_seeds_se": stat.se, "averaged": s * rho / (1 + (s - 1) * rho), "seeds": s}
