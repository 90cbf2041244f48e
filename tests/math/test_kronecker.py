"""K-FAC and EK-FAC in the projected space (lorif_ray.math.kronecker, KFAC/EKFAC in lorif_ray.math.curvature)
against explicit float64 matrices (tests/oracles.py).

Orientation: G̃ is d1×d2, g = vec(G̃) row-major, so vec(x̃ δ̃ᵀ) = kron(x̃, δ̃) and K-FAC is Ã ⊗ S̃ / N_tok.
"""

import pytest
import torch

from lorif_ray.math.blocks import GradientBlock, RowLayout
from lorif_ray.math.capture import dense_gradients
from lorif_ray.math.curvature import (EKFAC, KFAC, Curvature, ExactInverse, FitSettings, Woodbury,
                                      fit_layers)
from lorif_ray.math.factorize import factorize_dense, initial_block
from lorif_ray.math.kronecker import KroneckerStats, batch_stats, sum_stats
from lorif_ray.math.rsvd import GramOperator, GramPass, TensorRows
from lorif_ray.math.scoring import StackedQuery
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.store import load_tensors, save_tensors
from tests.math.layer_scores import layer_scores
from tests.oracles import (curvature_inverse, damped_inverse, eigenbasis_inverse, ekfac_eigenvalues,
                           kronecker_inverse, oracle_scores, spiked_rows)

D1, D2 = 5, 3


def _tokens(n: int, t: int, d1: int = D1, d2: int = D2, seed: int = 0):
    """Projected activations x̃ (n, T, d1) and output gradients δ̃ (n, T, d2) with spiked token covariances
    (condition numbers in the hundreds), and the attention mask (n, T): every third example ends in a
    padding position whose x̃ is not zero but whose δ̃ is."""
    x = spiked_rows(n * t, d1, spikes=2, seed=seed).reshape(n, t, d1)
    delta = spiked_rows(n * t, d2, spikes=2, spike_scale=10.0, seed=seed + 1).reshape(n, t, d2)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[::3, -1] = False
    delta[~mask] = 0
    return x, delta, mask


def _layer(n=40, t=6, d1=D1, d2=D2, seed=0):
    """(dense rows (n, D), exact rank-min(d1, d2) factors, statistics) of one layer."""
    x, delta, mask = _tokens(n, t, d1, d2, seed)
    grads = dense_gradients(x, delta)  # (n, d1, d2) = Σ_t x̃_t δ̃_tᵀ
    c = min(d1, d2)
    u, v = factorize_dense(grads, initial_block(seed, "layer", d2, c, torch.float64, "cpu"), iterations=2)
    return grads.reshape(n, -1), GradientBlock(u=u, v=v), batch_stats(x, delta, mask)


def _fit(cls, rows, stats, damping=None, batch_rows=7, **settings):
    gram = GramOperator(TensorRows(rows, batch_rows=batch_rows))
    return cls.fit(gram, stats.d1 * stats.d2, "layer", FitSettings(damping=damping, **settings), stats)


def test_statistics_are_sums_over_the_masked_tokens():
    x, delta, mask = _tokens(10, 4)
    stats = batch_stats(x, delta, mask)
    xs, ds = x[mask], delta[mask]
    assert torch.allclose(stats.activations, xs.T @ xs, rtol=1e-13) and torch.allclose(stats.gradients, ds.T @ ds)
    assert (stats.tokens, stats.examples) == (int(mask.sum()), 10)
    parts = sum_stats([batch_stats(x[:3], delta[:3], mask[:3]), batch_stats(x[3:], delta[3:], mask[3:])])
    assert torch.allclose(parts.activations, stats.activations, rtol=1e-13) and parts.tokens == stats.tokens
    one = batch_stats(x[0], delta[0], mask[0])  # (T, d) = one example
    assert one.examples == 1 and one.tokens == int(mask[0].sum())
    again = KroneckerStats.from_tensors(stats.tensors())
    assert torch.equal(again.activations, stats.activations) and (again.tokens, again.examples) == (stats.tokens, 10)
    assert (KroneckerStats.zeros(D1, D2) + stats).tokens == stats.tokens


def _grid_examples():
    """Examples of two tokens (plus one padding position) whose tokens form the complete grid {x̃_a} × {δ̃_b}
    twice, once with each sign of the second token's δ̃: the cross-token terms of GᵀG cancel, and the tokens
    are "independent" exactly — the case where K-FAC must equal GᵀG."""
    gen = torch.Generator().manual_seed(3)
    xs, ds = torch.randn(4, D1, generator=gen, dtype=torch.float64), torch.randn(3, D2, generator=gen,
                                                                                 dtype=torch.float64)
    pairs = [(a, b) for a in range(4) for b in range(3)]  # 12 grid tokens → 6 base examples of 2
    x, delta = [], []
    for k in range(0, len(pairs), 2):
        (a1, b1), (a2, b2) = pairs[k], pairs[k + 1]
        for sign in (1.0, -1.0):
            x.append(torch.stack([xs[a1], xs[a2], torch.randn(D1, generator=gen, dtype=torch.float64)]))
            delta.append(torch.stack([ds[b1], sign * ds[b2], torch.zeros(D2, dtype=torch.float64)]))
    mask = torch.tensor([[True, True, False]] * len(x))
    return torch.stack(x), torch.stack(delta), mask


def test_kfac_normalization_makes_it_equal_gtg_where_kfac_is_exact():
    """GᵀG = (Ã ⊗ S̃)/N_tok exactly on a token grid with cancelling cross terms (T = 2 tokens per example);
    N_examples/N_tok² (per-example rather than per-token expectation) is off there by T."""
    x, delta, mask = _grid_examples()
    rows = dense_gradients(x, delta).reshape(len(x), -1)
    stats = batch_stats(x, delta, mask)  # the padding position's x̃ ≠ 0 must not count
    assert (stats.tokens, stats.examples) == (24, 12)
    gram = rows.T @ rows
    kfac = torch.kron(stats.activations, stats.gradients) / stats.tokens
    assert (kfac - gram).norm() < 1e-12 * gram.norm()
    per_example = torch.kron(stats.activations, stats.gradients) * stats.examples / stats.tokens ** 2
    assert torch.allclose(per_example * 2, gram, rtol=1e-12)
    # so K-FAC, EK-FAC and the exact inverse of GᵀG + λI are one curvature here
    lam = 0.05 * float(gram.trace()) / gram.shape[0]
    inverses = [curvature_inverse(_fit(cls, rows, stats, damping=lam), rows.shape[1]) for cls in (KFAC, EKFAC)]
    exact = damped_inverse(gram, lam)
    for inverse in inverses:
        assert (inverse - exact).norm() < 1e-10 * exact.norm()


def test_kfac_preconditioning_equals_the_explicit_inverses():
    """precondition(g) = g H⁻¹ with H⁻¹ formed (a) in the eigenbasis, Q diag(Λ_A Λ_Sᵀ/N_tok + λ)⁻¹ Qᵀ with
    Q = Q_A ⊗ Q_S from the test's own eigendecompositions, and (b) as ((Ã ⊗ S̃)/N_tok + λI)⁻¹ by torch.kron."""
    _, _, stats = _layer()
    lam = 0.3
    kfac = KFAC.fit(None, D1 * D2, "layer", FitSettings(damping=lam), stats)  # asks nothing of the rows
    values_a, basis_a = torch.linalg.eigh(stats.activations)
    values_s, basis_s = torch.linalg.eigh(stats.gradients)
    by_eigenbasis = eigenbasis_inverse(basis_a, basis_s, torch.outer(values_a, values_s) / stats.tokens, lam)
    by_kron = kronecker_inverse(stats.activations, stats.gradients, stats.tokens, lam)
    assert (by_eigenbasis - by_kron).norm() < 1e-11 * by_kron.norm()
    g = spiked_rows(9, D1 * D2, seed=4)
    got = kfac.precondition(g)
    assert (got - g @ by_kron).norm() < 1e-11 * (g @ by_kron).norm()
    assert (kfac.precondition(torch.eye(D1 * D2, dtype=torch.float64)) - by_eigenbasis).norm() < 1e-11 * by_kron.norm()
    # one token's gradient x̃ δ̃ᵀ is kron(x̃, δ̃) in this vec ordering
    xt, dt = g[0, :D1], g[1, :D2]
    assert torch.equal(GradientBlock(u=xt[None, :, None], v=dt[None, :, None]).dense()[0], torch.kron(xt, dt))


def test_ekfac_from_exact_rows_equals_the_explicit_formula():
    """Λ* = diag(Qᵀ GᵀG Q) (the definition, with Q = Q_A ⊗ Q_S formed) from one streamed pass over dense rows and
    over exact factor rows; Q_A, Q_S diagonalize Ã, S̃; H⁻¹ = (Q diag(Λ*) Qᵀ + λI)⁻¹."""
    rows, factors, stats = _layer()
    ekfac = _fit(EKFAC, rows, stats, damping=0.2)
    basis_a, basis_s = ekfac.basis_a, ekfac.basis_s
    for basis, matrix in ((basis_a, stats.activations), (basis_s, stats.gradients)):
        rotated = basis.T @ matrix @ basis
        assert (rotated - torch.diag(rotated.diagonal())).norm() < 1e-12 * matrix.norm()
    expected = ekfac_eigenvalues(rows, basis_a, basis_s)
    assert (ekfac.eigenvalues - expected).norm() < 1e-12 * expected.norm()
    from_factors = _fit(EKFAC, factors, stats, damping=0.2)
    assert (from_factors.eigenvalues - expected).norm() < 1e-11 * expected.norm()
    inverse = eigenbasis_inverse(basis_a, basis_s, expected, 0.2)
    assert (curvature_inverse(ekfac, rows.shape[1]) - inverse).norm() < 1e-10 * inverse.norm()


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_factor_and_dense_rows_give_the_same_scores_and_self_influence(cls):
    """c = min(d1, d2): the factors are exact, so scores ⟨M_q, G̃_t⟩ = Σ_k u_kᵀ M_q v_k and I(t, t) from factors
    equal those from dense rows, and both equal g_q H⁻¹ g_t with H⁻¹ explicit."""
    rows, factors, stats = _layer()
    assert (factors.dense() - rows).norm() < 1e-12 * rows.norm()
    curvature = _fit(cls, rows, stats)  # the default damping rule
    inverse = curvature_inverse(curvature, rows.shape[1])
    queries, train = slice(0, 6), slice(6, None)
    q_dense, q_factors = GradientBlock(g=rows[queries]), GradientBlock(u=factors.u[queries], v=factors.v[queries])
    t_dense, t_factors = GradientBlock(g=rows[train]), GradientBlock(u=factors.u[train], v=factors.v[train])
    expected = oracle_scores({"l": rows[queries]}, {"l": rows[train]}, {"l": inverse})
    for query, block in ((q_dense, t_dense), (q_factors, t_factors)):  # a dense store, a factor store
        got = layer_scores(curvature, query, block)
        assert (got - expected).norm() < 1e-10 * expected.norm()
    diagonal = ((rows @ inverse) * rows).sum(dim=1)
    for block in (GradientBlock(g=rows), factors):
        assert torch.allclose(curvature.self_influence(block), diagonal, rtol=1e-10)


def test_the_fit_through_one_gram_pass_equals_the_direct_computation():
    """fit_layers over a GramPass of several layers (EK-FAC, K-FAC and Woodbury together; one layer's rows as
    factors): stats answered without a pass, one pass answers every layer's requests, and each layer equals its
    own fit."""
    (rows_a, _, stats_a), (_, factors_b, stats_b) = _layer(seed=0), _layer(d1=4, d2=6, seed=5)
    rows_w = spiked_rows(40, 12, seed=9)
    source = TensorRows({"a": rows_a, "b": factors_b, "w": rows_w}, batch_rows=9)
    calls = []

    class Counting(GramPass):
        def __call__(self, *args, **kwargs):
            calls.append(sorted(k for k, v in kwargs.items() if v))
            return super().__call__(*args, **kwargs)

    settings = FitSettings(rank=3, oversample=2, power_iters=1)
    steps = {"a": EKFAC.steps(D1 * D2, "a", settings), "b": KFAC.steps(24, "b", settings),
             "w": Woodbury.steps(12, "w", settings)}
    fitted = fit_layers(steps, Counting(source), stats={"a": stats_a, "b": stats_b})
    assert calls == [["applies", "eigens"], ["applies"]]  # EK-FAC rides on Woodbury's first pass
    direct_a = _fit(EKFAC, rows_a, stats_a)
    assert (fitted["a"].eigenvalues - direct_a.eigenvalues).norm() < 1e-12 * direct_a.eigenvalues.norm()
    assert fitted["a"].damping == pytest.approx(direct_a.damping, rel=1e-12)
    direct_b = KFAC.fit(None, 24, "b", settings, stats_b)
    assert torch.equal(fitted["b"].eigenvalues, direct_b.eigenvalues)
    direct_w = Woodbury.fit(GramOperator(TensorRows(rows_w)), 12, "w", settings)
    assert torch.allclose(fitted["w"].values, direct_w.values, rtol=1e-12)
    with pytest.raises(ValueError, match="statistics"):
        fit_layers({"a": EKFAC.steps(D1 * D2, "a", settings)}, GramPass(source))


def test_damping_is_relative_to_the_layers_mean_eigenvalue():
    rows, _, stats = _layer()
    base = _fit(KFAC, rows, stats)
    assert base.damping == pytest.approx(KFAC.default_damping_scale * float(base.eigenvalues.mean()), rel=1e-12)
    scaled = _fit(EKFAC, rows, stats, damping_scale=1e-3)
    assert scaled.damping == pytest.approx(1e-3 * float(scaled.eigenvalues.mean()), rel=1e-12)
    assert _fit(EKFAC, rows, stats, damping=0.7, damping_scale=1e-3).damping == 0.7
    # the other curvatures keep their rule: None means their own default, 0.1
    assert ExactInverse.damping_scale_for(FitSettings()) == Woodbury.damping_scale_for(FitSettings()) == 0.1


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_saved_state_round_trips(cls, tmp_path):
    """tensors()/info() through a safetensors file (as stage 2 saves every curvature) and from_saved/to."""
    rows, factors, stats = _layer()
    fitted = _fit(cls, rows, stats)
    save_tensors(tmp_path / "layer.safetensors", fitted.tensors(), {"info": fitted.info()})
    tensors, meta = load_tensors(tmp_path / "layer.safetensors")
    again = Curvature.of(cls.kind).from_saved(tensors, meta["info"])
    assert all(torch.equal(tensors[k], t) for k, t in fitted.tensors().items())
    assert again.info() == fitted.info() and set(fitted.tensors()) == {"basis_a", "basis_s", "eigenvalues"}
    assert Curvature.registered()[cls.kind] is cls and again.scale is None and again.low_rank is None
    query = GradientBlock(u=factors.u[:3], v=factors.v[:3])
    assert torch.equal(layer_scores(again, query, factors), layer_scores(fitted, query, factors))
    single = again.to(dtype=torch.float32)
    assert single.eigenvalues.dtype == torch.float32 and type(single) is cls
    got = layer_scores(single, GradientBlock(g=rows[:3].float()), GradientBlock(g=rows.float()))
    expected = layer_scores(fitted, GradientBlock(g=rows[:3]), GradientBlock(g=rows))
    assert (got.double() - expected).norm() < 1e-4 * expected.norm()


SHAPES = [("a", 5, 3), ("b", 5, 3), ("c", 4, 6)]


@pytest.mark.parametrize("kind", ["factors", "dense"])
@pytest.mark.parametrize("normalize", [False, True])
def test_stacked_query_scores_kronecker_layers(kind, normalize):
    """The batched scorer with K-FAC/EK-FAC layers next to a Woodbury one, on a factor store (preconditioned
    query against the rows vec(u vᵀ)) and a dense store, equals the explicit oracle."""
    specs, train, query, curvature, dense_train, dense_query = [], {}, {}, {}, {}, {}
    kinds = {"a": EKFAC, "b": KFAC, "c": Woodbury}
    for i, (name, d1, d2) in enumerate(SHAPES):
        rows, factors, stats = _layer(n=30, d1=d1, d2=d2, seed=10 * i)
        c = min(d1, d2)
        specs.append(LayerSpec(name, 0, 0, d1, d2, c if kind == "factors" else 0))
        settings = FitSettings(rank=7, oversample=d1 * d2)
        source = GramOperator(TensorRows(rows))
        curvature[name] = kinds[name].fit(source, d1 * d2, name, settings, stats)
        dense_train[name], dense_query[name] = rows[5:], rows[:5]
        if kind == "factors":
            train[name] = GradientBlock(u=factors.u[5:], v=factors.v[5:])
            query[name] = GradientBlock(u=factors.u[:5], v=factors.v[:5])
        else:
            train[name], query[name] = GradientBlock(g=rows[5:]), GradientBlock(g=rows[:5])
    inverses = {s.name: curvature_inverse(curvature[s.name], s.dim) for s in specs}
    expected = oracle_scores(dense_query, dense_train, inverses, normalize)
    layout = RowLayout.build(specs, kind, curvature)
    stacked = StackedQuery(layout, {s.name: query[s.name] for s in specs}, curvature, normalize=normalize,
                           route="recompute")
    block = layout.train_block(train)
    assert (stacked.scores(block) - expected).norm() < 1e-10 * expected.norm()
    self_t = sum(((dense_train[n] @ inverses[n]) * dense_train[n]).sum(dim=1) for n in inverses)
    assert torch.allclose(stacked.train_self_influence(block), self_t, rtol=1e-10)
    if not normalize:  # each layer's slice is that layer's oracle score
        per_layer = stacked.scores(block, per_layer=True)
        for i, name in enumerate(layout.names):
            alone = oracle_scores({name: dense_query[name]}, {name: dense_train[name]}, {name: inverses[name]})
            assert torch.allclose(per_layer[i], alone, rtol=1e-10, atol=1e-10)
