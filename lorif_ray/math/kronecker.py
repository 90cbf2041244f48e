"""Kronecker-factored curvature in the projected space: the statistics and the eigenbasis arithmetic.

Orientation (the code's, DESIGN §2.1): G̃ = Σ_tokens x̃ δ̃ᵀ is d1×d2 (x̃ = P_inᵀx, δ̃ = P_outᵀδy), rank-c factors
G̃ = Σ_k u_k v_kᵀ with u (d1), v (d2), and the dense row is the row-major g = vec(G̃), g[i·d2 + j] = G̃[i, j].
For G̃ = x̃ δ̃ᵀ that row is ``torch.kron(x̃, δ̃)``, so in this ordering K-FAC is Ã ⊗ S̃ (activations first):

    Ã = Σ_tokens x̃x̃ᵀ (d1×d1) = Q_A Λ_A Q_Aᵀ,   S̃ = Σ_tokens δ̃δ̃ᵀ (d2×d2) = Q_S Λ_S Q_Sᵀ,
    (Q_A ⊗ Q_S)ᵀ vec(G̃) = vec(Q_Aᵀ G̃ Q_S),     the "rotated" gradient R = Q_Aᵀ G̃ Q_S (d1×d2).

**Normalization** (K-FAC made comparable to GᵀG = Σ_n g_n g_nᵀ): g_n = Σ_{t∈n} x̃_t ⊗ δ̃_t, so
GᵀG = Σ_n Σ_{t,t'∈n} (x̃_t x̃_t'ᵀ) ⊗ (δ̃_t δ̃_t'ᵀ). K-FAC drops the cross-token terms (t ≠ t') and treats x̃ and
δ̃ as independent over the N_tok tokens: Σ_tok (x̃x̃ᵀ) ⊗ (δ̃δ̃ᵀ) ≈ N_tok · (Ã/N_tok) ⊗ (S̃/N_tok). Hence

    H_KFAC = (Ã ⊗ S̃) / N_tok,   eigenvalues Λ[i, j] = Λ_A[i] Λ_S[j] / N_tok,

which equals GᵀG exactly when the tokens form a complete grid {x̃_a} × {δ̃_b} and the cross-token terms of
each example cancel (tests/math/test_kronecker.py). EK-FAC keeps the basis and replaces Λ by the exact
diagonal of GᵀG in it, Λ*[i, j] = Σ_n R_n[i, j]², so no normalization is involved; where K-FAC is exact the
two coincide. (Kronfluence's means — Ã/N_tok, S̃/N_tok, Λ*/N_examples — differ from these by one constant
per layer, which a damping relative to mean(Λ) absorbs.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from lorif_ray.math.blocks import GradientBlock


@dataclass
class KroneckerStats:
    """The K-FAC statistics of one layer: sums over tokens, so partial sums (batches, shards, Ray actors)
    reduce by addition.

    Attributes:
        activations: Ã = Σ_tokens x̃x̃ᵀ (d1, d1), float64.
        gradients: S̃ = Σ_tokens δ̃δ̃ᵀ (d2, d2), float64.
        tokens: N_tok, the tokens summed (K-FAC's normalization).
        examples: the examples they came from (for the record).

    Example:
        >>> total = KroneckerStats.zeros(d1, d2)
        >>> for x, delta, mask in batches:                # (B, T, d1), (B, T, d2), (B, T)
        ...     total += batch_stats(x, delta, mask)
    """

    activations: torch.Tensor
    gradients: torch.Tensor
    tokens: int = 0
    examples: int = 0

    @classmethod
    def zeros(cls, d1: int, d2: int, device="cpu") -> "KroneckerStats":
        return cls(torch.zeros(d1, d1, dtype=torch.float64, device=device),
                   torch.zeros(d2, d2, dtype=torch.float64, device=device))

    @property
    def d1(self) -> int:
        return self.activations.shape[0]

    @property
    def d2(self) -> int:
        return self.gradients.shape[0]

    def __add__(self, other: "KroneckerStats") -> "KroneckerStats":
        if (self.d1, self.d2) != (other.d1, other.d2):
            raise ValueError(f"statistics of shapes (d1, d2) = {(self.d1, self.d2)} and {(other.d1, other.d2)}")
        return KroneckerStats(self.activations + other.activations.to(self.activations.device),
                              self.gradients + other.gradients.to(self.gradients.device),
                              self.tokens + other.tokens, self.examples + other.examples)

    def to(self, device) -> "KroneckerStats":
        return KroneckerStats(self.activations.to(device), self.gradients.to(device), self.tokens, self.examples)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For saving: {"activations", "gradients", "tokens", "examples"} (counts as int64 scalars)."""
        return {"activations": self.activations, "gradients": self.gradients,
                "tokens": torch.tensor(self.tokens, dtype=torch.int64),
                "examples": torch.tensor(self.examples, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "KroneckerStats":
        return cls(tensors["activations"].to(torch.float64), tensors["gradients"].to(torch.float64),
                   int(tensors["tokens"]), int(tensors["examples"]))


def sum_stats(parts: Iterable[KroneckerStats]) -> KroneckerStats:
    """The statistics of the union of the parts' tokens (the driver's reduce)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no statistics to sum")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def batch_stats(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> KroneckerStats:
    """The statistics of one batch from its projected activations and output gradients, in float64.

    Args:
        x: x̃ = X P_in, (B, T, d1) as the capture gives them, or (T, d1) for one example.
        delta: δ̃ = δY P_out, (B, T, d2) or (T, d2), of the examples' summed losses.
        mask: (B, T) or (T,) bool, the tokens that count: every token that can carry a gradient (the
            attention mask — not the loss mask: under causal attention a prompt token's δ̃ is not zero);
            None = all. Padding must be masked out: its x̃ is not zero although its δ̃ is.

    Returns:
        Ã, S̃ summed over the masked-in tokens, their count, and the examples with at least one of them.
    """
    if x.dim() == 2:
        x, delta = x[None], delta[None]
        mask = None if mask is None else mask[None]
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = mask.to(device=x.device, dtype=torch.bool)
    activations, gradients = _masked_sums(x, delta, mask)
    return KroneckerStats(activations, gradients, int(mask.sum()), int(mask.any(dim=1).sum()))


def _masked_sums(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ x̃x̃ᵀ, Σ δ̃δ̃ᵀ) over the masked-in tokens, float64, on the device (no host sync)."""
    xs, ds = x[mask].to(torch.float64), delta[mask].to(torch.float64)  # (tokens, d1), (tokens, d2)
    return xs.T @ xs, ds.T @ ds


class StatsAccumulator:
    """``batch_stats`` summed over batches per layer, kept on the device with no host sync until ``pop``
    (stage 1 sums one shard's statistics while it featurizes the shard)."""

    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}  # layer → [Ã, S̃, tokens] (float64 tensors)
        self.examples = 0

    def add(self, captured: dict[str, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """One batch: {layer: (x̃ (B, T, d1), δ̃ (B, T, d2))} and the tokens that count, mask (B, T)."""
        mask = mask.to(dtype=torch.bool)
        for name, (x, delta) in captured.items():
            keep = mask.to(x.device)
            parts = [*_masked_sums(x, delta, keep), keep.sum().to(torch.float64)]
            if name in self.sums:
                for total, part in zip(self.sums[name], parts):
                    total += part
            else:
                self.sums[name] = parts
        self.examples += int(mask.shape[0])

    def pop(self) -> dict[str, KroneckerStats]:
        """{layer: KroneckerStats} of the batches added since the last pop (on the CPU), and reset."""
        out = {name: KroneckerStats(a.cpu(), s.cpu(), int(tokens), self.examples)
               for name, (a, s, tokens) in self.sums.items()}
        self.sums, self.examples = {}, 0
        return out


def eigenbasis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ≥ 0 (d,), eigenvectors (d, d)) of a symmetric PSD statistic, in float64."""
    matrix = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.clamp_min(0), vectors.contiguous()  # eigh's vectors come column-major


def kfac_eigenvalues(stats: KroneckerStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_A (d1, d1), Q_S (d2, d2), Λ (d1, d2) = Λ_A Λ_Sᵀ / N_tok), float64: K-FAC's (Ã ⊗ S̃)/N_tok."""
    if stats.tokens <= 0:
        raise ValueError("K-FAC statistics of zero tokens")
    values_a, basis_a = eigenbasis(stats.activations)
    values_s, basis_s = eigenbasis(stats.gradients)
    return basis_a, basis_s, torch.outer(values_a, values_s) / stats.tokens


def rotate(rows: torch.Tensor | GradientBlock, basis_a: torch.Tensor, basis_s: torch.Tensor) -> torch.Tensor:
    """R = Q_Aᵀ G̃ Q_S per example: dense rows (n, D) or a GradientBlock → (n, d1, d2), in the bases' dtype.

    From factors it costs n·c·(d1² + d2² + d1·d2): Q_Aᵀ u_k and Q_Sᵀ v_k per component, then Σ_k of their outer
    products (exact whenever the factors are)."""
    d1, d2 = basis_a.shape[0], basis_s.shape[0]
    if isinstance(rows, GradientBlock) and rows.factored:
        u = basis_a.T @ rows.u.to(basis_a.dtype)  # (n, d1, c)
        v = basis_s.T @ rows.v.to(basis_s.dtype)  # (n, d2, c)
        return u @ v.transpose(1, 2)
    g = rows.dense() if isinstance(rows, GradientBlock) else rows
    return basis_a.T @ g.to(basis_a.dtype).reshape(-1, d1, d2) @ basis_s


def unrotate(rotated: torch.Tensor, basis_a: torch.Tensor, basis_s: torch.Tensor) -> torch.Tensor:
    """vec(Q_A R Q_Sᵀ): (n, d1, d2) → dense rows (n, D)."""
    return (basis_a @ rotated @ basis_s.T).reshape(rotated.shape[0], -1)


def eigenvalue_sums(rows: torch.Tensor | GradientBlock, basis_a: torch.Tensor, basis_s: torch.Tensor) -> torch.Tensor:
    """EK-FAC's Σ_n R_n² over these rows (d1, d2), rotated in the bases' dtype and summed in float64."""
    return rotate(rows, basis_a, basis_s).to(torch.float64).square().sum(dim=0)
