"""Randomized truncated SVD of G (N×D) from streamed rows, never materializing G.

Everything needs only sums over rows, ``GᵀG Q = Σ_blocks G_bᵀ (G_b Q)`` (D×k): one ``GramPass``
does that loop (and the other sums a curvature asks for: GᵀG, EK-FAC's eigenvalues, G V), for several
layers at once, over any *row source* (``lorif_ray.math.blocks.RowSource``: ``TrainBlock``s streamed from
Parquet, resident on a device, or a Ray worker's shard group, whose partial sums the driver adds), so the
same code runs everywhere and a streamed index is read once per pass for all the layers being fitted.
Dense rows vec(u vᵀ) of factor blocks are formed block by block, one layer at a time (G is never
materialized); EK-FAC's eigenvalues use the factors directly.

``randomized_spectrum`` is randomized subspace iteration (Halko et al. 2011, Alg. 4.4) with
k = r + p columns: q passes Q ← orth(GᵀG Q), then one last pass Z = GᵀG Q. The last pass already holds
G's range sketch Y = G Q implicitly: YᵀY = QᵀZ and GᵀY = Z, so B = R⁻ᵀ Zᵀ (R the Cholesky factor of
YᵀY) is the k×D matrix QYᵀG of the randomized SVD, and its right singular vectors span
(GᵀG)^{q+1}Ω — one power more than a Rayleigh–Ritz step on span(Q), with no extra pass. When
k ≥ D the D×D Gram matrix is formed and decomposed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Protocol

import torch

from lorif_ray.math.blocks import GradientBlock, ResidentRows, RowLayout, RowSource
from lorif_ray.math.kronecker import eigenvalue_sums
from lorif_ray.math.projection import gaussian


class GramOperatorLike(Protocol):
    """What fitting one layer needs: Q (D, k) ↦ GᵀG Q (one pass), the D×D GᵀG (one pass), a device."""

    device: torch.device

    def __call__(self, q: torch.Tensor) -> torch.Tensor: ...

    def gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor: ...

    def eigen(self, bases: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...


class TensorRows(ResidentRows):
    """The resident rows of tensors already in memory (tests, benchmarks).

    Args:
        rows: (N, D) of one layer, or {layer: (N, D_layer)}; a layer's rows may be a ``GradientBlock``
            (factors, kept as factors: passes that can use them do).
        batch_rows: rows per block.
    """

    def __init__(self, rows: torch.Tensor | GradientBlock | dict[str, torch.Tensor | GradientBlock],
                 batch_rows: int = 4096):
        rows = rows if isinstance(rows, dict) else {"": rows}
        layers = {n: r if isinstance(r, GradientBlock) else GradientBlock(g=r) for n, r in rows.items()}
        layout = RowLayout.of(layers)
        super().__init__(layout, layout.train_block(layers), block_rows=batch_rows)


class GramPass:
    """One pass over the rows of several layers gives each its GᵀG Q, GᵀG, EK-FAC eigenvalues or G V: the only
    loop over rows.

    Args:
        rows: the layers' ``RowSource``.
        matmul_dtype: dtype of the GEMMs' inputs for GᵀG Q (e.g. bfloat16 on a GPU; None = Q's dtype);
            results accumulate in Q's dtype.

    Attributes:
        on_rows: called with each block's row count as a pass goes (a progress bar's ``update``), or None.

    Example:
        >>> gram = GramPass(TensorRows({"a": ga, "b": gb}))
        >>> out = gram(applies={"a": qa}, grams={"b": torch.float64})   # one pass: GaᵀGa qa and GbᵀGb
    """

    def __init__(self, rows: RowSource, matmul_dtype: torch.dtype | None = None):
        self.rows, self.matmul_dtype = rows, matmul_dtype
        self.device = rows.device
        self.on_rows: Callable[[int], None] | None = None

    def __call__(self, applies: dict[str, torch.Tensor] | None = None,
                 grams: dict[str, torch.dtype] | None = None,
                 eigens: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """{layer: GᵀG Q (D, k)} for ``applies`` {layer: Q}, {layer: GᵀG (D, D)} for ``grams`` {layer: dtype}
        and {layer: Λ* (d1, d2) = Σ_n (Q_Aᵀ G̃_n Q_S)², float64} for ``eigens`` {layer: (Q_A, Q_S)} (EK-FAC;
        rotated in the bases' dtype, from factors where the block has them), by one pass."""
        applies, grams, eigens = applies or {}, grams or {}, eigens or {}
        queries = {n: q.to(device=self.device, dtype=self.matmul_dtype or q.dtype) for n, q in applies.items()}
        bases = {n: (a.to(self.device), s.to(self.device)) for n, (a, s) in eigens.items()}
        out = {n: torch.zeros(q.shape, dtype=q.dtype, device=self.device) for n, q in applies.items()}
        out.update({n: None for n in grams})
        out.update({n: torch.zeros(a.shape[0], s.shape[0], dtype=torch.float64, device=self.device)
                    for n, (a, s) in bases.items()})
        for block in self.rows.blocks():
            layers = self.rows.layout.layer_blocks(block)
            for name, q in queries.items():
                rows = layers[name].dense().to(q.dtype)
                out[name] += (rows.T @ (rows @ q)).to(out[name].dtype)
            for name, dtype in grams.items():
                rows = layers[name].dense().to(dtype)
                part = rows.T @ rows
                out[name] = part if out[name] is None else out[name].add_(part)
            for name, (basis_a, basis_s) in bases.items():
                out[name] += eigenvalue_sums(layers[name], basis_a, basis_s)
            if self.on_rows is not None:
                self.on_rows(len(block))
        missing = [n for n in grams if out[n] is None]
        if missing:
            raise ValueError(f"the row source yielded no rows for {missing}")
        return out

    def project(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: G V (N, r)} in V's dtype, by one pass."""
        vectors = {n: v.to(self.device) for n, v in vectors.items()}
        parts: dict[str, list] = {n: [] for n in vectors}
        for block in self.rows.blocks():
            layers = self.rows.layout.layer_blocks(block)
            for name, v in vectors.items():
                parts[name].append(layers[name].dense().to(v.dtype) @ v)
            if self.on_rows is not None:
                self.on_rows(len(block))
        return {n: torch.cat(p) for n, p in parts.items()}


class GramOperator:
    """One layer of a ``GramPass``: Q ↦ GᵀG Q, GᵀG, EK-FAC eigenvalues and G V, one pass each (what ``randomized_spectrum``
    and ``Curvature.fit`` call for a single layer).

    Example:
        >>> op = GramOperator(TensorRows(g))
        >>> torch.allclose(op(q), g.T @ (g @ q))
        True
    """

    def __init__(self, rows: RowSource | GramPass, name: str | None = None, matmul_dtype: torch.dtype | None = None):
        self.gram_pass = rows if isinstance(rows, GramPass) else GramPass(rows, matmul_dtype)
        self.name = self.gram_pass.rows.layout.names[0] if name is None else name
        self.device = self.gram_pass.device

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.gram_pass(applies={self.name: q})[self.name]

    def gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """GᵀG (D, D)."""
        return self.gram_pass(grams={self.name: dtype})[self.name]

    def eigen(self, bases: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Σ_n (Q_Aᵀ G̃_n Q_S)² (d1, d2) for bases (Q_A, Q_S), in float64."""
        return self.gram_pass(eigens={self.name: bases})[self.name]

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """G V (N, r) in V's dtype."""
        return self.gram_pass.project({self.name: vectors})[self.name]


Request = tuple
"""What a fitting step asks for, as (kind, argument). Of the rows (one pass answers every layer's):
("apply", Q (D, k)) for GᵀG Q, ("gram", dtype) for GᵀG, ("eigen", (Q_A, Q_S)) for EK-FAC's Σ_n (Q_Aᵀ G̃_n Q_S)².
Of the caller, no pass: ("stats", layer) for the layer's ``KroneckerStats`` (accumulated by stage 1)."""

ROW_REQUESTS = ("apply", "gram", "eigen")


def run_steps(steps: Generator[Request, object, object], gram: GramOperatorLike | None, stats=None):
    """Drive a fitting generator (``randomized_steps``, ``Curvature.steps``) against one layer's operator;
    ``stats`` (the layer's ``KroneckerStats``) answers a ("stats", layer) request."""
    try:
        request = next(steps)
        while True:
            kind, argument = request
            if kind == "stats":
                if stats is None:
                    raise ValueError(f"layer {argument!r}: this curvature needs the layer's K-FAC statistics")
                answer = stats
            elif kind == "apply":
                answer = gram(argument)
            else:
                answer = getattr(gram, kind)(argument)  # gram.gram(dtype), gram.eigen(bases)
            request = steps.send(answer)
    except StopIteration as done:
        return done.value


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


def _cholesky_step(y: torch.Tensor, gram: torch.Tensor | None = None, shift: float = 0.0) -> torch.Tensor | None:
    """Y R⁻¹ with R the Cholesky factor of YᵀY + shift·I (``gram``: YᵀY if already formed): one Gram matmul and
    one triangular solve; None when the factorization fails (not numerically positive definite)."""
    gram = y.T @ y if gram is None else gram.clone()
    if shift:
        gram.diagonal().add_(shift)
    r, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(r).all()):
        return None
    return torch.linalg.solve_triangular(r, y, upper=True, left=False)


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """Q (D, k) with orthonormal columns spanning y (D, k), in y's dtype; Q[:, :j] spans y[:, :j] for every j.

    CholeskyQR2 (Yamamoto et al. 2015) in float64 whatever y's dtype: two passes of Q ← Y R⁻¹ with R the
    Cholesky factor of YᵀY, i.e. two Gram matmuls and two triangular solves, bound by matmuls, where Householder
    QR is a chain of thin panel updates that runs far below the matmul rate (and collapses when threads
    outnumber cores). The power passes' Z = GᵀG Q have κ ≈ σ₁²/σ_k², far beyond float32's u^-1/2 on spiked
    spectra, hence float64. While YᵀY is still not numerically positive definite (κ(Y) beyond ~1e8), a pass is
    shifted by s = 11 (Dk + k(k+1)) u ‖Y‖₂² (shifted CholeskyQR3, Fukaya et al. 2020), at most
    ``SHIFTED_PASSES`` times. If Y is rank-deficient to working precision (or the result is not orthonormal to
    64·k·u), Householder QR. The span is Householder's; the basis may differ by a sign per column, which
    subspace iteration and ``spectrum_from_last_pass`` never see.
    """
    dim, k = y.shape
    if k == 0 or dim < k:
        return torch.linalg.qr(y, mode="reduced").Q
    eps = torch.finfo(torch.float64).eps
    q = y.to(torch.float64)
    for _ in range(SHIFTED_PASSES + 1):
        gram = q.T @ q
        step = _cholesky_step(q, gram)
        if step is not None or not bool(torch.isfinite(gram).all()):
            break
        top = float(torch.linalg.eigvalsh(gram)[-1])
        q = _cholesky_step(q, gram, 11 * (dim * k + k * (k + 1)) * eps * top) if top > 0 else None
        if q is None:
            break
    else:
        step = None
    q = _cholesky_step(step) if step is not None else None
    if q is not None:
        error = (q.T @ q - torch.eye(k, dtype=q.dtype, device=q.device)).abs().max()
        if bool(torch.isfinite(error)) and float(error) <= 64 * k * eps:
            return q.to(y.dtype)
    return torch.linalg.qr(y, mode="reduced").Q


SHIFTED_PASSES = 3
"""Shifted passes ``orthonormal_columns`` tries before Householder QR (each divides κ by about 1e5 at D·k ~ 1e6)."""


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
    found = values.numel()
    if found == q.shape[1]:
        return _top(values, vectors, rank)
    # the dropped directions carry (numerically) zero eigenvalues; vectors are completed up to the rank kept only
    need = max(0, min(rank, q.shape[1]) - found)
    if need:  # orthonormal directions beyond span(V): rank-deficient by construction, so Householder
        vectors = torch.cat([vectors, torch.linalg.qr(torch.cat([vectors, q], dim=1)).Q[:, found:found + need]], dim=1)
    values = torch.cat([values.clamp_min(0), values.new_zeros(q.shape[1] - found)])  # descending (B's SVD)
    return Spectrum(vectors[:, :rank].contiguous(), values[:rank].contiguous(), values[rank:].contiguous())


def randomized_steps(dim: int, rank: int, *, oversample: int = 10, power_iters: int = 3, seed: int = 0,
                     name: str = "", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                     ) -> Generator[Request, torch.Tensor, Spectrum]:
    """Randomized subspace iteration as a generator: yields ("apply", Q) ``power_iters + 1`` times (one pass
    over G each), receives GᵀG Q, returns the ``Spectrum`` — so the passes of many layers can share one read
    of the rows. Arguments as ``randomized_spectrum``."""
    k = min(rank + oversample, dim)
    q = orthonormal_columns(gaussian(seed, (dim, k), name, "rsvd").to(device=device, dtype=dtype))
    for _ in range(power_iters):
        q = orthonormal_columns((yield ("apply", q)).to(device=device, dtype=dtype))
    spectrum = spectrum_from_last_pass(q, (yield ("apply", q)).to(device), rank)
    spectrum.vectors = spectrum.vectors.to(device=device, dtype=dtype)
    return spectrum


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
    steps = randomized_steps(dim, rank, oversample=oversample, power_iters=power_iters, seed=seed, name=name,
                             dtype=dtype, device=device)
    try:
        request = next(steps)
        while True:
            request = steps.send(gram_apply(request[1]))
    except StopIteration as done:
        return done.value
