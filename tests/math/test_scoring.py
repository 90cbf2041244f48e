"""The batched scorer (lorif_ray.math.scoring) against the explicit float64 oracle (tests/oracles.py)."""

import pytest
import torch

from lorif_ray.math.blocks import GradientBlock, RowLayout
from lorif_ray.math.curvature import ExactInverse, FitSettings, Identity, Woodbury, woodbury_weights
from lorif_ray.math.rsvd import GramOperator, TensorRows
from lorif_ray.math.scoring import StackedQuery, choose_route
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.query import score_blocks
from lorif_ray.outputs.query_outputs import TopK, score_bins
from lorif_ray.store.query_run import HALF, NUM_SCORE_BINS, score_bin_edges
from tests.oracles import curvature_inverse, oracle_scores

GEN = torch.Generator().manual_seed(0)
# two layers of one shape, one of another, one whose D equals the first's with swapped (d1, d2)
SHAPES = [("a", 6, 4), ("b", 6, 4), ("c", 3, 5), ("d", 4, 6)]
CURVATURE = {"lorif": Woodbury, "logra": ExactInverse, "graddot": Identity}


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def _setup(kind, method, c=2, n=37, nq=5, r=7):
    specs = [LayerSpec(name, 0, 0, d1, d2, min(c, d1, d2) if kind == "factors" else 0) for name, d1, d2 in SHAPES]

    def blocks(rows):  # {layer: GradientBlock} of random factors or dense rows
        if kind == "factors":
            return {s.name: GradientBlock(u=_rand(rows, s.d1, s.c), v=_rand(rows, s.d2, s.c)) for s in specs}
        return {s.name: GradientBlock(g=_rand(rows, s.dim)) for s in specs}
    train, query = blocks(n), blocks(nq)
    curvature = {}
    for i, s in enumerate(specs):
        settings = FitSettings(rank=min(r, s.dim), damping=0.3 + 0.1 * i, oversample=s.dim)  # exact spectrum
        curvature[s.name] = CURVATURE[method].fit(GramOperator(TensorRows(train[s.name].dense())), s.dim, s.name,
                                                  settings)
    return specs, train, query, curvature


def _oracle(specs, train, query, curvature, normalize):
    dense = lambda blocks: {n: b.dense() for n, b in blocks.items()}  # noqa: E731
    inverses = {s.name: curvature_inverse(curvature[s.name], s.dim) for s in specs}
    return oracle_scores(dense(query), dense(train), inverses, normalize)


CASES = [("factors", "lorif", 1), ("factors", "lorif", 3), ("factors", "graddot", 1), ("factors", "graddot", 3),
         ("dense", "logra", 0), ("dense", "graddot", 0), ("dense", "lorif", 0)]


@pytest.mark.parametrize("kind,method,c", CASES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("route", ["query", "recompute"])
def test_stacked_scores_equal_the_oracle(kind, method, c, normalize, route):
    specs, train, query, curvature = _setup(kind, method, c=c)
    expected = _oracle(specs, train, query, curvature, normalize)
    layout = RowLayout.build(specs, kind, curvature)
    route = route if layout.coordinate_groups and not normalize else None
    stacked = StackedQuery(layout, query, curvature, normalize=normalize, route=route)
    got = stacked.scores(layout.train_block(train))
    assert (got - expected).norm() / expected.norm() < 1e-10


@pytest.mark.parametrize("nq,train_self,stored,expected", [
    (5, False, False, "query"), (7, False, False, "recompute"), (5, True, False, "recompute"),
    (9, False, True, "stored"), (5, False, None, "none")])
def test_the_route_is_chosen_in_one_place(nq, train_self, stored, expected):
    """Query side when nq < r (and I(t, t) is not needed: it needs g'_t), stored g'_t when present."""
    ranks = [] if stored is None else [7, 9]
    assert choose_route(nq, ranks, stored=bool(stored), train_self=train_self) == expected


@pytest.mark.parametrize("kind,method,c", CASES)
@pytest.mark.parametrize("route", ["query", "recompute", "stored"])
def test_per_layer_scores_are_each_layers_own_and_sum_to_the_total(kind, method, c, route):
    """scores(per_layer=True)[ℓ] equals the layer's own oracle score g_q H_ℓ⁻¹ g_t (tests/oracles.py), on every
    route, and the slices sum to the fused total."""
    specs, train, query, curvature = _setup(kind, method, c=c)
    layout = RowLayout.build(specs, kind, curvature)
    route = route if layout.coordinate_groups else "none"
    coordinates = {s.name: train[s.name].dense() @ curvature[s.name].low_rank[0]
                   for s in specs if curvature[s.name].low_rank is not None} if route == "stored" else None
    block = layout.train_block(train, coordinates)
    stacked = StackedQuery(layout, query, curvature, route=route)
    per_layer = stacked.scores(block, per_layer=True)
    assert per_layer.shape == (len(specs), 5, 37)
    for i, s in enumerate(specs):
        inverse = {s.name: curvature_inverse(curvature[s.name], s.dim)}
        alone = oracle_scores({s.name: query[s.name].dense()}, {s.name: train[s.name].dense()}, inverse)
        assert torch.allclose(per_layer[i], alone, rtol=1e-10, atol=1e-10)
    assert torch.allclose(per_layer.sum(dim=0), stacked.scores(block), rtol=1e-10, atol=1e-10)


def test_the_query_side_route_holds_no_v_r():
    specs, train, query, curvature = _setup("factors", "lorif", c=1, nq=5, r=7)
    layout = RowLayout.build(specs, "factors", curvature)
    stacked = StackedQuery(layout, query, curvature)
    assert stacked.route == "query"
    assert all(h is not None for h in stacked.query_side) and all(v is None for v in stacked.vectors)


@pytest.mark.parametrize("normalize", [False, True])
def test_stored_coordinates_give_the_same_scores(normalize):
    specs, train, query, curvature = _setup("factors", "lorif", c=2)
    layout = RowLayout.build(specs, "factors", curvature)
    coords = {n: train[n].dense() @ curvature[n].vectors for n in layout.coordinate_names}  # g'_t = V_rᵀ g_t
    stacked = StackedQuery(layout, query, curvature, normalize=normalize, route="stored")
    got = stacked.scores(layout.train_block(train, coords))
    expected = _oracle(specs, train, query, curvature, normalize)
    assert (got - expected).norm() / expected.norm() < 1e-10
    with pytest.raises(ValueError, match="no stored g'_t"):
        stacked.scores(layout.train_block(train))


def test_chunked_topk_equals_full_topk():
    specs, train, query, curvature = _setup("factors", "lorif", c=1, n=50)
    layout = RowLayout.build(specs, "factors", curvature)
    stacked = StackedQuery(layout, query, curvature)
    block = layout.train_block(train)
    full = stacked.scores(block)
    topk = TopK(full.shape[0], 6, "cpu")
    score_blocks(stacked, (block.rows(s, min(s + 7, 50)) for s in range(0, 50, 7)), topk)
    best, worst = torch.topk(full, 6, dim=1), torch.topk(full, 6, dim=1, largest=False)
    assert torch.equal(topk.index, best.indices) and torch.allclose(topk.scores, best.values, rtol=1e-12)
    assert torch.equal(topk.low_index, worst.indices) and torch.allclose(topk.low_scores, worst.values, rtol=1e-12)
    # the score bins of every row, added block by block, are the whole matrix's; each score lies in its bin
    edges = torch.from_numpy(score_bin_edges())
    bins = score_bins(full)
    assert torch.equal(topk.bins, torch.zeros_like(topk.bins).scatter_add_(1, bins, torch.ones_like(bins)))
    assert torch.all((edges[bins, 0] <= full) & (full < edges[bins, 1])) and int(topk.bins.sum()) == full.numel()
    assert torch.equal(score_bins(torch.tensor([[0.0, 1e-30, -3.0, 1e30]])),
                       torch.tensor([[HALF, HALF, HALF - 1 - 262, NUM_SCORE_BINS - 1]]))  # log2 3 = 1.58: level 262


def test_bf16_matmuls_stay_close():
    specs, train, query, curvature = _setup("factors", "lorif", c=1)
    layout = RowLayout.build(specs, "factors", curvature)
    q = {n: GradientBlock(u=b.u.float(), v=b.v.float()) for n, b in query.items()}
    curv32 = {n: c.to(dtype=torch.float32) for n, c in curvature.items()}
    exact = StackedQuery(layout, query, curvature).scores(layout.train_block(train))
    fast = StackedQuery(layout, q, curv32, matmul_dtype=torch.bfloat16).scores(
        layout.train_block(train, dtype=torch.bfloat16))
    assert ((fast.double() - exact).norm() / exact.norm()) < 3e-2


def test_injected_query_side_terms_need_no_vectors():
    """h_q = V_r (w ⊙ g'_q) made elsewhere (and g'_q for the self terms): scores with no V_r at hand."""
    specs, train, query, curvature = _setup("factors", "lorif", c=2)
    layout = RowLayout.build(specs, "factors", curvature)
    coords = {n: query[n].dense() @ c.vectors for n, c in curvature.items()}
    terms = {n: (coords[n] * woodbury_weights(c.values, c.damping)) @ c.vectors.T for n, c in curvature.items()}
    light = {n: Woodbury(c.damping, c.values) for n, c in curvature.items()}
    stacked = StackedQuery(layout, query, light, route="query", query_coordinates=coords, query_side_terms=terms)
    expected = _oracle(specs, train, query, curvature, False)
    assert (stacked.scores(layout.train_block(train)) - expected).norm() / expected.norm() < 1e-10
