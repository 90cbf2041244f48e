"""The curvature classes against explicit float64 inverses (tests/oracles.py)."""

import pytest
import torch

from lorif_ray.math.blocks import GradientBlock, dense_from_factors
from lorif_ray.math.curvature import ExactInverse, FitSettings, Identity, Woodbury, woodbury_weights
from lorif_ray.math.influence import factor_inner, repsim_scores
from lorif_ray.math.rsvd import GramOperator, TensorRows
from tests.math.layer_scores import layer_scores
from tests.oracles import curvature_inverse, damped_inverse, oracle_scores, woodbury_inverse

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def test_woodbury_identity_equals_the_explicit_inverse():
    d, r, lam = 30, 7, 0.3
    v = torch.linalg.qr(_rand(d, r)).Q
    values = _rand(r).abs() * 5
    woodbury = torch.eye(d, dtype=torch.float64) / lam - v @ torch.diag(woodbury_weights(values, lam)) @ v.T
    explicit = woodbury_inverse(v, values, lam)
    assert (explicit - woodbury).norm() / explicit.norm() < 1e-13


def test_factor_inner_equals_dense_inner():
    for c in (1, 3):
        uq, vq, ut, vt = _rand(4, 6, c), _rand(4, 5, c), _rand(9, 6, c), _rand(9, 5, c)
        dense = dense_from_factors(uq, vq) @ dense_from_factors(ut, vt).T
        assert torch.allclose(factor_inner(uq, vq, ut, vt), dense, rtol=1e-12, atol=1e-12)
        # vec is row-major: vec(u vᵀ)[i*d2 + j] = (u vᵀ)[i, j]
        assert torch.allclose(dense_from_factors(uq, vq)[1].reshape(6, 5), uq[1] @ vq[1].T)


@pytest.mark.parametrize("cls", [Woodbury, ExactInverse, Identity])
def test_each_curvature_scores_like_its_explicit_inverse(cls):
    """fit → the batched scorer and self_influence of one layer equal g_q H⁻¹ g_t with H formed explicitly;
    LoRIF at full rank (c = min(d1, d2), r = D) equals LoGRA."""
    n, d1, d2, lam = 40, 4, 3, 0.7
    train = GradientBlock(u=_rand(n, d1, 3), v=_rand(n, d2, 3))  # c = min(d1, d2): exact
    query = GradientBlock(u=_rand(5, d1, 3), v=_rand(5, d2, 3))
    settings = FitSettings(rank=d1 * d2, damping=lam)
    curvature = cls.fit(GramOperator(TensorRows(train.dense(), batch_rows=7)), d1 * d2, "layer", settings)
    gram = train.dense().T @ train.dense()
    explicit = {"layer": torch.eye(d1 * d2, dtype=torch.float64) if cls is Identity else damped_inverse(gram, lam)}
    assert (curvature_inverse(curvature, d1 * d2) - explicit["layer"]).norm() < 1e-9 * explicit["layer"].norm()
    expected = oracle_scores({"layer": query.dense()}, {"layer": train.dense()}, explicit)
    for q, t in ((query, train), (GradientBlock(g=query.dense()), GradientBlock(g=train.dense()))):
        got = layer_scores(curvature, q, t)  # factor and dense stores
        assert (got - expected).norm() / expected.norm() < 1e-10
    diagonal = oracle_scores({"layer": train.dense()}, {"layer": train.dense()}, explicit).diagonal()
    rows = train if curvature.scale is not None else GradientBlock(g=train.dense())
    assert torch.allclose(curvature.self_influence(rows), diagonal, rtol=1e-10)


def test_truncated_woodbury_keeps_top_directions():
    n, d, lam = 200, 20, 1.0
    g = _rand(n, d) * (3 * 0.5 ** torch.arange(d, dtype=torch.float64))
    curvature = Woodbury.fit(GramOperator(TensorRows(g)), d, "layer", FitSettings(rank=6, damping=lam))
    assert curvature.rank == 6
    expected = oracle_scores({"l": g[:3]}, {"l": g[3:]}, {"l": woodbury_inverse(curvature.vectors, curvature.values,
                                                                                lam)})
    got = layer_scores(curvature, GradientBlock(g=g[:3]), GradientBlock(g=g[3:]))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_saved_state_round_trips():
    g = _rand(50, 12)
    for cls in (Woodbury, ExactInverse, Identity):
        fitted = cls.fit(GramOperator(TensorRows(g)), 12, "layer", FitSettings(rank=5))
        again = cls.from_saved(fitted.tensors(), fitted.info())
        assert again.info() == fitted.info()
        q = GradientBlock(g=g[:3])
        assert torch.equal(layer_scores(again, q, GradientBlock(g=g)), layer_scores(fitted, q, GradientBlock(g=g)))


def test_repsim_is_cosine():
    q, t = _rand(2, 8), _rand(3, 8)
    s = repsim_scores(q, t)
    assert torch.allclose(s[1, 2], (q[1] @ t[2]) / (q[1].norm() * t[2].norm()))
    assert torch.allclose(repsim_scores(t, t).diagonal(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("damping", [None, 0.05])
def test_exact_with_fewer_rows_than_columns_is_the_dd_inverse_without_forming_it(damping):
    """N + p < D/2: the thin form (V (D, N), σ²: one GᵀG Q pass, no D×D anywhere) equals the D×D inverse of GᵀG + λI,
    its relative damping (λ = 0.1 × trace / D) included, and scores like it; spiked rows, σ₁²/λ in the hundreds."""
    n, d = 30, 200
    g = _rand(n, d) * torch.cat([torch.tensor([40.0, 15.0, 6.0]), torch.ones(d - 3)]).double()
    asked = []

    class Recorded(GramOperator):  # the real operator, noting which passes the fit asks for
        def __call__(self, q):
            asked.append("apply")
            return super().__call__(q)

        def gram(self, dtype=torch.float64):
            asked.append("gram")
            return super().gram(dtype)

    rows = GramOperator(TensorRows(g, batch_rows=7))
    thin = ExactInverse.fit(Recorded(TensorRows(g, batch_rows=7)), d, "layer", FitSettings(damping=damping, rows=n))
    full = ExactInverse.fit(rows, d, "layer", FitSettings(damping=damping))
    assert asked == ["apply"] and thin.inverse is None and thin.vectors.shape == (d, n) and full.inverse is not None
    assert abs(thin.damping - full.damping) <= 1e-12 * full.damping
    assert float((g.T @ g).diagonal().max()) / thin.damping > 100  # spiked: the score is a difference of large terms
    explicit = damped_inverse(g.T @ g, full.damping)
    assert (curvature_inverse(thin, d) - explicit).norm() <= 1e-9 * explicit.norm()
    query, train = GradientBlock(g=_rand(4, d)), GradientBlock(g=g)
    expected = oracle_scores({"l": query.dense()}, {"l": g}, {"l": explicit})
    assert (layer_scores(thin, query, train) - expected).norm() <= 1e-9 * expected.norm()
    assert torch.allclose(thin.self_influence(train), (g @ explicit * g).sum(1), rtol=1e-9)
    again = ExactInverse.from_saved(thin.tensors(), thin.info())
    assert set(thin.tensors()) == {"values", "basis"} and torch.equal(again.vectors, thin.vectors)
    assert ExactInverse.row_request(10, 20, FitSettings(rows=n)) == ("apply", n + 10)
    assert ExactInverse.row_request(10, 20, FitSettings(rows=500)) == ("gram", 200)
    assert ExactInverse.saved_numbers(10, 20, FitSettings(rows=n)) == d * n + n
