"""The batched scorer (lorif_ray.math.scoring) against the per-layer Scorer, in float64."""

from types import SimpleNamespace

import pytest
import torch

from lorif_ray.math.influence import GradientBlock, LayerCurvature, exact_inverse
from lorif_ray.math.rsvd import eigh_spectrum
from lorif_ray.math.scoring import ScoreLayout, StackedQuery, score_in_chunks
from lorif_ray.stages.featurize import LayerSpec, blocks_from_columns
from lorif_ray.stages.query import Scorer, TopK

GEN = torch.Generator().manual_seed(0)
# two layers of one shape, one of another, one whose D equals the first's with swapped (d1, d2)
SHAPES = [("a", 6, 4), ("b", 6, 4), ("c", 3, 5), ("d", 4, 6)]


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def _setup(kind, method, c=2, n=37, nq=5, r=7):
    specs = [LayerSpec(name, 0, 0, d1, d2, min(c, d1, d2) if kind == "factors" else 0) for name, d1, d2 in SHAPES]
    def columns(rows):
        out = {}
        for s in specs:
            if kind == "factors":
                out[f"{s.name}.u"], out[f"{s.name}.v"] = _rand(rows, s.d1 * s.c), _rand(rows, s.d2 * s.c)
            else:
                out[f"{s.name}.g"] = _rand(rows, s.dim)
        return out
    train, query = columns(n), columns(nq)
    blocks = blocks_from_columns(specs, kind, train)
    curvature = {}
    for s in specs:
        gram = blocks[s.name].dense().T @ blocks[s.name].dense()
        if method == "lorif":
            spec = eigh_spectrum(gram, min(r, s.dim))
            curvature[s.name] = LayerCurvature("woodbury", 0.3 + 0.1 * len(curvature), spec.vectors, spec.values)
        elif method == "logra":
            curvature[s.name] = LayerCurvature("inverse", 0.5, inverse=exact_inverse(gram, 0.5))
        else:
            curvature[s.name] = LayerCurvature("identity")
    return specs, train, query, curvature


def _reference(specs, kind, train, query, curvature, normalize):
    manifest = SimpleNamespace(kind=kind, meta={"layers": [vars(s) for s in specs]})
    cfg = SimpleNamespace(query=SimpleNamespace(normalize=normalize))
    return Scorer(cfg, manifest, query, "cpu", torch.float64, curvature=curvature)(train)


CASES = [("factors", "lorif", 1), ("factors", "lorif", 3), ("factors", "graddot", 1), ("factors", "graddot", 3),
         ("dense", "logra", 0), ("dense", "graddot", 0), ("dense", "lorif", 0)]


@pytest.mark.parametrize("kind,method,c", CASES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("query_side", [None, False, True])
def test_stacked_scores_equal_scorer(kind, method, c, normalize, query_side):
    specs, train, query, curvature = _setup(kind, method, c=c)
    expected = _reference(specs, kind, train, query, curvature, normalize)
    layout = ScoreLayout.build(specs, kind, curvature)
    stacked = StackedQuery(layout, blocks_from_columns(specs, kind, query), curvature, normalize=normalize,
                           query_side=query_side)
    got = stacked.scores(layout.train_block(train))
    assert (got - expected).norm() / expected.norm() < 1e-10


@pytest.mark.parametrize("nq,expected", [(5, True), (7, False), (9, False)])
def test_the_query_side_route_is_taken_when_fewer_queries_than_r(nq, expected):
    """nq < r: h_q = V_r (w ⊙ g'_q) replaces V_r (nq·D per training row instead of r·D), V_r is not kept;
    with normalize the route is never taken (I(t, t) needs g'_t)."""
    specs, train, query, curvature = _setup("factors", "lorif", c=1, nq=nq, r=7)
    layout = ScoreLayout.build(specs, "factors", curvature)
    for normalize in (False, True):
        stacked = StackedQuery(layout, blocks_from_columns(specs, "factors", query), curvature, normalize=normalize)
        used = expected and not normalize
        assert [h is not None for h in stacked.query_side] == [used] * len(layout.coordinate_groups)
        assert [v is None for v in stacked.vectors] == [used] * len(layout.coordinate_groups)
        got = stacked.scores(layout.train_block(train))
        reference = _reference(specs, "factors", train, query, curvature, normalize)
        assert (got - reference).norm() / reference.norm() < 1e-10


@pytest.mark.parametrize("normalize", [False, True])
def test_stored_coordinates_give_the_same_scores(normalize):
    specs, train, query, curvature = _setup("factors", "lorif", c=2)
    layout = ScoreLayout.build(specs, "factors", curvature)
    blocks = blocks_from_columns(specs, "factors", train)
    coords = {n: blocks[n].dense() @ curvature[n].vectors for n in layout.coordinate_names}  # g'_t = V_rᵀ g_t
    stacked = StackedQuery(layout, blocks_from_columns(specs, "factors", query), curvature, normalize=normalize,
                           keep_vectors=False)
    got = stacked.scores(layout.train_block(train, coords))
    expected = _reference(specs, "factors", train, query, curvature, normalize)
    assert (got - expected).norm() / expected.norm() < 1e-10
    without_vectors = StackedQuery(layout, blocks_from_columns(specs, "factors", query), curvature,
                                   normalize=normalize, keep_vectors=False, query_side=False)
    with pytest.raises(ValueError, match="keep_vectors"):
        without_vectors.scores(layout.train_block(train))


def test_chunked_topk_equals_full_topk():
    specs, train, query, curvature = _setup("factors", "lorif", c=1, n=50)
    layout = ScoreLayout.build(specs, "factors", curvature)
    stacked = StackedQuery(layout, blocks_from_columns(specs, "factors", query), curvature)
    block = layout.train_block(train)
    full = stacked.scores(block)
    topk = TopK(full.shape[0], 6, "cpu")
    score_in_chunks(stacked, block, topk, chunk_rows=7)
    best = torch.topk(full, 6, dim=1)
    assert torch.equal(topk.index, best.indices) and torch.allclose(topk.scores, best.values, rtol=1e-12)


def test_bf16_matmuls_stay_close():
    specs, train, query, curvature = _setup("factors", "lorif", c=1)
    layout = ScoreLayout.build(specs, "factors", curvature)
    q = {n: GradientBlock(u=b.u.float(), v=b.v.float()) for n, b in blocks_from_columns(specs, "factors", query).items()}
    curv32 = {n: c.to(dtype=torch.float32) for n, c in curvature.items()}
    exact = StackedQuery(layout, blocks_from_columns(specs, "factors", query), curvature).scores(layout.train_block(train))
    fast = StackedQuery(layout, q, curv32, matmul_dtype=torch.bfloat16).scores(
        layout.train_block(train, dtype=torch.bfloat16))
    assert ((fast.double() - exact).norm() / exact.norm()) < 3e-2


def test_injected_query_side_terms_need_no_vectors():
    """h_q = V_r (w ⊙ g'_q) made elsewhere (and g'_q for the self terms): scores with no V_r at hand."""
    from lorif_ray.math.influence import woodbury_weights

    specs, train, query, curvature = _setup("factors", "lorif", c=2)
    layout = ScoreLayout.build(specs, "factors", curvature)
    blocks = blocks_from_columns(specs, "factors", query)
    coords = {n: blocks[n].dense() @ c.vectors for n, c in curvature.items()}
    terms = {n: (coords[n] * woodbury_weights(c.values, c.damping)) @ c.vectors.T for n, c in curvature.items()}
    light = {n: LayerCurvature("woodbury", c.damping, values=c.values) for n, c in curvature.items()}
    stacked = StackedQuery(layout, blocks, light, query_coordinates=coords, query_side_terms=terms)
    expected = _reference(specs, "factors", train, query, curvature, False)
    assert (stacked.scores(layout.train_block(train)) - expected).norm() / expected.norm() < 1e-10
