import torch

from lorif_ray.math.influence import (GradientBlock, LayerCurvature, PreparedQuery, dense_from_factors, exact_inverse,
                                      factor_inner, repsim_scores, self_influence, woodbury_weights)
from lorif_ray.math.rsvd import eigh_spectrum

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def test_woodbury_equals_explicit_inverse():
    d, r, lam = 30, 7, 0.3
    v = torch.linalg.qr(_rand(d, r)).Q
    values = _rand(r).abs() * 5
    explicit = torch.linalg.inv(v @ torch.diag(values) @ v.T + lam * torch.eye(d, dtype=torch.float64))
    woodbury = torch.eye(d, dtype=torch.float64) / lam - v @ torch.diag(woodbury_weights(values, lam)) @ v.T
    assert (explicit - woodbury).norm() / explicit.norm() < 1e-13


def test_factor_inner_equals_dense_inner():
    for c in (1, 3):
        uq, vq, ut, vt = _rand(4, 6, c), _rand(4, 5, c), _rand(9, 6, c), _rand(9, 5, c)
        dense = dense_from_factors(uq, vq) @ dense_from_factors(ut, vt).T
        assert torch.allclose(factor_inner(uq, vq, ut, vt), dense, rtol=1e-12, atol=1e-12)
        # vec is row-major: vec(u vᵀ)[i*d2 + j] = (u vᵀ)[i, j]
        assert torch.allclose(dense_from_factors(uq, vq)[1].reshape(6, 5), uq[1] @ vq[1].T)


def test_lorif_with_full_rank_equals_logra_and_self_influence():
    n, d1, d2, lam = 40, 4, 3, 0.7
    train = GradientBlock(u=_rand(n, d1, 3), v=_rand(n, d2, 3))  # c = min(d1, d2): exact
    query = GradientBlock(u=_rand(5, d1, 3), v=_rand(5, d2, 3))
    gram = train.dense().T @ train.dense()
    spec = eigh_spectrum(gram, d1 * d2)
    lorif = LayerCurvature("woodbury", lam, spec.vectors, spec.values)
    logra = LayerCurvature("inverse", lam, inverse=exact_inverse(gram, lam))
    explicit = query.dense() @ torch.linalg.inv(gram + lam * torch.eye(d1 * d2, dtype=torch.float64)) @ train.dense().T
    for curvature in (lorif, logra):
        assert (PreparedQuery(query, curvature).scores(train) - explicit).norm() / explicit.norm() < 1e-10
        full = PreparedQuery(train, curvature).scores(train)
        assert torch.allclose(self_influence(train, curvature), full.diagonal(), rtol=1e-10)
    graddot = PreparedQuery(query, LayerCurvature("identity")).scores(GradientBlock(g=train.dense()))
    assert torch.allclose(graddot, query.dense() @ train.dense().T)


def test_truncated_woodbury_keeps_top_directions():
    n, d, lam = 200, 20, 1.0
    scales = 3 * 0.5 ** torch.arange(d, dtype=torch.float64)
    g = _rand(n, d) * scales
    gram = g.T @ g
    spec = eigh_spectrum(gram, 6)
    approx = PreparedQuery(GradientBlock(g=g[:3]), LayerCurvature("woodbury", lam, spec.vectors, spec.values))
    exact = g[:3] @ torch.linalg.inv(spec.vectors @ torch.diag(spec.values) @ spec.vectors.T
                                     + lam * torch.eye(d, dtype=torch.float64)) @ g[3:].T
    assert torch.allclose(approx.scores(GradientBlock(g=g[3:])), exact, rtol=1e-10, atol=1e-10)


def test_repsim_is_cosine():
    q, t = _rand(2, 8), _rand(3, 8)
    s = repsim_scores(q, t)
    assert torch.allclose(s[1, 2], (q[1] @ t[2]) / (q[1].norm() * t[2].norm()))
    assert torch.allclose(repsim_scores(t, t).diagonal(), torch.ones(3, dtype=torch.float64))
