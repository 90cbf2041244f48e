"""Rows of training examples as stages 2 and 3 read them: one layer's, a set of layers', and their sources.

- ``GradientBlock``: n examples' projected gradients at one layer, rank-c factors u (n, d1, c), v (n, d2, c)
  or dense rows g (n, D), D = d1·d2 (queries, and one layer's view of a ``TrainBlock``).
- ``RowLayout``: how the rows of a set of layers sit in a ``TrainBlock``: factor layers of equal (d1, d2, c)
  stacked along a leading layer axis, dense layers side by side, stored g'_t of the low-rank layers side by
  side. Built from the layers alone (stage 2) or with their curvature (stage 3's scorer, whose groups also
  split by how a layer is scored and which carries each layer's scale s_ℓ).
- ``TrainBlock``: consecutive rows of those layers in that layout, with their global row offset and ids.
- a *row source* (``RowSource``): a fresh iterator of ``TrainBlock``s per call of ``blocks()``, one pass over
  its rows, in row order. ``ResidentRows`` holds every row on a device (in the storage dtype, each block cast
  as it is handed out); the streamed source and the rule that picks one are in ``lorif_ray.stages.rows``.

The Gram pass (``lorif_ray.math.rsvd.GramPass``) and the batched scorer (``lorif_ray.math.scoring``) consume
row sources alike. Torch only; the store's column names are ``lorif_ray.store.schema``'s business.

Example:
    >>> layout = RowLayout.build(specs, "factors")                  # stage 2: grouped by shape
    >>> block = layout.train_block({"h.0": GradientBlock(u=u, v=v)})  # (L, n, c, d1) per group
    >>> layout.layer_blocks(block)["h.0"].dense().shape             # (n, d1·d2), formed from the factors
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol

import torch

CHUNK_BYTES = 512 * 2**20  # dense rows formed at a time from a resident block (block_rows · ΣD numbers)


def dense_from_factors(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vec(u vᵀ): (n, d1, c), (n, d2, c) → (n, d1·d2)."""
    return torch.einsum("nic,njc->nij", u, v).reshape(u.shape[0], -1)


@dataclass
class GradientBlock:
    """Projected gradients of n examples at one layer, as rank-c factors or dense rows.

    Attributes:
        u: (n, d1, c) left factors, or None.
        v: (n, d2, c) right factors, or None.
        g: (n, D) dense rows vec(G̃) (row-major, D = d1·d2), or None.
    """

    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    g: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        return self.u is not None

    def __len__(self) -> int:
        return (self.u if self.factored else self.g).shape[0]

    def dense(self) -> torch.Tensor:
        """(n, D) rows vec(u vᵀ), formed from the factors if needed."""
        if self.g is not None:
            return self.g
        return dense_from_factors(self.u, self.v)


@dataclass
class FactorGroup:
    """Layers whose factors have equal shape, stacked along a leading layer axis."""

    d1: int
    d2: int
    c: int
    names: list[str]
    preconditioned: bool = False  # scoring: term 1 is H⁻¹ g_q (curvatures without a scale) against vec(u vᵀ)


@dataclass
class CoordinateGroup:
    """Woodbury layers with equal (d1, d2, c, r): their g' are computed together and sit side by side."""

    dim: int
    rank: int
    names: list[str]


@dataclass
class TrainBlock:
    """Consecutive training rows of a set of layers, laid out by a ``RowLayout``.

    Attributes:
        factors: per FactorGroup, (U (L, n, c, d1), V (L, n, c, d2)) — c-major so that
            ``U.reshape(L, n·c, d1)`` is a view; None without factor layers.
        dense: (n, ΣD) dense rows of every dense layer side by side (layout order), or None; a "hidden"
            store's (n, H) hidden states.
        coordinates: (n, Σr) g'_t of every Woodbury layer (layout order), or None (computed on demand).
        offset: global index of the first row.
        ids: the rows' example ids, or None where the source does not keep them.
    """

    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    dense: torch.Tensor | None = None
    coordinates: torch.Tensor | None = None
    offset: int = 0
    ids: list[str] | None = None

    def __len__(self) -> int:
        if self.factors:
            return self.factors[0][0].shape[1]
        if self.dense is not None:
            return self.dense.shape[0]
        return self.coordinates.shape[0]

    def _map(self, fn) -> "TrainBlock":
        """The block with ``fn`` applied to every tensor it holds (offset and ids kept)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, factors=None if self.factors is None else [(fn(u), fn(v)) for u, v in self.factors],
                       dense=apply(self.dense), coordinates=apply(self.coordinates))

    def rows(self, start: int, stop: int) -> "TrainBlock":
        """Rows start … stop − 1 of this block as views (no copy), with their offset and ids."""
        factors = None if self.factors is None else [(u[:, start:stop], v[:, start:stop]) for u, v in self.factors]
        return TrainBlock(factors, None if self.dense is None else self.dense[start:stop],
                          None if self.coordinates is None else self.coordinates[start:stop], self.offset + start,
                          None if self.ids is None else self.ids[start:stop])

    def cast(self, dtype: torch.dtype) -> "TrainBlock":
        """The rows in ``dtype`` (the same tensors where they already are)."""
        return self._map(lambda t: t.to(dtype))

    def pin(self) -> "TrainBlock":
        """Page-locked copies, so host→device copies can run asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def nbytes(self) -> int:
        tensors = [t for pair in self.factors or [] for t in pair] + [self.dense, self.coordinates]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class RowLayout:
    """How the rows of a set of layers sit in a ``TrainBlock``.

    Attributes:
        names: every layer, in index order.
        factor_groups: factor layers of equal (d1, d2, c) (and, with a curvature, equal ``preconditioned``).
        dense_dims: {name: D} of the dense layers, in the order of the concatenated dense columns.
        coordinate_groups: layers with a low-rank term and equal (d1, d2, c, r); their g' columns follow
            this order (only with a curvature).
        scale: {name: s_ℓ} of the scorer's term 1 (1/λ for Woodbury, 1 for identity); layers without one are
            preconditioned (on factor stores against the rows vec(u vᵀ), in groups of their own).
    """

    names: list[str]
    factor_groups: list[FactorGroup] = field(default_factory=list)
    dense_dims: dict[str, int] = field(default_factory=dict)
    coordinate_groups: list[CoordinateGroup] = field(default_factory=list)
    scale: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, specs, kind: str, curvature: dict | None = None) -> "RowLayout":
        """The layout of a store's layers.

        Args:
            specs: objects with name, d1, d2, c (``LayerSpec``).
            kind: the store kind, "factors" or "dense".
            curvature: {name: Curvature} for the scorer (its scales, low-rank terms and how each layer is
                scored), or None: the rows alone (stage 2).
        """
        if kind not in ("factors", "dense"):
            raise ValueError(f"batched rows need a factors or dense store, not {kind!r}")
        layout = cls([s.name for s in specs])
        factor_groups: dict[tuple, FactorGroup] = {}
        coordinate_groups: dict[tuple, CoordinateGroup] = {}
        for s in specs:
            curv = None if curvature is None else curvature[s.name]
            if curv is not None and curv.low_rank is not None:
                key = (s.d1, s.d2, s.c, curv.rank)  # ⊆ a FactorGroup: its rows are reused
                group = coordinate_groups.setdefault(key, CoordinateGroup(s.d1 * s.d2, key[3], []))
                group.names.append(s.name)
            if curv is not None and curv.scale is not None:
                layout.scale[s.name] = curv.scale
            if kind == "factors":
                key = (s.d1, s.d2, s.c, curv is not None and curv.scale is None)
                factor_groups.setdefault(key, FactorGroup(s.d1, s.d2, s.c, [], key[3])).names.append(s.name)
            else:
                layout.dense_dims[s.name] = s.d1 * s.d2
        layout.factor_groups = list(factor_groups.values())
        layout.coordinate_groups = list(coordinate_groups.values())
        return layout

    @classmethod
    def of(cls, layers: dict[str, GradientBlock]) -> "RowLayout":
        """The layout (no curvature) of rows at hand, each layer factored or dense as it comes."""
        layout = cls(list(layers))
        groups: dict[tuple, FactorGroup] = {}
        for name, block in layers.items():
            if block.factored:
                (_, d1, c), d2 = block.u.shape, block.v.shape[1]
                groups.setdefault((d1, d2, c), FactorGroup(d1, d2, c, [])).names.append(name)
            else:
                layout.dense_dims[name] = block.g.shape[1]
        layout.factor_groups = list(groups.values())
        return layout

    @property
    def coordinate_names(self) -> list[str]:
        """Layers with a low-rank term, in the order of the concatenated g' columns."""
        return [n for g in self.coordinate_groups for n in g.names]

    @property
    def coordinate_width(self) -> int:
        return sum(g.rank * len(g.names) for g in self.coordinate_groups)

    @property
    def dense_width(self) -> int:
        """ΣD: the numbers of one row's dense rows vec(u vᵀ) (or g) of every layer."""
        return sum(g.d1 * g.d2 * len(g.names) for g in self.factor_groups) + sum(self.dense_dims.values())

    def train_block(self, layers: dict[str, GradientBlock], coordinates: dict[str, torch.Tensor] | None = None,
                    dtype=None, *, offset: int = 0, ids: list[str] | None = None) -> TrainBlock:
        """{layer: GradientBlock} (+ optional stored g' {layer: (n, r)}, kept in their dtype) → a TrainBlock
        whose rows are in ``dtype`` (None: as they come)."""
        factors = None
        if self.factor_groups:
            factors = []
            for g in self.factor_groups:
                u = torch.stack([layers[n].u for n in g.names]).to(dtype=dtype)  # (L, n, d1, c)
                v = torch.stack([layers[n].v for n in g.names]).to(dtype=dtype)
                factors.append((u.transpose(2, 3).contiguous(), v.transpose(2, 3).contiguous()))  # (L, n, c, d)
        dense = None
        if self.dense_dims:
            dense = torch.cat([layers[n].g for n in self.dense_dims], dim=1).to(dtype=dtype)
        coords = None
        if coordinates is not None:  # in their own dtype (precision.coordinates or wider), never the rows'
            coords = torch.cat([coordinates[n] for n in self.coordinate_names], dim=1)
        return TrainBlock(factors, dense, coords, offset, ids)

    def layer_blocks(self, block: TrainBlock) -> dict[str, GradientBlock]:
        """A TrainBlock back as {layer: GradientBlock} (views, no copy)."""
        out = {}
        for g, (u, v) in zip(self.factor_groups, block.factors or []):
            for i, name in enumerate(g.names):
                out[name] = GradientBlock(u=u[i].transpose(1, 2), v=v[i].transpose(1, 2))
        start = 0
        for name, dim in self.dense_dims.items():
            out[name] = GradientBlock(g=block.dense[:, start:start + dim])
            start += dim
        return out


class RowSource(Protocol):
    """The training rows of some layers: ``blocks()`` is a fresh pass over them, ``TrainBlock``s of consecutive
    rows in row order (global offsets from ``offset``), in ``layout``, on ``device``; ``passes`` counts the
    passes made. ``layout`` is None for a "hidden" store (blocks hold the hidden states as ``dense``)."""

    layout: RowLayout | None
    device: torch.device
    offset: int
    passes: int

    def blocks(self) -> Iterator[TrainBlock]: ...


def dense_chunk_rows(width: int, dtype: torch.dtype) -> int:
    """Rows per block whose dense rows, ``width`` = ΣD numbers each, take about ``CHUNK_BYTES`` in ``dtype``
    (64 … 4096)."""
    return max(64, min(4096, CHUNK_BYTES // (max(1, width) * (torch.finfo(dtype).bits // 8))))


class ResidentRows:
    """Every row of a row source held on one device as one ``TrainBlock`` (in the dtype it was stored in: a
    bfloat16 index takes half the memory of float32 rows); ``blocks`` hands out ``block_rows`` rows at a time,
    cast to ``dtype`` (the same values: the wider dtype holds every stored one; views where they are in it).

    Args:
        layout: the block's layout (None: a "hidden" store).
        block: the rows, with their global offset and ids.
        dtype: the dtype ``blocks`` delivers (None: as held).
        block_rows: rows per block (None: ``dense_chunk_rows``, what the Gram pass forms dense at a time).

    Example:
        >>> rows = ResidentRows(layout, layout.train_block(layers), dtype=torch.float64)
        >>> [len(b) for b in rows.blocks()]                           # one pass: block_rows rows at a time
    """

    def __init__(self, layout: RowLayout | None, block: TrainBlock, *, dtype: torch.dtype | None = None,
                 block_rows: int | None = None):
        self.layout, self.block, self.dtype = layout, block, dtype
        first = block.factors[0][0] if block.factors else block.dense if block.dense is not None else block.coordinates
        self.device, self.offset = first.device, block.offset
        width = layout.dense_width if layout is not None else block.dense.shape[1]
        self.block_rows = block_rows or dense_chunk_rows(width, dtype or first.dtype)
        self.passes = 0

    @property
    def ids(self) -> list[str] | None:
        return self.block.ids

    def __len__(self) -> int:
        return len(self.block)

    def blocks(self) -> Iterator[TrainBlock]:
        self.passes += 1
        for start in range(0, len(self.block), self.block_rows):
            block = self.block.rows(start, min(start + self.block_rows, len(self.block)))
            yield block if self.dtype is None else block.cast(self.dtype)

    def nbytes(self) -> int:
        return self.block.nbytes()
