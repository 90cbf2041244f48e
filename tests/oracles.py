"""Float64 oracles: influence scores from explicitly formed D×D matrices, for the tests only.

Nothing here is clever: H⁻¹ is formed and inverted with ``torch.linalg.inv``, scores are g_qᵀ H⁻¹ g_t
on dense rows, layer by layer. The production scorer (``lorif_ray.math.scoring``) must match them.
"""

from __future__ import annotations

import torch


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(GᵀG + λI)⁻¹ by a plain matrix inverse: (D, D)."""
    return torch.linalg.inv(gram.double() + damping * torch.eye(gram.shape[0], dtype=torch.float64))


def woodbury_inverse(vectors: torch.Tensor, values: torch.Tensor, damping: float) -> torch.Tensor:
    """(V diag(σ²) Vᵀ + λI)⁻¹ formed explicitly: (D, D)."""
    vectors = vectors.double()
    return damped_inverse((vectors * values.double()) @ vectors.T, damping)


def curvature_inverse(curvature, dim: int) -> torch.Tensor:
    """The explicit H⁻¹ (D, D) of a fitted ``lorif_ray.math.curvature`` object."""
    if getattr(curvature, "inverse", None) is not None:
        return curvature.inverse.double()
    if getattr(curvature, "vectors", None) is not None:
        return woodbury_inverse(curvature.vectors, curvature.values, curvature.damping)
    if getattr(curvature, "basis_a", None) is not None:
        return eigenbasis_inverse(curvature.basis_a, curvature.basis_s, curvature.eigenvalues, curvature.damping)
    return torch.eye(dim, dtype=torch.float64)


def oracle_scores(query: dict[str, torch.Tensor], train: dict[str, torch.Tensor],
                  inverses: dict[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
    """Σ_layers g_q H⁻¹ g_tᵀ from dense rows {layer: (n, D)} and explicit {layer: H⁻¹}: (nq, nt); normalized
    by sqrt(I(q,q) I(t,t)) if asked."""
    scores = sum(query[n].double() @ inverses[n] @ train[n].double().T for n in inverses)
    if not normalize:
        return scores
    self_q = sum(((query[n].double() @ inverses[n]) * query[n].double()).sum(1) for n in inverses)
    self_t = sum(((train[n].double() @ inverses[n]) * train[n].double()).sum(1) for n in inverses)
    return scores / (self_q[:, None] * self_t[None, :]).sqrt()


def spiked_rows(n: int, dim: int, *, spikes: int = 4, spike_scale: float = 30.0, seed: int = 0) -> torch.Tensor:
    """(n, D) correlated rows: a few strong shared directions over a weak isotropic floor, so that
    σ₁²/λ is in the hundreds under the default damping rule — LoRIF's two terms then nearly cancel."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(dim, spikes, generator=gen, dtype=torch.float64)).Q
    weights = torch.randn(n, spikes, generator=gen, dtype=torch.float64) * spike_scale / torch.arange(1, spikes + 1)
    return weights @ directions.T + torch.randn(n, dim, generator=gen, dtype=torch.float64)


def kronecker_inverse(activations: torch.Tensor, gradients: torch.Tensor, tokens: int, damping: float) -> torch.Tensor:
    """((Ã ⊗ S̃)/N_tok + λI)⁻¹ with ``torch.kron``: (D, D), in the row-major vec(G̃) ordering (G̃ is d1×d2, so
    vec(x δᵀ) = kron(x, δ) and the activation factor comes first)."""
    return damped_inverse(torch.kron(activations.double(), gradients.double()) / tokens, damping)


def eigenbasis_inverse(basis_a: torch.Tensor, basis_s: torch.Tensor, eigenvalues: torch.Tensor,
                       damping: float) -> torch.Tensor:
    """((Q_A ⊗ Q_S) diag(vec Λ) (Q_A ⊗ Q_S)ᵀ + λI)⁻¹ formed explicitly: (D, D)."""
    basis = torch.kron(basis_a.double(), basis_s.double())
    return damped_inverse((basis * eigenvalues.double().reshape(-1)) @ basis.T, damping)


def ekfac_eigenvalues(rows: torch.Tensor, basis_a: torch.Tensor, basis_s: torch.Tensor) -> torch.Tensor:
    """diag((Q_A ⊗ Q_S)ᵀ GᵀG (Q_A ⊗ Q_S)) from dense rows (n, D), as (d1, d2): EK-FAC's Λ* by its definition."""
    basis = torch.kron(basis_a.double(), basis_s.double())
    gram = rows.double().T @ rows.double()
    return (basis.T @ gram @ basis).diagonal().reshape(basis_a.shape[0], basis_s.shape[0])
