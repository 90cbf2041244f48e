"""The Gram-based orthonormalization of stage 2 (``orthonormal_columns``) against Householder QR."""

import pytest
import torch

from lorif_ray.math import rsvd
from lorif_ray.math.rsvd import orthonormal_columns

EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps}


def _spiked(dim, k, singular_values, dtype, seed=0):
    """Y = U diag(σ) Wᵀ (dim, k) with the given singular values (a spiked, possibly singular spectrum)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q
    return ((u * singular_values) @ w.T).to(dtype)


def _check(y, q):
    """Orthonormal columns, spanning y: ‖QᵀQ − I‖ and ‖Y − QQᵀY‖ / ‖Y‖ at float error of y's dtype."""
    k, eps = y.shape[1], EPS[y.dtype]
    assert q.dtype == y.dtype and q.shape == y.shape
    assert float((q.T @ q - torch.eye(k, dtype=q.dtype)).abs().max()) <= 64 * k * eps
    y64, q64 = y.double(), q.double()
    assert float((y64 - q64 @ (q64.T @ y64)).norm() / y64.norm()) <= 100 * k * eps


def _spy_householder(monkeypatch):
    calls = []
    real = torch.linalg.qr
    monkeypatch.setattr(rsvd.torch.linalg, "qr", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_well_conditioned_equals_householder_up_to_column_signs(dtype, monkeypatch):
    y = _spiked(2000, 40, torch.logspace(0, -2, 40, dtype=torch.float64), dtype)
    calls = _spy_householder(monkeypatch)
    q = orthonormal_columns(y)
    assert not calls  # two Cholesky passes, no Householder
    monkeypatch.undo()
    householder = torch.linalg.qr(y).Q
    signs = torch.sign((q * householder).sum(0))
    assert float((q - householder * signs).abs().max()) <= 1e3 * EPS[dtype]  # same triangular basis, signs aside
    _check(y, q)


@pytest.mark.parametrize("dtype,spread", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_ill_conditioned_spiked_needs_no_householder(dtype, spread, monkeypatch):
    """κ(Y) = σ₁/σ_k beyond the dtype's u^-1/2 (float64: 3e13, where plain CholeskyQR breaks down and shifted
    passes bring it back; float32: 3e6, which the float64 passes take plainly): no Householder runs."""
    sigma = torch.cat([torch.tensor([300.0, 120.0, 50.0], dtype=torch.float64),
                       torch.logspace(0, torch.log10(torch.tensor(spread)).item(), 29, dtype=torch.float64)])
    y = _spiked(3000, 32, sigma, dtype, seed=1)
    assert torch.linalg.cholesky_ex(y.T @ y)[1] != 0  # a plain first pass in y's dtype would fail
    calls = _spy_householder(monkeypatch)
    q = orthonormal_columns(y)
    assert not calls
    _check(y, q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_deficient_falls_back_and_still_spans(dtype):
    """rank Y = 10 < k = 24 (fewer rows than columns in a power pass): an orthonormal basis holding Y's span."""
    sigma = torch.cat([torch.logspace(1, -1, 10, dtype=torch.float64), torch.zeros(14, dtype=torch.float64)])
    y = _spiked(500, 24, sigma, dtype, seed=2)
    _check(y, orthonormal_columns(y))


def test_zero_and_wide_inputs():
    assert orthonormal_columns(torch.zeros(50, 4, dtype=torch.float64)).shape == (50, 4)
    wide = torch.randn(3, 5, dtype=torch.float64)
    assert orthonormal_columns(wide).shape == (3, 3)
