import torch

from lorif_ray.math.rsvd import eigh_spectrum, gram_apply_from_batches, gram_from_batches, randomized_spectrum


def _decaying(n=300, d=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    sigma = 10 * 0.8 ** torch.arange(d, dtype=torch.float64)
    return (left * sigma) @ right.T, sigma


def _batches(g, size=37):
    return lambda: iter(g.split(size))


def test_matches_full_svd_on_decaying_spectrum():
    g, _ = _decaying()
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    spec = randomized_spectrum(gram_apply_from_batches(_batches(g)), 80, 10, oversample=10, power_iters=3,
                               seed=1, dtype=torch.float64)
    assert spec.vectors.shape == (80, 10) and spec.values.shape == (10,) and spec.extra_values.shape == (10,)
    assert torch.allclose(spec.values, s[:10] ** 2, rtol=1e-8)
    overlap = (spec.vectors.T @ vh[:10].T).abs()  # |cos| between matched singular vectors
    assert torch.allclose(overlap.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(spec.vectors.T @ spec.vectors, torch.eye(10, dtype=torch.float64), atol=1e-12)


def test_more_power_iterations_are_more_accurate():
    g, _ = _decaying(seed=2)
    s = torch.linalg.svdvals(g)
    errors = [float(((randomized_spectrum(gram_apply_from_batches(_batches(g)), 80, 10, oversample=2,
                                          power_iters=q, dtype=torch.float64).values - s[:10] ** 2).abs()).max())
              for q in (0, 1, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_exact_when_rank_fits_and_damping_rule():
    g = torch.randn(12, 50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # rank 12
    spec = randomized_spectrum(gram_apply_from_batches(_batches(g, 5)), 50, 20, oversample=10,
                               power_iters=1, dtype=torch.float64)
    reconstructed = spec.vectors @ torch.diag(spec.values) @ spec.vectors.T
    assert torch.allclose(reconstructed, g.T @ g, atol=1e-9)
    top = torch.linalg.svdvals(g) ** 2
    assert abs(spec.damping() - 0.1 * float(top.sum()) / 30) < 1e-9  # r + p = 30 eigenvalues, 18 of them 0
    exact = eigh_spectrum(gram_from_batches(g.split(5), 50), 20, oversample=10)
    assert torch.allclose(exact.values, spec.values, atol=1e-9)
