"""Batched scoring: every layer of a block of training rows at once — the one scorer of stage 3.

The per-layer score (``Curvature.score``) summed over layers is rearranged into a few large products:

- term 1 from factors, Σ_ℓ s_ℓ (u_qᵀ u_t)(v_qᵀ v_t) with s_ℓ = 1/λ_ℓ (LoRIF) or 1 (GradDot): layers of
  equal (d1, d2, c) are stacked and done in two ``bmm`` calls per group, (L, nq·c, d) × (L, d, nt·c);
  s_ℓ is folded into the query's u.
- dense terms, Σ_ℓ (P_ℓ g_q)ᵀ g_t (LoGRA, GradDot, LoRIF's 1/λ term on dense rows): one GEMM over the
  layers' concatenated columns.
- LoRIF's curvature term, −Σ_ℓ Σ_j w_j g'_{q,j} g'_{t,j}, by one of three routes (``choose_route``):
  stored g'_t = V_rᵀ g_t (one GEMM over every layer's concatenated coordinates, r per pair);
  from the query side, ⟨h_q, g_t⟩ with h_q = V_r (w ⊙ g'_q) ∈ R^D prepared once per query batch
  (nq·D per training row: cheaper than recomputing when nq < r, and needs neither V_r nor g'_t
  while scoring);
  or g'_t recomputed from the block (r·D per training row). The last two form the block's dense rows
  vec(u vᵀ) per group of layers of equal shape and r and use one ``bmm`` per group.

The training rows come as ``TrainBlock``s in a ``RowLayout`` built with the curvature
(``lorif_ray.math.blocks``), from any row source (Parquet stream, resident, Ray actors): the numbers do not
depend on it. Everything is torch only and device-agnostic; in float64 it equals the explicit
g_qᵀ H⁻¹ g_t of the oracles in ``tests/oracles.py`` to rounding (tests/math/test_scoring.py).

Example:
    >>> layout = RowLayout.build(specs, "factors", curvature)
    >>> query = StackedQuery(layout, query_blocks, curvature)
    >>> scores = query.scores(layout.train_block(train_blocks))  # (nq, nt)
"""

from __future__ import annotations

from typing import Iterator

import torch

from lorif_ray.math.blocks import GradientBlock, RowLayout, TrainBlock
from lorif_ray.math.curvature import Curvature
from lorif_ray.math.influence import repsim_scores, self_inner


ROUTES = ("stored", "query", "recompute", "none")


def choose_route(num_queries: int, ranks: list[int], *, stored: bool, train_self: bool) -> str:
    """How a batch of ``num_queries`` gets LoRIF's curvature term Σ w g'_q g'_t (the one place it is chosen).

    - "stored": g'_t = V_rᵀ g_t were stored by stage 2 (r numbers per pair, no V_r while scoring);
    - "query": h_q = V_r (w ⊙ g'_q) prepared once, ⟨h_q, g_t⟩ per row: nq·D per training row, cheaper than
      recomputing g'_t (r·D) when nq < r; never when I(t, t) is needed, since it needs g'_t;
    - "recompute": g'_t from each block's rows and V_r;
    - "none": no layer has a low-rank term.

    Args:
        ranks: r of every layer with a low-rank term.
        stored: g'_t of every row are stored (in the policy's dtype) for the current curvature.
        train_self: I(t, t) of the training rows is needed (``query.normalize``, ``query.self_influence``).
    """
    if not ranks:
        return "none"
    if stored:
        return "stored"
    if not train_self and num_queries < min(ranks):
        return "query"
    return "recompute"


def _stacked_dense(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Khatri–Rao rows vec(Σ_c u_c v_cᵀ): (L, n, c, d1), (L, n, c, d2) → (L, n, d1·d2)."""
    length, n, _, d1 = u.shape
    return torch.einsum("lnci,lncj->lnij", u, v).reshape(length, n, d1 * v.shape[-1])


class StackedQuery:
    """Query-side terms of every layer, prepared once; ``scores`` does one block of training rows.

    Args:
        layout: from ``RowLayout.build`` with ``curvature``.
        query: {layer: GradientBlock} of the queries (factors or dense, like the store).
        curvature: {layer: Curvature}; low-rank layers need V_r unless the route and the injected terms
            spare it.
        route: the curvature term's route (``choose_route``): "stored" (blocks carry g'_t), "query",
            "recompute" or "none"; None = ``choose_route`` with stored=False.
        normalize: divide by sqrt(I(q,q) I(t,t)) (cosine in the curvature metric).
        matmul_dtype: dtype of the big products' inputs (the policy's ``precision.matmul``, e.g.
            bfloat16 on a GPU); products are cast back to the query's dtype before they are multiplied
            and summed. None = the query's.
        query_coordinates: {layer: g'_q = V_rᵀ g_q (nq, r)} made elsewhere (``QueryProjector``).
        query_side_terms: {layer: h_q = V_r (w ⊙ g'_q) (nq, D)} made elsewhere (route "query").
    """

    def __init__(self, layout: RowLayout, query: dict[str, GradientBlock], curvature: dict[str, Curvature],
                 *, route: str | None = None, normalize: bool = False, matmul_dtype: torch.dtype | None = None,
                 query_coordinates: dict[str, torch.Tensor] | None = None,
                 query_side_terms: dict[str, torch.Tensor] | None = None):
        self.layout, self.normalize = layout, normalize
        self.layer_index = {name: i for i, name in enumerate(layout.names)}
        first = next(iter(query.values()))
        self.dtype = (first.u if first.factored else first.g).dtype
        self.matmul_dtype = matmul_dtype or self.dtype
        self.nq = len(first)
        self.route = route or choose_route(self.nq, [g.rank for g in layout.coordinate_groups], stored=False,
                                           train_self=normalize)
        if self.route not in ROUTES:
            raise ValueError(f"route {self.route!r}: choose one of {ROUTES}")
        mm = self.matmul_dtype
        self.factor_query = []  # per group: (U_q (L, nq·c, d1) scaled by s_ℓ, V_q (L, nq·c, d2))
        for g in layout.factor_groups:
            if g.preconditioned:  # (L, nq, D) H⁻¹ g_q
                self.factor_query.append(torch.stack([curvature[n].precondition(query[n].dense())
                                                      for n in g.names]).to(mm))
                continue
            scale = torch.tensor([layout.scale[n] for n in g.names], dtype=self.dtype, device=first.u.device)
            u = torch.stack([query[n].u.transpose(1, 2) for n in g.names]) * scale[:, None, None, None]
            v = torch.stack([query[n].v.transpose(1, 2) for n in g.names])
            self.factor_query.append((u.reshape(len(g.names), -1, g.d1).to(mm),
                                      v.reshape(len(g.names), -1, g.d2).to(mm)))
        self.dense_query = None  # (nq, ΣD): s_ℓ g_q, or H⁻¹ g_q for a full-matrix curvature
        if layout.dense_dims:
            self.dense_query = torch.cat([curvature[n].precondition(query[n].dense()) for n in layout.dense_dims],
                                         dim=1).to(mm)
        # Curvature term: −(w ⊙ g'_q) against g'_t, every low-rank layer side by side; per group V_r (to
        # recompute g'_t) or h_q = V_r (w ⊙ g'_q) (the query side), as the route needs.
        self.vectors, self.query_side, coordinates, weights = [], [], [], []
        for g in layout.coordinate_groups:
            lows = [curvature[n].low_rank for n in g.names]
            w = torch.stack([low[1] for low in lows]).to(self.dtype)  # (L, r)
            has_vectors = all(low[0] is not None for low in lows)
            vectors = torch.stack([low[0] for low in lows]).to(self.dtype) if has_vectors else None  # (L, D, r)
            if query_coordinates is not None:
                coords = torch.stack([query_coordinates[n].to(device=w.device, dtype=self.dtype) for n in g.names])
            elif vectors is not None:
                coords = torch.bmm(torch.stack([query[n].dense() for n in g.names]), vectors)  # (L, nq, r)
            else:
                raise ValueError(f"layers {g.names}: neither V_r nor g'_q of the queries are at hand")
            side = None
            if self.route == "query":
                if query_side_terms is not None:
                    side = torch.stack([query_side_terms[n] for n in g.names]).to(device=w.device, dtype=mm)
                elif vectors is not None:
                    side = torch.bmm(coords * w[:, None, :], vectors.transpose(1, 2)).to(mm)  # (L, nq, D)
                else:
                    raise ValueError(f"layers {g.names}: the query-side route needs V_r or h_q")
            self.query_side.append(side)
            self.vectors.append(vectors.to(mm) if vectors is not None and side is None else None)
            coordinates.append(coords.transpose(0, 1).reshape(self.nq, -1))
            weights.append(w.reshape(-1))
        self.weights = torch.cat(weights) if weights else None  # (Σr,)
        query_coords = torch.cat(coordinates, dim=1) if coordinates else None  # (nq, Σr) g'_q
        self.weighted = None if query_coords is None else (query_coords * self.weights).to(mm)
        self.preconditioned = {n: curvature[n] for n in layout.names if n not in layout.scale}
        if normalize:
            self.query_self = self._query_self(query, query_coords)

    def _query_self(self, query: dict[str, GradientBlock], coords: torch.Tensor | None) -> torch.Tensor:
        """I(q, q) per query (nq,): s_ℓ‖g_q‖² (or g_qᵀ H⁻¹ g_q) summed, minus Σ w g'_q²."""
        out = sum(self_inner(query[n]) * self.layout.scale[n] for n in self.layout.scale)
        out = out + sum((c.precondition(query[n].dense()) * query[n].dense()).sum(dim=1)
                        for n, c in self.preconditioned.items())
        if coords is not None:
            out = out - (coords * coords * self.weights).sum(dim=1)
        return out

    def coordinates(self, block: TrainBlock) -> torch.Tensor:
        """g'_t = V_rᵀ g_t of every low-rank layer: (nt, Σr) (stored ones if the block has them)."""
        if block.coordinates is not None:
            return block.coordinates
        rows = self._coordinate_rows(block)
        return torch.cat([self._group_coordinates(i, r) for i, r in enumerate(rows)], dim=1)

    def _group_coordinates(self, group: int, rows: torch.Tensor) -> torch.Tensor:
        """g'_t (nt, L·r) of one CoordinateGroup from its dense rows (L, nt, D)."""
        vectors = self.vectors[group]
        if vectors is None:
            raise ValueError(f"route {self.route!r}: the block has no stored g'_t and this query holds no V_r to "
                             "compute them (a curvature loaded without vectors, or the query-side route)")
        return torch.bmm(rows.to(vectors.dtype), vectors).transpose(0, 1).reshape(rows.shape[1], -1)

    def _coordinate_rows(self, block: TrainBlock) -> Iterator[torch.Tensor]:
        """Dense rows (L, nt, D) of each CoordinateGroup, one group at a time (nt · ΣD numbers for every group at
        once would be the largest allocation of a 70B query actor)."""
        layers = self.layout.layer_blocks(block)
        index = {tuple(fg.names): i for i, fg in enumerate(self.layout.factor_groups)}
        for g in self.layout.coordinate_groups:
            if block.factors is not None and tuple(g.names) in index:
                yield _stacked_dense(*block.factors[index[tuple(g.names)]])
            else:
                yield torch.stack([layers[n].dense() for n in g.names])

    def _zeros(self, nt: int, per_layer: bool) -> torch.Tensor:
        """(nq, nt), or (L, nq, nt) with one slice per layer of ``layout.names``."""
        shape = (len(self.layout.names), self.nq, nt) if per_layer else (self.nq, nt)
        return torch.zeros(shape, dtype=self.dtype, device=self._device)

    def _add(self, out: torch.Tensor, names: list[str], parts: torch.Tensor) -> None:
        """Add the per-layer parts (L, nq, nt) of ``names`` to ``out``: into their slices, or summed."""
        if out.dim() == 3:
            out[[self.layer_index[n] for n in names]] += parts
        else:
            out += parts.sum(dim=0)

    def _column_products(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                         widths: list[tuple[str, int]]) -> None:
        """``out`` += left (nq, W) @ right (nt, W)ᵀ, whose columns are the layers' (name, width) side by side:
        one GEMM, or one per layer when ``out`` is per layer."""
        if out.dim() == 2:
            out += (left @ right.T).to(self.dtype)
            return
        start = 0
        for name, width in widths:
            columns = slice(start, start + width)
            out[self.layer_index[name]] += (left[:, columns] @ right[:, columns].T).to(self.dtype)
            start += width

    def term_one(self, block: TrainBlock, per_layer: bool = False) -> torch.Tensor:
        """Σ_ℓ s_ℓ g_qᵀ g_t (with H⁻¹ for full-matrix curvatures): (nq, nt), or (L, nq, nt) ``per_layer``."""
        nt = len(block)
        out = self._zeros(nt, per_layer)
        mm = self.matmul_dtype
        if block.factors is not None:
            for g, terms, (ut, vt) in zip(self.layout.factor_groups, self.factor_query, block.factors):
                length = len(g.names)
                if g.preconditioned:  # ⟨H⁻¹ g_q, vec(Σ_k u_k v_kᵀ)⟩: (L, nq, D) × (L, D, nt)
                    rows = _stacked_dense(ut.to(mm), vt.to(mm))
                    self._add(out, g.names, torch.bmm(terms, rows.transpose(1, 2)).to(self.dtype))
                    continue
                uq, vq = terms
                uu = torch.bmm(uq, ut.reshape(length, nt * g.c, g.d1).to(mm).transpose(1, 2)).to(self.dtype)
                vv = torch.bmm(vq, vt.reshape(length, nt * g.c, g.d2).to(mm).transpose(1, 2)).to(self.dtype)
                prod = uu.mul_(vv)  # (L, nq·c, nt·c)
                if g.c > 1:
                    prod = prod.reshape(length, self.nq, g.c, nt, g.c).sum(dim=(2, 4))
                self._add(out, g.names, prod.reshape(length, self.nq, nt))
        if block.dense is not None:
            self._column_products(out, self.dense_query, block.dense.to(mm), list(self.layout.dense_dims.items()))
        return out

    def curvature_term(self, block: TrainBlock, per_layer: bool = False) -> torch.Tensor | None:
        """Σ_ℓ Σ_j w_j g'_{q,j} g'_{t,j} (to be subtracted): (nq, nt), or (L, nq, nt) ``per_layer``; None without
        low-rank layers."""
        if self.weighted is None:
            return None
        mm = self.matmul_dtype
        out = self._zeros(len(block), per_layer)
        widths = [(n, g.rank) for g in self.layout.coordinate_groups for n in g.names]
        if self.route == "stored":
            if block.coordinates is None:
                raise ValueError("route 'stored': the block carries no stored g'_t")
            self._column_products(out, self.weighted, block.coordinates.to(mm), widths)
            return out
        start = 0
        for i, (g, rows) in enumerate(zip(self.layout.coordinate_groups, self._coordinate_rows(block))):
            width = g.rank * len(g.names)
            if self.query_side[i] is not None:  # Σ_ℓ h_q · g_t: (L, nq, D) × (L, D, nt)
                self._add(out, g.names, torch.bmm(self.query_side[i], rows.to(mm).transpose(1, 2)).to(self.dtype))
            else:
                coords = self._group_coordinates(i, rows).to(mm)
                self._column_products(out, self.weighted[:, start:start + width], coords, [(n, g.rank) for n in g.names])
            start += width
        return out

    @property
    def _device(self):
        ref = self.factor_query[0][0] if self.factor_query else self.dense_query
        return ref.device

    def scores(self, block: TrainBlock, per_layer: bool = False) -> torch.Tensor:
        """I(t, q) summed over layers (normalized if asked): (nq, nt); or each layer's I_ℓ(t, q) (L, nq, nt) in
        ``layout.names`` order (``per_layer``; not with ``normalize``), whose sum over layers is the former."""
        if per_layer and self.normalize:
            raise ValueError("per-layer scores are not normalized: I(t,t) and I(q,q) are sums over layers")
        scores = self.term_one(block, per_layer)
        curvature = self.curvature_term(block, per_layer)
        if curvature is not None:
            scores -= curvature
        if self.normalize:
            train_self = self.train_self_influence(block)
            scores = scores / (self.query_self[:, None] * train_self[None, :]).clamp_min(1e-30).sqrt()
        return scores

    def train_self_influence(self, block: TrainBlock) -> torch.Tensor:
        """I(t, t) per training row (nt,), from the same stacked layout."""
        nt = len(block)
        out = torch.zeros(nt, dtype=self.dtype, device=self._device)
        if block.factors is not None:
            for g, (u, v) in zip(self.layout.factor_groups, block.factors):
                if g.preconditioned:
                    for i, name in enumerate(g.names):
                        layer = GradientBlock(u=u[i].transpose(1, 2).to(self.dtype),
                                              v=v[i].transpose(1, 2).to(self.dtype))
                        out += self.preconditioned[name].self_influence(layer)
                    continue
                scale = torch.tensor([self.layout.scale[n] for n in g.names], dtype=self.dtype, device=out.device)
                u, v = u.to(self.dtype), v.to(self.dtype)
                uu = u @ u.transpose(2, 3)  # (L, n, c, c)
                vv = v @ v.transpose(2, 3)
                out += ((uu * vv).sum(dim=(2, 3)) * scale[:, None]).sum(dim=0)
        if block.dense is not None:
            start = 0
            for name, dim in self.layout.dense_dims.items():
                g = block.dense[:, start:start + dim].to(self.dtype)
                start += dim
                if name in self.preconditioned:
                    out += (self.preconditioned[name].precondition(g) * g).sum(dim=1)
                else:
                    out += (g * g).sum(dim=1) * self.layout.scale[name]
        if self.weights is not None:
            coords = self.coordinates(block).to(self.dtype)
            out -= (coords * coords * self.weights).sum(dim=1)
        return out


class RepSimQuery:
    """RepSim with ``StackedQuery``'s interface: cosine of the queries' hidden states (nq, H) against a
    block whose ``dense`` holds the training rows' hidden states (nt, H)."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden

    def scores(self, block: TrainBlock) -> torch.Tensor:
        return repsim_scores(self.hidden, block.dense.to(self.hidden.dtype))

