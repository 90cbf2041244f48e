"""Rank-c factors of projected gradients by block power iteration, batched over examples.

G̃ (d1×d2) ≈ u vᵀ with u (d1×c) orthonormal and v = G̃ᵀ u, so u vᵀ = u uᵀ G̃ is the projection of
G̃ on span(u); after enough iterations span(u) is the top-c left singular subspace and u vᵀ the best
rank-c approximation. With c = min(d1, d2) the factors are exact.

Two ways to apply G̃: form it (dense path), or, since G̃ = Aᵀ B with A (T×d1), B (T×d2), apply
G̃ v = Aᵀ(B v) and G̃ᵀ u = Bᵀ(A u) without forming it (implicit path, cheaper for short sequences).
"""

from __future__ import annotations

from typing import Callable

import torch

from lorif_ray.math.projection import gaussian


def default_iterations(c: int) -> int:
    """Power iterations: 8 for c = 1, 16 for c > 1 (paper, App. A.2)."""
    return 8 if c == 1 else 16


def effective_rank(c: int, d1: int, d2: int) -> int:
    """The rank actually stored: c capped at min(d1, d2) (beyond that the factors are exact)."""
    return min(c, d1, d2)


def initial_block(seed: int, layer: str, d2: int, c: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The (d2, c) starting block of a layer, the same for every example and process."""
    return gaussian(seed, (d2, c), layer, "factor-init").to(device=device, dtype=dtype)


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning y: (n, d, c) → (n, d, c)."""
    if y.shape[-1] == 1:
        return y / y.norm(dim=1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    return torch.linalg.qr(y, mode="reduced").Q


def _power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor],
    apply_t: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    u = _orthonormalize(apply(v0))
    for _ in range(iterations - 1):
        u = _orthonormalize(apply(apply_t(u)))
    return u, apply_t(u)


def factorize_dense(g: torch.Tensor, v0: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-c factors of formed gradients.

    Args:
        g: (n, d1, d2) projected gradients.
        v0: (d2, c) starting block, c ≤ min(d1, d2).
        iterations: power iterations (each one G̃ and one G̃ᵀ product).

    Returns:
        u (n, d1, c) with orthonormal columns, v (n, d2, c) = G̃ᵀ u.
    """
    v0 = v0.expand(g.shape[0], *v0.shape)
    gt = g.transpose(1, 2)
    return _power_iteration(lambda v: g @ v, lambda u: gt @ u, v0, iterations)


def factorize_implicit(a: torch.Tensor, b: torch.Tensor, v0: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-c factors of G̃ = Aᵀ B without forming it: a (n, T, d1), b (n, T, d2) → u, v as above."""
    v0 = v0.expand(a.shape[0], *v0.shape)
    at, bt = a.transpose(1, 2), b.transpose(1, 2)
    return _power_iteration(lambda v: at @ (b @ v), lambda u: bt @ (a @ u), v0, iterations)


def implicit_is_cheaper(tokens: int, d1: int, d2: int, c: int, iterations: int) -> bool:
    """Compare multiply-adds: implicit 2·it·T·(d1+d2)·c vs dense T·d1·d2 + 2·it·d1·d2·c."""
    implicit = 2 * iterations * tokens * (d1 + d2) * c
    dense = tokens * d1 * d2 + 2 * iterations * d1 * d2 * c
    return implicit < dense


def factorize(a: torch.Tensor, b: torch.Tensor, v0: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-c factors of Aᵀ B by the cheaper path; both paths give the same factors up to rounding."""
    n, tokens, d1 = a.shape
    d2, c = v0.shape
    if implicit_is_cheaper(tokens, d1, d2, c, iterations):
        return factorize_implicit(a, b, v0, iterations)
    return factorize_dense(torch.bmm(a.transpose(1, 2), b), v0, iterations)
