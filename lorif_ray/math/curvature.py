"""Curvatures of one layer: what stands for H⁻¹ in I(t, q) = g_qᵀ H⁻¹ g_t, one class each.

Every curvature is fitted from the layer's Gram operator (``lorif_ray.math.rsvd.GramOperator``: GᵀG Q by
one pass over the rows, the D×D GᵀG, or EK-FAC's eigenvalues) and, for K-FAC and EK-FAC, the layer's token
statistics (``lorif_ray.math.kronecker.KroneckerStats``), saved as tensors plus a small info dict, and
scores in two terms that the batched scorer (``lorif_ray.math.scoring``) stacks across layers:

- term 1, ``scale · g_qᵀ g_t`` (through the factors when both sides have them), or ``precondition(g_q)ᵀ g_t``
  on dense rows when the curvature is a full matrix;
- term 2 (Woodbury only), ``Σ_j w_j g'_{q,j} g'_{t,j}`` with g' = V_rᵀ g, subtracted.

Every fact about a kind is asked of its class through the registry (``Curvature.of(kind)``,
``Curvature.registered()``; a subclass registers itself with ``class X(Curvature, kind="x")``): its fit keys,
what its score means, whether it needs rows, K-FAC statistics or neither, whether it truncates (has r), its
precision rule and its footprint (``row_request``, ``fit_numbers``, ``saved_numbers``). Nothing outside this
module branches on a kind's name; the kind strings live here and in the config presets. Per-layer scores come
from the batched scorer (``lorif_ray.math.scoring``); ``self_influence`` gives I(t, t) of one layer.

- ``NoCurvature`` ("none", RepSim): no per-layer curvature; the hidden states' cosine.

- ``Woodbury`` (LoRIF): H = V_r diag(σ²) V_rᵀ + λI from a randomized SVD, H⁻¹ = I/λ − V diag(w) Vᵀ,
  w_j = σ_j² / (λ(λ + σ_j²)).
- ``ExactInverse`` (LoGRA): (GᵀG + λI)⁻¹, D×D, from an eigendecomposition in float64.
- ``Identity`` (GradDot): H = I.
- ``KFAC``, ``EKFAC``: H = (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ + λI from the eigenbases of the projected
  statistics Ã, S̃ (``lorif_ray.math.kronecker``, which states the vec ordering and K-FAC's normalization);
  term 1 preconditions the query, M_q = Q_A [(Q_Aᵀ G̃_q Q_S) ⊘ (Λ + λ)] Q_Sᵀ, against dense or factor rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Generator, Optional

import torch

from lorif_ray.errors import LorifError
from lorif_ray.math.blocks import GradientBlock
from lorif_ray.math.influence import self_inner
from lorif_ray.math.kronecker import KroneckerStats, eigenbasis, kfac_eigenvalues, rotate, unrotate
from lorif_ray.math.rsvd import ROW_REQUESTS, GramOperatorLike, Request, eigh_spectrum, randomized_steps, run_steps


@dataclass(frozen=True)
class FitSettings:
    """How a curvature is fitted (the ``Config`` keys r, damping, damping_scale, oversample, svd_power_iters, seed).

    Attributes:
        rank: r, kept eigenpairs (Woodbury); capped at D.
        damping: λ, or None for ``damping_scale`` × the mean of the top r + p eigenvalues (Woodbury) or of
            all eigenvalues (ExactInverse, KFAC, EKFAC).
        damping_scale: that scale, or None for the curvature's own ``default_damping_scale``.
        dtype: dtype of the fitted tensors (the precision policy's math dtype).
        device: where the fit keeps its D×k iterate between passes.
        rows: N, the rows the curvature is fitted on (None: not known; ExactInverse then forms GᵀG).
    """

    rank: int = 64
    damping: float | None = None
    damping_scale: float | None = None
    oversample: int = 10
    power_iters: int = 3
    seed: int = 0
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"  # where the driver keeps Q (D, k) between passes
    rows: int | None = None


def woodbury_weights(values: torch.Tensor, damping: float) -> torch.Tensor:
    """w_j = σ_j² / (λ(λ + σ_j²)), so that (V diag(σ²) Vᵀ + λI)⁻¹ = I/λ − V diag(w) Vᵀ."""
    return values / (damping * (damping + values))


class Curvature:
    """Base class: the interface every curvature implements (see the module docstring), and the registry of
    the kinds (``of``, ``registered``): a subclass declared with ``kind="..."`` is registered under it.

    Capabilities (class attributes, asked by the stages, planner, sweeps and report instead of the kind):
        fit_keys: the ``Config`` keys that change the fitted curvature (recorded in its header; () = nothing
            is fitted, so no precision either).
        reads_rows: ``fit`` makes passes over the stored rows (a Gram backend).
        needs_stats: ``fit`` needs stage 1's K-FAC statistics of the layer.
        truncates: it keeps a rank-r low-rank term (``r`` matters; g'_t = V_rᵀ g_t can be stored).
        preconditions: term 1 is H⁻¹ g_q (a full matrix, ``scale`` None) rather than a scaled g_q.
        precision_sensitive: its score is a difference of terms up to σ₁²/λ times larger than itself, so
            16-bit products or g'_t lose the ranking (``lorif_ray.precision.warn_if_unsafe``).
        scores_gradients: it scores gradient rows (factors or dense); False for hidden states (RepSim).
        default_damping_scale: λ = scale × mean eigenvalue; None where there is no λ.
        score_meaning: what a score means (written into each query run's metadata).
        title: its name in tables and figures.
        saved_rule: what ``saved_numbers`` counts, in words ("" = nothing saved).
        holds: what a scorer holds of every layer when it ``preconditions`` (its tensors, in words).
    """

    kind: ClassVar[str]
    _registry: ClassVar[dict[str, type["Curvature"]]] = {}
    fit_keys: ClassVar[tuple[str, ...]] = ("damping", "damping_scale")
    reads_rows: ClassVar[bool] = True  # whether ``fit`` needs the Gram operator at all
    needs_stats: ClassVar[bool] = False  # whether ``steps`` asks for the layer's KroneckerStats ("stats")
    truncates: ClassVar[bool] = False
    preconditions: ClassVar[bool] = False
    precision_sensitive: ClassVar[bool] = False
    scores_gradients: ClassVar[bool] = True
    default_damping_scale: ClassVar[Optional[float]] = 0.1  # λ = scale × mean eigenvalue (paper App. A.2)
    score_meaning: ClassVar[str] = ""
    title: ClassVar[str] = ""
    saved_rule: ClassVar[str] = ""
    holds: ClassVar[str] = ""
    damping: float  # λ

    def __init_subclass__(cls, kind: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            if kind in Curvature._registry:
                raise ValueError(f"curvature kind {kind!r} is registered twice "
                                 f"({Curvature._registry[kind].__name__}, {cls.__name__})")
            cls.kind = kind
            Curvature._registry[kind] = cls

    @staticmethod
    def of(kind: str) -> type["Curvature"]:
        """The class of a curvature kind (``Config.curvature_kind``, a header's "kind")."""
        if kind not in Curvature._registry:
            raise ValueError(f"unknown curvature {kind!r}; choose one of {sorted(Curvature._registry)}")
        return Curvature._registry[kind]

    @staticmethod
    def registered() -> dict[str, type["Curvature"]]:
        """{kind: class} of every registered curvature, in declaration order."""
        return dict(Curvature._registry)

    # -- footprint (numbers, not bytes: the caller multiplies by the dtype it holds them in) -------
    @classmethod
    def row_request(cls, d1: int, d2: int, settings: "FitSettings") -> tuple[str, int]:
        """What ``steps`` asks of a layer's rows (D = d1·d2): ("apply", k) for a D×k iterate, ("gram", D) for
        the D×D GᵀG, ("eigen", D) for EK-FAC's d1×d2 eigenvalues, ("none", 0) without rows."""
        return ("none", 0)

    @classmethod
    def fit_numbers(cls, d1: int, d2: int, settings: "FitSettings") -> int:
        """Numbers the driver holds while fitting one layer (stage 2's layer groups are sized by it)."""
        return 0

    @classmethod
    def saved_numbers(cls, d1: int, d2: int, settings: "FitSettings") -> int:
        """Numbers saved for one layer (``tensors``), in the fit's dtype."""
        return 0

    @classmethod
    def damping_scale_for(cls, settings: "FitSettings") -> float:
        """The scale of the relative damping rule: the settings' or this curvature's default."""
        return cls.default_damping_scale if settings.damping_scale is None else settings.damping_scale

    # -- fitting and storage ---------------------------------------------------------------------
    @classmethod
    def steps(cls, dim: int, name: str, settings: FitSettings) -> Generator[Request, torch.Tensor, "Curvature"]:
        """Fitting as a generator of requests to the rows (``lorif_ray.math.rsvd.Request``), so that one
        pass over the rows serves every layer being fitted; returns the curvature of layer ``name``."""
        raise NotImplementedError

    @classmethod
    def row_passes(cls, dim: int, settings: FitSettings) -> int:
        """How many passes over the rows ``steps`` asks for (known before fitting, for the progress bar): one
        (GᵀG or EK-FAC's eigenvalues) when it reads rows, else none; Woodbury's randomized SVD more."""
        return int(cls.reads_rows)

    @classmethod
    def fit(cls, gram: GramOperatorLike | None, dim: int, name: str, settings: FitSettings,
            stats: KroneckerStats | None = None) -> "Curvature":
        """The curvature of layer ``name`` (D = ``dim``) from its Gram operator (and statistics, K-FAC/EK-FAC)."""
        return run_steps(cls.steps(dim, name, settings), gram, stats)

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


class Identity(Curvature, kind="identity"):
    """H = I: GradDot."""

    fit_keys = ()
    reads_rows = False
    score_meaning = "g_q^T g_t (no curvature); > 0: proponent; unscaled"
    title = "identity"
    damping = 0.0

    @classmethod
    def steps(cls, dim, name, settings):
        return cls()
        yield  # a generator that asks nothing of the rows

    @classmethod
    def from_saved(cls, tensors, info) -> "Identity":
        return cls()


@dataclass
class ExactInverse(Curvature, kind="exact"):
    """(GᵀG + λI)⁻¹: LoGRA, in one of two exact forms.

    With N rows known and N + p < D/2 (``thin``): G has rank ≤ N, so GᵀG = V diag(σ²) Vᵀ with V (D, N) and the
    inverse is exactly I/λ − V diag(w) Vᵀ (the Woodbury identity at full rank): one pass of GᵀG Q with a random
    D×(N+p) Q (no power iterations: its range is G's whole row space) gives V and σ², and nothing D×D is formed,
    stored or held by a scorer. Otherwise the D×D inverse, from the eigendecomposition of the formed GᵀG.

    Attributes:
        inverse: (D, D), or None in the thin form.
        values, vectors: (N,) σ² and (D, N) V of the thin form, else None.
    """

    damping: float
    inverse: torch.Tensor | None = None
    values: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    preconditions: ClassVar[bool] = True
    score_meaning: ClassVar[str] = ("I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (exact per-layer inverse); > 0: "
                                    "proponent; ~ rise of the query loss (nats) if t were left out")
    title: ClassVar[str] = "exact"
    saved_rule: ClassVar[str] = "the D×D inverse, or V (D×N) + N values when N + p < D/2"
    holds: ClassVar[str] = "(GᵀG + λI)⁻¹ (D×D, or D×N thin)"

    @staticmethod
    def thin(dim: int, settings: FitSettings) -> bool:
        """Whether the fit takes the thin form: N known and N + p < D/2 (its passes and SVD cost ~D·(N+p)² against
        the eigendecomposition's ~D³: the measured crossover is near N + p ≈ D/2, ``bench/exact_cpu.py``)."""
        return settings.rows is not None and 2 * (settings.rows + settings.oversample) < dim

    @classmethod
    def row_request(cls, d1, d2, settings):
        dim = d1 * d2
        return ("apply", settings.rows + settings.oversample) if cls.thin(dim, settings) else ("gram", dim)

    @classmethod
    def fit_numbers(cls, d1, d2, settings):
        dim = d1 * d2
        return 2 * dim * (settings.rows + settings.oversample) if cls.thin(dim, settings) else dim ** 2

    @classmethod
    def saved_numbers(cls, d1, d2, settings):
        dim = d1 * d2
        return dim * settings.rows + settings.rows if cls.thin(dim, settings) else dim ** 2

    @classmethod
    def steps(cls, dim, name, settings):
        if cls.thin(dim, settings):
            spectrum = yield from randomized_steps(dim, settings.rows, oversample=settings.oversample, power_iters=0,
                                                   seed=settings.seed, name=name, dtype=settings.dtype,
                                                   device=settings.device)
            trace = float(spectrum.values.double().sum())  # every nonzero eigenvalue: GᵀG has rank ≤ N
            damping = settings.damping or cls.damping_scale_for(settings) * trace / dim  # × mean eigenvalue
            _check_damping(damping, name)
            return cls(damping, values=spectrum.values.to(settings.dtype), vectors=spectrum.vectors.to(settings.dtype))
        matrix = (yield ("gram", torch.float64)).to(torch.float64)
        damping = settings.damping or cls.damping_scale_for(settings) * float(matrix.trace()) / dim  # × mean eigenvalue
        _check_damping(damping, name)
        values, vectors = torch.linalg.eigh(matrix)
        inverse = (vectors / (values.clamp_min(0) + damping)) @ vectors.T
        return cls(damping, inverse.to(settings.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        # the thin form's V is saved as "basis", not "vectors": a loader that skips V_r (stored g'_t) needs it
        return {"inverse": self.inverse} if self.inverse is not None else {"values": self.values, "basis": self.vectors}

    @classmethod
    def from_saved(cls, tensors, info) -> "ExactInverse":
        return cls(info["damping"], tensors.get("inverse"), tensors.get("values"), tensors.get("basis"))

    def to(self, device=None, dtype=None) -> "ExactInverse":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return ExactInverse(self.damping, move(self.inverse), move(self.values), move(self.vectors))

    @property
    def scale(self) -> None:
        return None

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        if self.inverse is not None:
            return g @ self.inverse.to(g.dtype)
        vectors = self.vectors.to(g.dtype)
        weights = woodbury_weights(self.values.to(g.dtype), self.damping)
        return g / self.damping - ((g @ vectors) * weights) @ vectors.T


@dataclass
class Woodbury(Curvature, kind="woodbury"):
    """Rank-r SVD of G plus damping, inverted by the Woodbury identity: LoRIF.

    Attributes:
        values: (r,) σ_j², descending.
        vectors: (D, r) V_r, or None where only λ and σ² were loaded (scoring against stored g'_t).
    """

    damping: float
    values: torch.Tensor
    vectors: torch.Tensor | None = None
    fit_keys: ClassVar[tuple[str, ...]] = ("r", "damping", "damping_scale", "oversample", "svd_power_iters", "seed")
    truncates: ClassVar[bool] = True
    precision_sensitive: ClassVar[bool] = True
    score_meaning: ClassVar[str] = ("I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (truncated SVD + Woodbury); > 0: "
                                    "proponent (training on t lowers the query loss); ~ rise of the query loss "
                                    "(nats) if t were left out")
    title: ClassVar[str] = "Woodbury"
    saved_rule: ClassVar[str] = "V_r (D×min(r, D)) + min(r, D) values"

    @staticmethod
    def _whole_spectrum(dim: int, settings: FitSettings) -> bool:
        """Whether r + p reaches D: the whole spectrum (one GᵀG pass) is then as cheap as a sketch of it."""
        return min(settings.rank, dim) + settings.oversample >= dim

    @classmethod
    def row_request(cls, d1, d2, settings):
        dim = d1 * d2
        return ("gram", dim) if cls._whole_spectrum(dim, settings) else ("apply", min(settings.rank, dim)
                                                                           + settings.oversample)

    @classmethod
    def fit_numbers(cls, d1, d2, settings):
        """Q and GᵀG Q (2·D·k), or D·D for the whole spectrum."""
        dim = d1 * d2
        k = min(settings.rank + settings.oversample, dim)
        return dim * dim if k >= dim else 2 * dim * k

    @classmethod
    def saved_numbers(cls, d1, d2, settings):
        rank = min(settings.rank, d1 * d2)
        return d1 * d2 * rank + rank

    @classmethod
    def row_passes(cls, dim, settings) -> int:
        return 1 if cls._whole_spectrum(dim, settings) else settings.power_iters + 1

    @classmethod
    def steps(cls, dim, name, settings):
        rank = min(settings.rank, dim)
        if cls._whole_spectrum(dim, settings):
            spectrum = eigh_spectrum((yield ("gram", torch.float64)), rank, settings.oversample)
        else:
            spectrum = yield from randomized_steps(dim, rank, oversample=settings.oversample,
                                                   power_iters=settings.power_iters, seed=settings.seed, name=name,
                                                   dtype=settings.dtype, device=settings.device)
        damping = settings.damping or spectrum.damping(cls.damping_scale_for(settings))
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


@dataclass
class Kronecker(Curvature):
    """H = (Q_A ⊗ Q_S) diag(vec Λ) (Q_A ⊗ Q_S)ᵀ + λI in the projected space (base of KFAC and EKFAC).

    Vec ordering and normalization: ``lorif_ray.math.kronecker``. Term 1 preconditions the query,
    M_q = Q_A [(Q_Aᵀ G̃_q Q_S) ⊘ (Λ + λ)] Q_Sᵀ, and scores ⟨M_q, G̃_t⟩ against dense rows or against factors
    (Σ_k u_kᵀ M_q v_k, through the rows vec(Σ_k u_k v_kᵀ)); I(t, t) = ‖(Q_Aᵀ G̃_t Q_S) ⊘ √(Λ + λ)‖².

    Attributes:
        damping: λ.
        basis_a: Q_A (d1, d1), eigenvectors of Ã = Σ_tokens x̃x̃ᵀ.
        basis_s: Q_S (d2, d2), eigenvectors of S̃ = Σ_tokens δ̃δ̃ᵀ.
        eigenvalues: Λ (d1, d2), the diagonal of H − λI in that basis (row-major like vec(G̃)).
    """

    damping: float
    basis_a: torch.Tensor
    basis_s: torch.Tensor
    eigenvalues: torch.Tensor
    needs_stats: ClassVar[bool] = True
    preconditions: ClassVar[bool] = True
    saved_rule: ClassVar[str] = "the bases Q_A (d1×d1), Q_S (d2×d2) and eigenvalues (d1×d2)"
    holds: ClassVar[str] = "bases Q_A, Q_S and eigenvalues"
    # λ = 1e-4 × mean Λ per layer, from the damping study of issue 14 (BENCHMARKS.md, "Kronecker curvatures";
    # facts setup, 24 queries): LDS rises from 0.1 to 1e-4 and is flat below; at 1e-4 K-FAC and EK-FAC are within
    # 0.003 of their best scale (paired) at LoGRA f=4, 8 and LoRIF f=4, 8 c=1, 4, while 0.1 (the paper's, kept
    # by woodbury and exact) loses 0.04-0.08 (e.g. LoRIF f=4 c=4 EK-FAC: 0.390 at 0.1, 0.465 at 1e-4).
    default_damping_scale: ClassVar[float] = 1e-4

    @classmethod
    def fit_numbers(cls, d1, d2, settings):
        """The bases and eigenvalues, twice while solving."""
        return 2 * (d1 * d1 + d2 * d2 + d1 * d2)

    @classmethod
    def saved_numbers(cls, d1, d2, settings):
        return d1 * d1 + d2 * d2 + d1 * d2

    @classmethod
    def steps(cls, dim, name, settings):
        stats = yield ("stats", name)
        if stats.d1 * stats.d2 != dim:
            raise ValueError(f"layer {name}: K-FAC statistics of (d1, d2) = {(stats.d1, stats.d2)} for D = {dim}")
        if stats.tokens <= 0:
            raise LorifError(f"layer {name}: its K-FAC statistics count no token; stage 1 accumulated none")
        basis_a, basis_s, eigenvalues = yield from cls._eigenvalues(stats, settings)
        damping = settings.damping or cls.damping_scale_for(settings) * float(eigenvalues.mean())
        _check_damping(damping, name)
        out = lambda t: t.to(device=settings.device, dtype=settings.dtype)  # noqa: E731
        return cls(damping, out(basis_a), out(basis_s), out(eigenvalues))

    @classmethod
    def _eigenvalues(cls, stats: KroneckerStats, settings: FitSettings):
        """Generator: (Q_A, Q_S, Λ) in float64."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis_a": self.basis_a, "basis_s": self.basis_s, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_saved(cls, tensors, info) -> "Kronecker":
        return cls(info["damping"], tensors["basis_a"], tensors["basis_s"], tensors["eigenvalues"])

    def to(self, device=None, dtype=None) -> "Kronecker":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return type(self)(self.damping, move(self.basis_a), move(self.basis_s), move(self.eigenvalues))

    @property
    def scale(self) -> None:
        return None

    def _bases(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.basis_a.to(dtype), self.basis_s.to(dtype)

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """Dense rows (n, D) → vec(M) (n, D), M = Q_A [(Q_Aᵀ G̃ Q_S) ⊘ (Λ + λ)] Q_Sᵀ."""
        basis_a, basis_s = self._bases(g.dtype)
        rotated = rotate(g, basis_a, basis_s) / (self.eigenvalues.to(g.dtype) + self.damping)
        return unrotate(rotated, basis_a, basis_s)

    def self_influence(self, block: GradientBlock) -> torch.Tensor:
        """‖(Q_Aᵀ G̃_t Q_S) ⊘ √(Λ + λ)‖² per example (n,), from factors (rotated per component) or dense rows."""
        dtype = (block.u if block.factored else block.g).dtype
        rotated = rotate(block, *self._bases(dtype))
        return (rotated.square() / (self.eigenvalues.to(dtype) + self.damping)).sum(dim=(1, 2))


class KFAC(Kronecker, kind="kfac"):
    """K-FAC: Λ = Λ_A Λ_Sᵀ / N_tok, from the statistics alone (no pass over the rows)."""

    reads_rows: ClassVar[bool] = False
    score_meaning: ClassVar[str] = ("I(t,q) = g_q^T (H_KFAC + lambda I)^-1 g_t, H_KFAC = (A (x) S) / tokens in the "
                                    "projected space; > 0: proponent; ~ rise of the query loss (nats) if t were "
                                    "left out")
    title: ClassVar[str] = "K-FAC"

    @classmethod
    def _eigenvalues(cls, stats, settings):
        return kfac_eigenvalues(stats)
        yield  # a generator that asks nothing of the rows


class EKFAC(Kronecker, kind="ekfac"):
    """EK-FAC: K-FAC's eigenbasis with Λ* = Σ_n (Q_Aᵀ G̃_n Q_S)², by one pass over the stored rows (exact
    diagonal of GᵀG in the basis when the rows are; from factors, exact when c ≥ the rank of each G̃_n)."""

    score_meaning: ClassVar[str] = ("I(t,q) = g_q^T (H_EKFAC + lambda I)^-1 g_t, K-FAC's eigenbasis with the stored "
                                    "gradients' eigenvalues; > 0: proponent; ~ rise of the query loss (nats) if t "
                                    "were left out")
    title: ClassVar[str] = "EK-FAC"

    @classmethod
    def row_request(cls, d1, d2, settings):
        return ("eigen", d1 * d2)

    @classmethod
    def _eigenvalues(cls, stats, settings):
        _, basis_a = eigenbasis(stats.activations)
        _, basis_s = eigenbasis(stats.gradients)
        bases = (basis_a.to(device=settings.device, dtype=settings.dtype),
                 basis_s.to(device=settings.device, dtype=settings.dtype))
        eigenvalues = (yield ("eigen", bases)).to(torch.float64)
        return bases[0].to(torch.float64), bases[1].to(torch.float64), eigenvalues


class NoCurvature(Curvature, kind="none"):
    """RepSim: hidden states, no per-layer curvature (nothing is fitted or saved)."""

    fit_keys = ()
    reads_rows = False
    scores_gradients = False
    default_damping_scale = None
    score_meaning = "cosine of last-layer last-token hidden states in [-1, 1]; similarity, not influence"
    damping = 0.0


def fit_layers(steps: dict[str, Generator], gram, stats: dict[str, KroneckerStats] | None = None
               ) -> dict[str, Curvature]:
    """Run the fitting generators of several layers (``Curvature.steps``) in lockstep: every round, one call
    ``gram(applies={layer: Q}, grams={layer: dtype})`` — one pass over the rows — answers all their requests
    (with ``eigens={layer: (Q_A, Q_S)}`` added only when some layer asks for EK-FAC's eigenvalues).
    A ("stats", layer) request is answered from ``stats`` {layer: KroneckerStats} without a pass. ``gram`` may
    be None when no generator asks anything of the rows (Identity, KFAC)."""
    results, requests = {}, {}

    def advance(name: str, value=None, first: bool = False) -> None:
        try:
            requests[name] = next(steps[name]) if first else steps[name].send(value)
        except StopIteration as done:
            results[name] = done.value
            requests.pop(name, None)
            return
        if requests[name][0] == "stats":
            if stats is None or name not in stats:
                raise ValueError(f"layer {name}: this curvature needs the layer's K-FAC statistics (stage 1's)")
            advance(name, stats[name])

    for name in steps:
        advance(name, first=True)
    while requests:
        unknown = {k for k, _ in requests.values()} - set(ROW_REQUESTS)
        if unknown:
            raise ValueError(f"unknown fitting requests {sorted(unknown)}")
        kinds = {kind: {n: a for n, (k, a) in requests.items() if k == kind} for kind in ROW_REQUESTS}
        extra = {"eigens": kinds["eigen"]} if kinds["eigen"] else {}
        out = gram(applies=kinds["apply"], grams=kinds["gram"], **extra)
        for name in list(requests):
            advance(name, out[name])
    return {name: results[name] for name in steps}


def _check_damping(damping: float, name: str) -> None:
    if not damping > 0:
        raise LorifError(f"layer {name}: every stored gradient is zero, so the damping rule gives λ = 0; "
                         "set damping explicitly or leave the layer out (model.layers)")
