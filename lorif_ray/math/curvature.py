"""Curvatures of one layer: what stands for H⁻¹ in I(t, q) = g_qᵀ H⁻¹ g_t, one class each.

Every curvature is fitted from the layer's Gram operator (``lorif_ray.math.rsvd.GramOperator``: GᵀG Q by
one pass over the rows, or the D×D GᵀG), saved as tensors plus a small info dict, and scores in two
terms that the batched scorer (``lorif_ray.math.scoring``) stacks across layers:

- term 1, ``scale · g_qᵀ g_t`` (through the factors when both sides have them), or ``precondition(g_q)ᵀ g_t``
  on dense rows when the curvature is a full matrix;
- term 2 (Woodbury only), ``Σ_j w_j g'_{q,j} g'_{t,j}`` with g' = V_rᵀ g, subtracted.

``prepare``/``score``/``self_influence`` give the same numbers for one layer on its own (per-layer
outputs, tests); nothing outside this module branches on the curvature's kind.

- ``Woodbury`` (LoRIF): H = V_r diag(σ²) V_rᵀ + λI from a randomized SVD, H⁻¹ = I/λ − V diag(w) Vᵀ,
  w_j = σ_j² / (λ(λ + σ_j²)).
- ``ExactInverse`` (LoGRA): (GᵀG + λI)⁻¹, D×D, from an eigendecomposition in float64.
- ``Identity`` (GradDot): H = I.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generator

import torch

from lorif_ray.errors import LorifError
from lorif_ray.math.influence import GradientBlock, inner, self_inner
from lorif_ray.math.rsvd import GramOperatorLike, Request, eigh_spectrum, randomized_steps, run_steps


@dataclass(frozen=True)
class FitSettings:
    """How a curvature is fitted (the ``Config`` keys r, damping, damping_scale, oversample, svd_power_iters, seed).

    Attributes:
        rank: r, kept eigenpairs (Woodbury); capped at D.
        damping: λ, or None for ``damping_scale`` × the mean of the top r + p eigenvalues (Woodbury) or of
            all eigenvalues (ExactInverse).
        dtype: dtype of the fitted tensors (the precision policy's math dtype).
        device: where the fit keeps its D×k iterate between passes.
    """

    rank: int = 64
    damping: float | None = None
    damping_scale: float = 0.1
    oversample: int = 10
    power_iters: int = 3
    seed: int = 0
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"  # where the driver keeps Q (D, k) between passes


def woodbury_weights(values: torch.Tensor, damping: float) -> torch.Tensor:
    """w_j = σ_j² / (λ(λ + σ_j²)), so that (V diag(σ²) Vᵀ + λI)⁻¹ = I/λ − V diag(w) Vᵀ."""
    return values / (damping * (damping + values))


@dataclass
class PreparedLayer:
    """One layer's query-side terms: ``query`` scaled by the term-1 scale (or ``dense`` preconditioned
    rows), and for Woodbury ``coordinates`` g'_q (nq, r) with the weights w (r,)."""

    query: GradientBlock
    dense: torch.Tensor | None = None
    coordinates: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class Curvature:
    """Base class: the interface every curvature implements (see the module docstring)."""

    kind: ClassVar[str]
    reads_rows: ClassVar[bool] = True  # whether ``fit`` needs the Gram operator at all
    damping: float  # λ

    # -- fitting and storage ---------------------------------------------------------------------
    @classmethod
    def steps(cls, dim: int, name: str, settings: FitSettings) -> Generator[Request, torch.Tensor, "Curvature"]:
        """Fitting as a generator of requests to the rows (``lorif_ray.math.rsvd.Request``), so that one
        pass over the rows serves every layer being fitted; returns the curvature of layer ``name``."""
        raise NotImplementedError

    @classmethod
    def fit(cls, gram: GramOperatorLike, dim: int, name: str, settings: FitSettings) -> "Curvature":
        """The curvature of layer ``name`` (D = ``dim``) from its Gram operator."""
        return run_steps(cls.steps(dim, name, settings), gram)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved: {field: tensor} (prefixed with the layer name by the saver)."""
        return {}

    def info(self) -> dict:
        """Small JSON facts saved in the file's header: kind, damping, rank."""
        return {"kind": self.kind, "damping": self.damping, "rank": self.rank}

    @property
    def rank(self) -> int:
        """r of the subtracted low-rank term (0 without one)."""
        return 0

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], info: dict) -> "Curvature":
        raise NotImplementedError

    def to(self, device=None, dtype=None) -> "Curvature":
        return self

    # -- scoring pieces (stacked across layers by the batched scorer) ----------------------------
    @property
    def scale(self) -> float | None:
        """s in term 1 = s · g_qᵀ g_t, or None where term 1 needs ``precondition`` (a full matrix)."""
        return 1.0

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """Dense query rows (n, D) → the rows that term 1 multiplies with g_t."""
        return g * self.scale

    @property
    def low_rank(self) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(V_r (D, r) or None when not loaded, w (r,)) of the subtracted term, or None without one."""
        return None

    # -- one layer on its own ---------------------------------------------------------------------
    def prepare(self, query: GradientBlock) -> PreparedLayer:
        if self.scale is None:
            return PreparedLayer(query, dense=self.precondition(query.dense()))
        low = self.low_rank
        if low is None:
            return PreparedLayer(query)
        vectors, weights = low
        return PreparedLayer(query, coordinates=query.dense() @ vectors, weights=weights)

    def score(self, prepared: PreparedLayer, train: GradientBlock) -> torch.Tensor:
        """I(t, q) of this layer: (nq, nt)."""
        if prepared.dense is not None:
            return prepared.dense @ train.dense().T
        scores = inner(prepared.query, train) * self.scale
        if prepared.coordinates is not None:
            scores = scores - (prepared.coordinates * prepared.weights) @ (train.dense() @ self.low_rank[0]).T
        return scores

    def self_influence(self, block: GradientBlock) -> torch.Tensor:
        """I(t, t) = g_tᵀ H⁻¹ g_t per example (n,)."""
        if self.scale is None:
            g = block.dense()
            return (self.precondition(g) * g).sum(dim=1)
        out = self_inner(block) * self.scale
        low = self.low_rank
        if low is not None:
            coordinates = block.dense() @ low[0]
            out = out - (coordinates * coordinates * low[1]).sum(dim=1)
        return out


class Identity(Curvature):
    """H = I: GradDot."""

    kind = "identity"
    reads_rows = False
    damping = 0.0

    @classmethod
    def steps(cls, dim, name, settings):
        return cls()
        yield  # a generator that asks nothing of the rows

    @classmethod
    def from_saved(cls, tensors, info) -> "Identity":
        return cls()


@dataclass
class ExactInverse(Curvature):
    """(GᵀG + λI)⁻¹ (D, D): LoGRA. Scores dense rows only."""

    damping: float
    inverse: torch.Tensor
    kind: ClassVar[str] = "exact"

    @classmethod
    def steps(cls, dim, name, settings):
        matrix = (yield ("gram", torch.float64)).to(torch.float64)
        damping = settings.damping or settings.damping_scale * float(matrix.trace()) / dim  # scale × mean eigenvalue
        _check_damping(damping, name)
        values, vectors = torch.linalg.eigh(matrix)
        inverse = (vectors / (values.clamp_min(0) + damping)) @ vectors.T
        return cls(damping, inverse.to(settings.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"inverse": self.inverse}

    @classmethod
    def from_saved(cls, tensors, info) -> "ExactInverse":
        return cls(info["damping"], tensors["inverse"])

    def to(self, device=None, dtype=None) -> "ExactInverse":
        return ExactInverse(self.damping, self.inverse.to(device=device, dtype=dtype))

    @property
    def scale(self) -> None:
        return None

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.inverse.to(g.dtype)


@dataclass
class Woodbury(Curvature):
    """Rank-r SVD of G plus damping, inverted by the Woodbury identity: LoRIF.

    Attributes:
        values: (r,) σ_j², descending.
        vectors: (D, r) V_r, or None where only λ and σ² were loaded (scoring against stored g'_t).
    """

    damping: float
    values: torch.Tensor
    vectors: torch.Tensor | None = None
    kind: ClassVar[str] = "woodbury"

    @classmethod
    def steps(cls, dim, name, settings):
        rank = min(settings.rank, dim)
        if rank + settings.oversample >= dim:  # the whole spectrum is as cheap as a sketch of it
            spectrum = eigh_spectrum((yield ("gram", torch.float64)), rank, settings.oversample)
        else:
            spectrum = yield from randomized_steps(dim, rank, oversample=settings.oversample,
                                                   power_iters=settings.power_iters, seed=settings.seed, name=name,
                                                   dtype=settings.dtype, device=settings.device)
        damping = settings.damping or spectrum.damping(settings.damping_scale)
        _check_damping(damping, name)
        return cls(damping, spectrum.values.to(settings.dtype), spectrum.vectors.to(settings.dtype))

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "vectors": self.vectors}

    @classmethod
    def from_saved(cls, tensors, info) -> "Woodbury":
        return cls(info["damping"], tensors["values"], tensors.get("vectors"))

    def to(self, device=None, dtype=None) -> "Woodbury":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Woodbury(self.damping, move(self.values), move(self.vectors))

    @property
    def scale(self) -> float:
        return 1.0 / self.damping

    @property
    def low_rank(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.vectors, woodbury_weights(self.values, self.damping)


def fit_layers(steps: dict[str, Generator], gram) -> dict[str, Curvature]:
    """Run the fitting generators of several layers (``Curvature.steps``) in lockstep: every round, one call
    ``gram(applies={layer: Q}, grams={layer: dtype})`` — one pass over the rows — answers all their
    requests. ``gram`` may be None when no generator asks for anything (Identity)."""
    results, requests = {}, {}

    def advance(name: str, value=None, first: bool = False) -> None:
        try:
            requests[name] = next(steps[name]) if first else steps[name].send(value)
        except StopIteration as done:
            results[name] = done.value
            requests.pop(name, None)

    for name in steps:
        advance(name, first=True)
    while requests:
        out = gram(applies={n: a for n, (k, a) in requests.items() if k == "apply"},
                   grams={n: a for n, (k, a) in requests.items() if k == "gram"})
        for name in list(requests):
            advance(name, out[name])
    return {name: results[name] for name in steps}


CURVATURES: dict[str, type[Curvature]] = {c.kind: c for c in (Woodbury, ExactInverse, Identity)}


def curvature_class(kind: str) -> type[Curvature]:
    if kind not in CURVATURES:
        raise ValueError(f"unknown curvature {kind!r}; choose one of {sorted(CURVATURES)}")
    return CURVATURES[kind]


def _check_damping(damping: float, name: str) -> None:
    if not damping > 0:
        raise LorifError(f"layer {name}: every stored gradient is zero, so the damping rule gives λ = 0; "
                         "set damping explicitly or leave the layer out (model.layers)")
