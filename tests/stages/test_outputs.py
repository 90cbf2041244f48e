"""Stage 3's extra outputs (README "Score convention"): self-influence, per-layer scores, per-token attribution."""

import json
import os
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.data import IGNORE_INDEX, TokenizedExample, collate
from lorif_ray.errors import ConfigError
from lorif_ray.model.layers import select_layers
from lorif_ray.stages.attribute import run_attribute
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.featurize import Featurizer
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import query_examples, run_query
from tests.conftest import tiny_gpt2
from tests.stages.helpers import make_config

ALL_OUTPUTS = QueryConfig(full_scores=True, top_k=5, self_influence=True, per_layer=True, per_token=True)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def exact_factors(tiny_assets, tmp_path_factory):
    """LoRIF with c = min(d1, d2) = 8 on every layer of the tiny model: the factors of a query are exact, so its
    scores are linear in its gradient; every extra output asked for."""
    cfg = make_config(tiny_assets, tmp_path_factory.mktemp("outputs"), c=8, r=16, shard_size=16,
                      query=ALL_OUTPUTS, cluster=ClusterConfig(backend="none"))
    report = run_attribute(cfg)["query"]
    return cfg, report


def test_the_token_scores_of_a_query_sum_to_its_score(exact_factors):
    cfg, report = exact_factors
    scores = np.load(f"{cfg.output_dir}/scores.npy")
    row_ids = json.loads(open(f"{cfg.output_dir}/scores.json").read())["query_ids"]
    queries = [i for i in row_ids if "@" not in i]
    assert report["queries"] == len(queries) == 6 and report["tokens"] == len(row_ids) - 6 > 6
    for q, query in enumerate(queries):
        tokens = [r for r, i in enumerate(row_ids) if i.startswith(f"{query}@")]
        assert tokens and _relative_error(scores[tokens].sum(axis=0), scores[q]) < 1e-4, query
    table = pq.read_table(f"{cfg.output_dir}/topk_per_token.parquet").to_pylist()
    first = table[0]
    assert set(first) == {"query_id", "query_text", "position", "token", "rank", "train_id", "train_text", "score"}
    assert first["rank"] == 1
    row = row_ids.index(f"{first['query_id']}@{first['position']}")
    assert first["train_id"] == f"t{int(np.argmax(scores[row]))}"


def test_layer_scores_sum_to_the_score(exact_factors):
    cfg, report = exact_factors
    scores, layers = np.load(f"{cfg.output_dir}/scores.npy"), np.load(report["layer_scores_path"])
    names = json.loads(open(f"{cfg.output_dir}/layer_scores.json").read())["layers"]
    assert layers.shape == (len(names), *scores.shape) and len(names) > 1
    assert _relative_error(layers.sum(axis=0), scores) < 1e-5
    assert all(np.abs(layer).max() > 0 for layer in layers)


def test_self_influence_is_the_diagonal_of_the_training_set_scored_against_itself(exact_factors, tiny_assets):
    """The training file as queries: scores.npy is then N × N and I(t, t) of ``self_influence.parquet`` (from the
    stored rows) is its diagonal (from the featurized queries)."""
    cfg, _ = exact_factors
    train = replace(cfg, data=replace(cfg.data, queries=cfg.data.train),
                    query=replace(cfg.query, per_layer=False, per_token=False))
    run_query(train)
    scores = np.load(f"{cfg.output_dir}/scores.npy")
    table = pq.read_table(f"{cfg.output_dir}/self_influence.parquet").to_pydict()
    assert table["train_id"] == [f"t{i}" for i in range(48)]
    values = np.array(table["self_influence"])
    assert np.all(values > 0) and _relative_error(values, np.diag(scores)) < 1e-4
    assert not [p for p in os.listdir(cfg.output_dir) if ".tmp" in p]  # the values' temporary file is gone


def test_per_token_rows_are_linear_in_the_query_gradient_in_float64():
    """One copy of a query per target token (``query_examples``): their dense projected gradients sum to the
    query's exactly (float64; position 0 and the prompt carry no loss)."""
    model = tiny_gpt2()
    featurizer = Featurizer(model, select_layers(model, None), kind="dense", f=2, c=1, seed=0,
                            compute_dtype=torch.float64)
    query = TokenizedExample("q", [5, 9, 11, 7, 3, 8], [IGNORE_INDEX, IGNORE_INDEX, 11, 7, 3, 8])
    rows = [query] + [TokenizedExample(f"q@{p}", query.input_ids, [IGNORE_INDEX] * p + [query.labels[p]]
                                       + [IGNORE_INDEX] * (5 - p)) for p in range(2, 6)]
    whole = featurizer(["q"], collate([query], 0))
    tokens = featurizer([r.id for r in rows[1:]], collate(rows[1:], 0))
    for column, value in whole.items():
        torch.testing.assert_close(tokens[column].sum(dim=0), value[0], rtol=1e-10, atol=1e-12)


def test_query_examples_keep_one_target_token_per_copy(tiny_assets):
    from lorif_ray.model.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_assets["model"])
    queries, tokens = query_examples(tiny_assets["queries"], tokenizer, 32, per_token=True)
    whole = queries[:6]
    assert [q.id for q in whole] == [f"q{i}" for i in range(6)]
    copies = queries[6:]
    assert len(copies) == len(tokens) == sum(sum(label != IGNORE_INDEX for label in q.labels[1:]) for q in whole)
    for copy, (query_id, position, text) in zip(copies, tokens):
        original = whole[int(query_id[1:])]
        assert copy.id == f"{query_id}@{position}" and copy.input_ids == original.input_ids
        assert [i for i, label in enumerate(copy.labels) if label != IGNORE_INDEX] == [position]
        assert copy.labels[position] == original.labels[position] and text == tokenizer.decode([original.labels[position]])


@pytest.mark.parametrize("query,match", [
    (QueryConfig(per_layer=True, normalize=True), "per_layer"),
    (QueryConfig(per_token=True, measurement="mean_loss"), "per_token"),
])
def test_outputs_that_cannot_hold_are_refused_before_work(tiny_assets, tmp_path, query, match):
    with pytest.raises(ConfigError, match=match):
        run_index(make_config(tiny_assets, tmp_path, query=query, cluster=ClusterConfig(backend="none")))


def test_a_repsim_index_refuses_gradient_outputs(tiny_assets, tmp_path):
    cfg = make_config(tiny_assets, tmp_path, method="repsim", query=QueryConfig(self_influence=True),
                      cluster=ClusterConfig(backend="none"))
    run_index(cfg)
    run_curvature(cfg)
    with pytest.raises(ConfigError, match="query.self_influence: a RepSim index"):
        run_query(cfg)


def test_a_top_k_query_reads_the_ids_of_its_top_k_rows_only(exact_factors, monkeypatch):
    """The driver's share of stage 3 does not grow with N: without full-score outputs it reads the example ids of
    the shards that hold a top-k row, one shard at a time, never the index's N ids."""
    import lorif_ray.store.shards as shards

    cfg, _ = exact_factors
    calls, real = [], shards.read_ids
    monkeypatch.setattr(shards, "read_ids", lambda *a, **kw: calls.append(kw.get("shards")) or real(*a, **kw))
    run_query(replace(cfg, query=QueryConfig(top_k=2)))
    top = pq.read_table(f"{cfg.output_dir}/topk.parquet").column("train_id").to_pylist()
    holding = {int(t[1:]) // cfg.shard_size for t in top}
    assert all(call is not None and len(call) == 1 for call in calls) and {c[0] for c in calls} == holding
