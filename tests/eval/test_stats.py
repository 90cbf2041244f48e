"""Float64 reference tests of the rank statistics and the LDS sign convention."""

import numpy as np
import pytest

from lorif_ray.eval.groundtruth import draw_subsets
from lorif_ray.eval.stats import MeanSE, lds_per_query, noise_ceiling, rankdata, spearman


def brute_force_ranks(x):
    """Average rank by definition: 1 + #smaller + (#equal − 1) / 2."""
    return np.array([1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x], dtype=np.float64)


def brute_force_spearman(a, b):
    ra, rb = brute_force_ranks(a), brute_force_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size=23).astype(np.float64)  # many ties
    b = rng.normal(size=23)
    b[:5] = b[5]
    assert np.array_equal(rankdata(a), brute_force_ranks(a))
    assert spearman(a, b) == pytest.approx(brute_force_spearman(a, b), abs=1e-12)


def test_spearman_without_ties_is_the_textbook_formula_and_batches():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    n = 30
    d = rankdata(a) - rankdata(b)
    expected = 1 - 6 * (d ** 2).sum(-1) / (n * (n * n - 1))
    assert np.allclose(spearman(a, b), expected, atol=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))  # constant side: undefined


def linear_datamodel(num_train=200, num_queries=40, num_subsets=64, noise=0.01, seed=0):
    """A synthetic linear model of retraining: loss_S(q) = b_q − Σ_{t∈S} w_qt + noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_queries, num_train))  # true influence: w > 0 = proponent
    subsets = draw_subsets(num_train, num_subsets, 0.5, seed)
    clean = 5.0 - subsets.astype(np.float64) @ w.T  # (M, nq)
    return w, subsets, clean + noise * rng.normal(size=clean.shape) * clean.std()


def test_lds_of_perfect_predictor_is_one_and_of_random_scores_zero():
    w, subsets, losses = linear_datamodel()
    perfect = MeanSE.of(lds_per_query(w, subsets, losses))
    assert perfect.mean > 0.99
    rng = np.random.default_rng(1)
    random = [MeanSE.of(lds_per_query(rng.normal(size=w.shape), subsets, losses)).mean for _ in range(10)]
    assert abs(np.mean(random)) < 0.05
    # Sign convention: the negated scores (opponents called proponents) give −1.
    assert MeanSE.of(lds_per_query(-w, subsets, losses)).mean < -0.99


def test_noisy_ground_truth_lowers_lds_and_the_ceiling_sees_it():
    w, subsets, clean = linear_datamodel(noise=0.0)
    rng = np.random.default_rng(2)
    by_seed = np.stack([clean + rng.normal(size=clean.shape) * clean.std() for _ in range(2)])
    ceiling = noise_ceiling(by_seed)
    assert 0.2 < ceiling["two_seeds"] < 0.8
    assert ceiling["averaged"] > ceiling["two_seeds"]
    assert MeanSE.of(lds_per_query(w, subsets, by_seed.mean(0))).mean < 0.95


def test_subsets_are_fixed_by_seed_and_independent_of_m():
    a, b = draw_subsets(50, 4, 0.5, 3), draw_subsets(50, 7, 0.5, 3)
    assert np.array_equal(a, b[:4]) and (a.sum(1) == 25).all()
    assert not np.array_equal(draw_subsets(50, 4, 0.5, 4), a)
