"""Inner products of projected gradients of one layer (``GradientBlock``s: factors or dense rows), and RepSim.

The curvatures that turn inner products into influence scores are in ``lorif_ray.math.curvature``.

Score convention (every method, every output): I(t, q) = g_qᵀ H⁻¹ g_t with g the gradient of the
*summed* token loss and H ≈ GᵀG + λI. Up-weighting t by ε changes the query loss by about −ε·I(t, q),
so a positive score marks a proponent (training on t lowers the query's loss) and I(t, q) itself
approximates how much the query loss (nats) would rise if t were left out of training.

LoRIF (DESIGN §2.4), with g' = V_rᵀ g and w_j = σ_j² / (λ(λ + σ_j²)):
    I(t, q) = (1/λ) g_qᵀ g_t − Σ_j w_j g'_{q,j} g'_{t,j},
and g_qᵀ g_t = Σ_{a,b} (u_{q,a}ᵀ u_{t,b})(v_{q,a}ᵀ v_{t,b}) from rank-c factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorif_ray.math.blocks import GradientBlock


def factor_inner(uq: torch.Tensor, vq: torch.Tensor, ut: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """⟨u_q v_qᵀ, u_t v_tᵀ⟩_F for all pairs: O(c²(d1+d2)) each → (nq, nt)."""
    nq, d1, cq = uq.shape
    nt, _, ct = ut.shape
    uu = uq.transpose(1, 2).reshape(nq * cq, d1) @ ut.transpose(1, 2).reshape(nt * ct, d1).T
    vv = vq.transpose(1, 2).reshape(nq * cq, -1) @ vt.transpose(1, 2).reshape(nt * ct, -1).T
    if cq == ct == 1:
        return uu * vv
    return (uu * vv).reshape(nq, cq, nt, ct).sum(dim=(1, 3))


def inner(a: GradientBlock, b: GradientBlock) -> torch.Tensor:
    """g_aᵀ g_b for all pairs (na, nb), through the factors when both sides have them."""
    if a.factored and b.factored:
        return factor_inner(a.u, a.v, b.u, b.v)
    return a.dense() @ b.dense().T


def self_inner(a: GradientBlock) -> torch.Tensor:
    """‖g‖² per example (n,)."""
    if a.factored:
        return ((a.u.transpose(1, 2) @ a.u) * (a.v.transpose(1, 2) @ a.v)).sum(dim=(1, 2))
    return (a.g * a.g).sum(dim=1)


def repsim_scores(query_hidden: torch.Tensor, train_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of representations: (nq, H), (nt, H) → (nq, nt)."""
    return F.normalize(query_hidden, dim=1) @ F.normalize(train_hidden, dim=1).T
