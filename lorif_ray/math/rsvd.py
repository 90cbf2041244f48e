"""Randomized truncated SVD of G (N×D) from streamed rows, never materializing G.

Everything needs only sums over rows, ``GᵀG Q = Σ_batches G_bᵀ (G_b Q)`` (D×k): one ``GramOperator``
does that loop over any *row source* (rows streamed from Parquet, resident on a device, or a Ray
worker's shard group, whose partial sums the driver adds), so the same code runs everywhere.

``randomized_spectrum`` is randomized subspace iteration (Halko et al. 2011, Alg. 4.4) with
k = r + p columns: q passes Q ← orth(GᵀG Q), then one last pass Z = GᵀG Q. The last pass already holds
G's range sketch Y = G Q implicitly: YᵀY = QᵀZ and GᵀY = Z, so B = R⁻ᵀ Zᵀ (R the Cholesky factor of
YᵀY) is the k×D matrix QYᵀG of the randomized SVD, and its right singular vectors span
(GᵀG)^{q+1}Ω — one power more than a Rayleigh–Ritz step on span(Q), with no extra pass. When
k ≥ D the D×D Gram matrix is formed and decomposed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch

from lorif_ray.math.projection import gaussian


class RowSource(Protocol):
    """Dense rows vec(G̃) of one layer, batch by batch: a fresh iterator of (b, D) tensors per call."""

    device: torch.device

    def batches(self, dtype: torch.dtype) -> Iterator[torch.Tensor]: ...


class GramOperatorLike(Protocol):
    """What a curvature's ``fit`` needs: Q (D, k) ↦ GᵀG Q (one pass), the D×D GᵀG (one pass), a device."""

    device: torch.device

    def __call__(self, q: torch.Tensor) -> torch.Tensor: ...

    def gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor: ...


class TensorRows:
    """A row source over rows already in memory (e.g. tests, or a resident dense layer).

    Args:
        rows: (N, D), or a callable returning an iterable of (b, D) tensors.
        batch_rows: rows per batch when ``rows`` is a tensor.
    """

    def __init__(self, rows: torch.Tensor | Callable[[], Iterable[torch.Tensor]], batch_rows: int = 4096):
        self.rows, self.batch_rows = rows, batch_rows
        self.device = rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")

    def batches(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        parts = self.rows.split(self.batch_rows) if isinstance(self.rows, torch.Tensor) else self.rows()
        for part in parts:
            yield part.to(dtype)


class GramOperator:
    """GᵀG Q, GᵀG and G V by one pass each over a row source.

    Args:
        rows: the layer's ``RowSource``.
        matmul_dtype: dtype of the two GEMMs' inputs per batch (e.g. bfloat16 on a GPU; None = Q's
            dtype); results accumulate in Q's dtype.

    Example:
        >>> op = GramOperator(TensorRows(g))
        >>> torch.allclose(op(q), g.T @ (g @ q))
        True
    """

    def __init__(self, rows: RowSource, matmul_dtype: torch.dtype | None = None):
        self.rows, self.matmul_dtype = rows, matmul_dtype
        self.device = rows.device

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        mm = self.matmul_dtype or q.dtype
        qm = q.to(device=self.device, dtype=mm)
        out = torch.zeros(q.shape, dtype=q.dtype, device=self.device)
        for rows in self.rows.batches(mm):
            out += (rows.T @ (rows @ qm)).to(q.dtype)
        return out

    def gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """GᵀG (D, D)."""
        out = None
        for rows in self.rows.batches(dtype):
            part = rows.T @ rows
            out = part if out is None else out.add_(part)
        if out is None:
            raise ValueError("the row source yielded no rows")
        return out

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """G V (N, r) in V's dtype."""
        vectors = vectors.to(self.device)
        return torch.cat([rows @ vectors for rows in self.rows.batches(vectors.dtype)])


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


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _top(values: torch.Tensor, vectors: torch.Tensor, rank: int) -> Spectrum:
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    return Spectrum(vectors[:, :rank].contiguous(), values[:rank].contiguous(), values[rank:].contiguous())


def eigh_spectrum(gram: torch.Tensor, rank: int, oversample: int = 10) -> Spectrum:
    """Exact top-``rank`` spectrum from a formed Gram matrix (D, D), decomposed in float64."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    spectrum = _top(values, vectors, rank)
    keep = max(0, min(oversample, spectrum.extra_values.numel()))
    spectrum.extra_values = spectrum.extra_values[:keep]
    spectrum.vectors = spectrum.vectors.to(gram.dtype)
    return spectrum


def spectrum_from_last_pass(q: torch.Tensor, z: torch.Tensor, rank: int) -> Spectrum:
    """The randomized SVD's final step from Q (D, k) orthonormal and Z = GᵀG Q, in float64.

    With Y = G Q: YᵀY = QᵀZ = W Λ Wᵀ, so R = Λ^{1/2} Wᵀ is a square root of it and B = R⁻ᵀ Zᵀ = Λ^{-1/2} Wᵀ Zᵀ
    (k'×D, directions with Λ ≈ 0 dropped) equals Q_Yᵀ G. G ≈ Q_Y B, so V_r and σ² come from B's SVD.
    """
    q, z = q.to(torch.float64), z.to(torch.float64)
    small = q.T @ z
    lam, w = torch.linalg.eigh((small + small.T) / 2)
    keep = lam > lam.max().clamp_min(0) * q.shape[0] * torch.finfo(torch.float64).eps
    if not bool(keep.any()):  # G Q = 0: no direction of G was found
        return _top(torch.zeros(q.shape[1], dtype=torch.float64), q, rank)
    b = (w[:, keep] / lam[keep].sqrt()).T @ z.T  # (k', D)
    _, sigma, vh = torch.linalg.svd(b, full_matrices=False)
    values, vectors = sigma ** 2, vh.T
    missing = q.shape[1] - values.numel()
    if missing:  # keep k columns: the dropped directions carry (numerically) zero eigenvalues
        filler = _orthonormal(torch.cat([vectors, q], dim=1))[:, values.numel():q.shape[1]]
        values = torch.cat([values, values.new_zeros(missing)])
        vectors = torch.cat([vectors, filler], dim=1)
    return _top(values, vectors, rank)


def randomized_spectrum(
    gram_apply: Callable[[torch.Tensor], torch.Tensor],
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
        power_iters: subspace iterations before the last pass.
        seed, name: determine the random start (same seed and layer name → same result).
        dtype, device: of Q and the passes (the final k×D step runs in float64).

    Returns:
        The top r eigenpairs and the next k − r eigenvalues; vectors in ``dtype``.
    """
    k = min(rank + oversample, dim)
    q = _orthonormal(gaussian(seed, (dim, k), name, "rsvd").to(device=device, dtype=dtype))
    for _ in range(power_iters):
        q = _orthonormal(gram_apply(q))
    spectrum = spectrum_from_last_pass(q, gram_apply(q), rank)
    spectrum.vectors = spectrum.vectors.to(dtype)
    return spectrum
