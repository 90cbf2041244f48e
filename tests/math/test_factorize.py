import pytest
import torch

from lorif_ray.math.factorize import factorize, factorize_dense, factorize_implicit, implicit_is_cheaper


@pytest.fixture(autouse=True)
def float64_default():
    """These checks run in float64; the default dtype is restored after each, so no other module sees it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _start(d2, c, seed=0):
    return torch.randn(d2, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_recovers_exact_rank_c_input():
    gen = torch.Generator().manual_seed(1)
    n, d1, d2, c = 5, 20, 12, 3
    g = torch.randn(n, d1, c, generator=gen) @ torch.randn(n, c, d2, generator=gen)
    u, v = factorize_dense(g, _start(d2, c), iterations=4)
    assert u.shape == (n, d1, c) and v.shape == (n, d2, c)
    assert torch.allclose(u.transpose(1, 2) @ u, torch.eye(c).expand(n, c, c), atol=1e-12)
    assert (u @ v.transpose(1, 2) - g).norm() / g.norm() < 1e-10


def test_full_rank_c_is_exact():
    g = torch.randn(4, 7, 9, generator=torch.Generator().manual_seed(2))
    u, v = factorize_dense(g, _start(9, 7), iterations=1)
    assert (u @ v.transpose(1, 2) - g).norm() / g.norm() < 1e-12


def test_approaches_best_rank_c_approximation():
    gen = torch.Generator().manual_seed(3)
    n, d1, d2, c = 6, 30, 24, 2
    left = torch.linalg.qr(torch.randn(n, d1, d2, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(n, d2, d2, generator=gen)).Q
    spectrum = 0.6 ** torch.arange(d2, dtype=torch.float64)
    g = left @ torch.diag_embed(spectrum.expand(n, d2)) @ right.transpose(1, 2)
    best = spectrum[c:].square().sum().sqrt()  # Eckart–Young error of the best rank-c approximation
    errors = []
    for iterations in (1, 4, 16):
        u, v = factorize_dense(g, _start(d2, c), iterations)
        errors.append(float(((u @ v.transpose(1, 2) - g).norm(dim=(1, 2))).max()))
    assert errors[0] >= errors[1] >= errors[2] - 1e-12
    assert errors[2] < float(best) * (1 + 1e-6)


def test_implicit_path_equals_dense_path():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 10, generator=gen)
    for c in (1, 3):
        v0 = _start(10, c)
        u1, v1 = factorize_dense(torch.bmm(a.transpose(1, 2), b), v0, 8)
        u2, v2 = factorize_implicit(a, b, v0, 8)
        assert torch.allclose(u1 @ v1.transpose(1, 2), u2 @ v2.transpose(1, 2), atol=1e-11)
        u3, v3 = factorize(a, b, v0, 8)
        assert torch.allclose(u1 @ v1.transpose(1, 2), u3 @ v3.transpose(1, 2), atol=1e-11)


def test_path_choice_follows_cost():
    assert implicit_is_cheaper(tokens=8, d1=192, d2=192, c=1, iterations=8)
    assert not implicit_is_cheaper(tokens=512, d1=16, d2=16, c=16, iterations=16)
