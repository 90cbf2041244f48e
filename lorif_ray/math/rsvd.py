"""Randomized truncated SVD of G (N×D) from streamed row batches, never materializing G.

We only ever need sums over rows, ``GᵀG Q = Σ_batches G_bᵀ (G_b Q)`` (D×k), so the same code runs
in one process or reduced across workers: subspace iteration on GᵀG (Halko et al. 2011, Alg. 4.4
on the Gram matrix) with k = r + p columns, then Rayleigh–Ritz on the k×k matrix Qᵀ GᵀG Q.
Eigenvalues of GᵀG are the squared singular values σ² of G; its eigenvectors are G's right
singular vectors V. When k ≥ D the D×D Gram matrix is formed and decomposed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from lorif_ray.math.projection import gaussian

GramApply = Callable[[torch.Tensor], torch.Tensor]
"""Q (D, k) ↦ GᵀG Q (D, k)."""


@dataclass
class Spectrum:
    """Top of the spectrum of GᵀG for one layer.

    Attributes:
        vectors: (D, r) orthonormal right singular vectors V_r of G.
        values: (r,) eigenvalues σ_j² of GᵀG, descending.
        extra_values: (k − r,) the next computed eigenvalues (the oversampling), descending.
    """

    vectors: torch.Tensor
    values: torch.Tensor
    extra_values: torch.Tensor

    def damping(self, scale: float = 0.1) -> float:
        """λ = scale × mean of the top r + p eigenvalues (paper App. A.2)."""
        top = torch.cat([self.values, self.extra_values])
        return float(scale * top.mean()) if top.numel() else 0.0


def gram_apply_from_batches(row_batches: Callable[[], Iterable[torch.Tensor]]) -> GramApply:
    """GᵀG Q by one pass over ``row_batches()`` (a fresh iterator of (b, D) tensors per call)."""

    def apply(q: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(q)
        for rows in row_batches():
            rows = rows.to(device=q.device, dtype=q.dtype)
            out += rows.T @ (rows @ q)
        return out

    return apply


def gram_from_batches(row_batches: Iterable[torch.Tensor], dim: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """GᵀG (D, D) by one pass."""
    gram = torch.zeros(dim, dim, dtype=dtype, device=device)
    for rows in row_batches:
        rows = rows.to(device=device, dtype=dtype)
        gram += rows.T @ rows
    return gram


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _top(values: torch.Tensor, vectors: torch.Tensor, rank: int) -> Spectrum:
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    return Spectrum(vectors[:, :rank].contiguous(), values[:rank].contiguous(), values[rank:].contiguous())


def eigh_spectrum(gram: torch.Tensor, rank: int, oversample: int = 10) -> Spectrum:
    """Exact top-``rank`` spectrum from a formed Gram matrix (D, D)."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    spectrum = _top(values, vectors, rank)
    keep = max(0, min(oversample, spectrum.extra_values.numel()))
    spectrum.extra_values = spectrum.extra_values[:keep]
    spectrum.vectors = spectrum.vectors.to(gram.dtype)
    return spectrum


def randomized_spectrum(
    gram_apply: GramApply,
    dim: int,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 3,
    seed: int = 0,
    name: str = "",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Spectrum:
    """Top-``rank`` eigenpairs of GᵀG by randomized subspace iteration.

    Args:
        gram_apply: Q (D, k) ↦ GᵀG Q; called ``power_iters + 1`` times (one pass over G each).
        dim: D.
        rank: r, the number of eigenpairs kept.
        oversample: p; k = min(r + p, D) columns are iterated.
        power_iters: subspace iterations before the Rayleigh–Ritz step.
        seed, name: determine the random start (same seed and layer name → same result).

    Returns:
        The top r eigenpairs and the next k − r eigenvalues.
    """
    k = min(rank + oversample, dim)
    q = _orthonormal(gaussian(seed, (dim, k), name, "rsvd").to(device=device, dtype=dtype))
    for _ in range(power_iters):
        q = _orthonormal(gram_apply(q))
    z = gram_apply(q)  # (D, k)
    small = (q.T @ z).to(torch.float64)
    values, rotation = torch.linalg.eigh((small + small.T) / 2)
    spectrum = _top(values, q.to(torch.float64) @ rotation, rank)
    spectrum.vectors = spectrum.vectors.to(dtype)
    return spectrum
