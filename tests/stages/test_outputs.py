"""Stage 3's outputs: self-influence, per-layer scores, per-token attribution (README "Score convention"), and
the run a person looks at: report.html and ``Results.open``."""

import html
import json
import os
from dataclasses import replace
from html.parser import HTMLParser

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
from lorif_ray.stages.query import run_query
from lorif_ray.stages.queries import query_examples
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
    """The token rows have their own ids, table and arrays: ``scores.npy`` holds the queries only."""
    cfg, report = exact_factors
    scores = np.load(f"{cfg.output_dir}/scores.npy")
    queries = json.loads(open(f"{cfg.output_dir}/scores.json").read())["query_ids"]
    token_scores = np.load(f"{cfg.output_dir}/token_scores.npy")
    token_ids = json.loads(open(f"{cfg.output_dir}/token_scores.json").read())["token_ids"]
    assert queries == [f"q{i}" for i in range(6)] and scores.shape == (6, 48)
    assert report["queries"] == 6 and report["tokens"] == len(token_ids) == token_scores.shape[0] > 6
    tokens = pq.read_table(f"{cfg.output_dir}/tokens.parquet").to_pylist()
    assert [t["token_id"] for t in tokens] == token_ids and all(t["token_id"] == f"{t['query_id']}@{t['position']}"
                                                                for t in tokens)
    top = pq.read_table(f"{cfg.output_dir}/topk.parquet").to_pylist()
    for q, query in enumerate(queries):
        rows = [r for r, i in enumerate(token_ids) if i.startswith(f"{query}@")]
        assert rows and _relative_error(token_scores[rows].sum(axis=0), scores[q]) < 1e-4, query
        best = next(r["train_id"] for r in top if r["query_id"] == query and r["rank"] == 1)
        on_top = [t["score_on_top_proponent"] for t in tokens if t["query_id"] == query]  # its split over tokens
        np.testing.assert_allclose(sum(on_top), scores[q, int(best[1:])], rtol=1e-4)
    table = pq.read_table(f"{cfg.output_dir}/topk_per_token.parquet").to_pylist()
    first = table[0]
    assert list(first) == ["token_id", "query_id", "query_text", "position", "token", "rank", "train_id", "train_text",
                           "score"]
    assert first["rank"] == 1 and first["token_id"] == f"{first['query_id']}@{first['position']}"
    assert first["train_id"] == f"t{int(np.argmax(token_scores[token_ids.index(first['token_id'])]))}"


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
    from lorif_ray.store import IndexFolder

    cfg, _ = exact_factors
    calls, real = [], IndexFolder.ids
    monkeypatch.setattr(IndexFolder, "ids", lambda *a, **kw: calls.append(kw.get("shards")) or real(*a, **kw))
    run_query(replace(cfg, query=QueryConfig(top_k=2)))
    top = pq.read_table(f"{cfg.output_dir}/topk.parquet").column("train_id").to_pylist()
    holding = {int(t[1:]) // cfg.shard_size for t in top}
    assert all(call is not None and len(call) == 1 for call in calls) and {c[0] for c in calls} == holding


MARKUP = ' <i onclick="alert(1)">&amp;</i> <script>alert("x")</script>'  # training and query data are untrusted


class _Page(HTMLParser):
    """Every start tag with its attributes, the text of the page, and the style sheets."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.styles, self._in_style = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)


@pytest.fixture(scope="module")
def marked_up_run(tiny_assets, tmp_path_factory):
    """A query run whose training texts and queries (ids too) all carry markup, with every extra output."""
    root = tmp_path_factory.mktemp("markup")
    lines = tiny_assets["train"].read_text().splitlines()
    rows = [json.loads(line) for line in lines[:32]]
    (root / "train.jsonl").write_text("".join(json.dumps({**row, "text": row["text"] + MARKUP}) + "\n" for row in rows))
    queries = [json.loads(line) for line in tiny_assets["queries"].read_text().splitlines()]
    (root / "queries.jsonl").write_text("".join(json.dumps({**q, "id": f"<{q['id']}>", "prompt": "<b>" + q["prompt"]})
                                                + "\n" for q in queries))
    cfg = make_config({**tiny_assets, "train": root / "train.jsonl", "queries": root / "queries.jsonl"}, root / "out",
                      r=8, shard_size=16, query=ALL_OUTPUTS, cluster=ClusterConfig(backend="none"))
    report = run_attribute(cfg)["query"]
    return cfg, report, queries


def test_report_html_is_one_self_contained_page_with_every_text_escaped(marked_up_run):
    cfg, report, queries = marked_up_run
    assert report["report_path"] == f"{cfg.output_dir}/report.html"
    source = open(report["report_path"], encoding="utf-8").read()
    page = _Page()
    page.feed(source)
    page.close()
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "base", "i", "b"}, tags
    attributes = [(name, value or "") for _, attrs in page.tags for name, value in attrs.items()]
    assert not [name for name, _ in attributes if name in ("src", "srcset", "onclick", "onload", "action")]
    assert all(value.startswith("#") for name, value in attributes if name == "href")
    assert "http://" not in source and "https://" not in source and "url(" not in "".join(page.styles)
    text = "".join(page.text)
    top = pq.read_table(report["topk_path"]).to_pylist()
    for query in queries:
        assert f"<{query['id']}>" in text and "<b>" + query["prompt"] in text and query["response"] in text
        best = next(r for r in top if r["query_id"] == f"<{query['id']}>" and r["rank"] == 1)
        assert best["train_text"].endswith(MARKUP) and best["train_text"] in text  # shown whole, as text
        assert html.escape(best["train_text"], quote=True) in source
    assert "alert(1)" in text and "<script>" not in source and "<i onclick" not in source
    assert text.count("target tokens:") == len(queries) and "share of each layer" in text  # per-token and per-layer


def test_the_report_is_bounded_and_says_what_it_leaves_out(marked_up_run, monkeypatch):
    import lorif_ray.outputs.report_page as report_page
    from lorif_ray.store.query_run import QueryRun

    cfg, _, queries = marked_up_run
    monkeypatch.setattr(report_page, "MAX_QUERIES", 2)
    monkeypatch.setattr(report_page, "MAX_ROWS", 3)
    monkeypatch.setattr(report_page, "MAX_TEXT", 12)
    page = report_page.render_report(QueryRun.open(cfg.output_dir))
    assert page.count('<section class="query"') == 2 and page.count("<tr") == 2 * (2 * 3 + 2)
    assert "showing the first 2 of 6 queries" in page and "the top 3 of the 5 ranks kept on each side" in page
    assert "texts cut at 12 characters" in page


def test_results_open_reads_a_run_of_the_stage_and_shows_itself(baseline):
    """``Results.open`` on the folder ``run_query`` wrote (what the jobs run): every query id has proponents and
    opponents with texts, and the notebook table escapes them."""
    from lorif_ray import Results

    results = Results.open(baseline["cfg"].output_dir)
    assert results.query_ids == [f"q{i}" for i in range(6)] and results.scores.shape == (6, 48)
    train = {json.loads(line)["id"]: json.loads(line)["text"]
             for line in open(baseline["cfg"].data.train).read().splitlines()}
    for query_id in results.query_ids:
        best, worst = results.proponents(query_id), results.opponents(query_id)
        assert len(best) == len(worst) == 5 and best[0]["score"] > 0 > worst[0]["score"]
        assert all(p["train_text"] == train[p["train_id"]] for p in best + worst)
        row = results.query_ids.index(query_id)
        assert worst[0]["train_id"] == results.train_ids[int(np.argmin(results.scores[row]))]
    table = results._repr_html_()
    page = _Page()
    page.feed(table)
    assert ("table", {}) in page.tags and results.proponents("q0")[0]["train_text"] in "".join(page.text)
    with pytest.raises(KeyError, match="no query 'q0@3'"):
        results.proponents("q0@3")
