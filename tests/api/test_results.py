"""Issue 20, rows 4, 5 and 7, as a user meets them through the Python API: the README loop over a per-token run,
a second query in the same folder, and results one can look at (texts, opponents, report.html, Results.open)."""

import contextlib
import html
import io
import json
import re
import shutil

import pytest

from lorif_ray import Attributor, Results
from lorif_ray.errors import QueryRunError

QUERIES = [{"id": "x", "prompt": "the cat", "response": " sat on"}, {"id": "y", "prompt": "a dog", "response": " ran"}]


@pytest.fixture(scope="module")
def attributor(tiny_assets, tmp_path_factory):
    attributor = Attributor(str(tiny_assets["model"]), output_dir=tmp_path_factory.mktemp("api") / "run", r=8,
                            max_length=32, device="cpu", top_k=3)
    attributor.index(tiny_assets["train"])
    attributor.fit_curvature()
    return attributor


def _readme_loop(results) -> str:
    """The loop of the README's Python API example, as it stands."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for query_id in results.query_ids:
            print("query", query_id)
            for p in results.proponents(query_id, k=3):
                print(f"  {p['rank']}. {p['score']:+.3f}  {p['train_text']}")
    return out.getvalue()


def test_the_readme_loop_over_a_per_token_run_and_a_second_run_without_extras(attributor, tiny_assets):
    """Row 4: with per_token the README loop prints every query (token rows have their own ids and table). Row 5:
    a second query without extras shows none of the first one's arrays, in the returned Results and in the folder."""
    train = {json.loads(line)["text"] for line in tiny_assets["train"].read_text().splitlines()}
    first = attributor.query(QUERIES, per_token=True, per_layer=True, self_influence=True)
    printed = _readme_loop(first)
    assert printed.count("query ") == 2 and "query x@" not in printed
    assert all(line.split(None, 2)[2] in train for line in printed.splitlines() if line.startswith("  "))
    assert first.query_ids == ["x", "y"] and first.token_ids == ["x@3", "x@4", "y@3"]
    assert first.tokens.column("query_id").to_pylist() == ["x", "x", "y"] and first.layer_scores is not None

    second = attributor.query(QUERIES)
    out = second.output_dir
    assert (second.layer_scores, second.self_influence, second.token_topk, second.tokens) == (None,) * 4
    assert second.token_ids == [] and second.layers == []
    for name in ("layer_scores.npy", "layer_scores.json", "self_influence.parquet", "topk_per_token.parquet",
                 "tokens.parquet", "token_scores.npy"):
        assert not (out / name).exists(), name
    assert _readme_loop(second) == printed  # the same queries, the same proponents


def test_results_carry_texts_and_opponents_and_reopen_from_the_folder(attributor, tiny_assets):
    """Row 7: topk.parquet and opponents.parquet hold the texts; report.html is written beside them; Results.open
    reads the same run back (a notebook shows it as a table)."""
    results = attributor.query(QUERIES)
    assert results.topk.column_names == ["query_id", "query_text", "rank", "train_id", "train_text", "score"]
    assert results.bottomk.column_names == results.topk.column_names
    for query_id in results.query_ids:
        worst = results.opponents(query_id)
        assert [o["rank"] for o in worst] == [1, 2, 3] and worst[0]["score"] <= worst[1]["score"] <= worst[2]["score"]
        assert results.proponents(query_id)[0]["score"] > worst[0]["score"]
    page = html.unescape(re.sub(r"<[^>]+>", "", results.report_path.read_text()))
    assert "the cat sat on" in page and results.proponents("x")[0]["train_text"] in page
    again = Results.open(results.output_dir)
    assert again.topk.equals(results.topk) and again.opponents("y") == results.opponents("y")
    assert "<table>" in again._repr_html_() and "the cat sat on" in again._repr_html_()
    assert repr(again).startswith("Results(2 queries, top-3 each side")


def test_an_older_or_mixed_run_is_refused_by_name(attributor, tmp_path):
    results = attributor.query(QUERIES)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(results.output_dir / "topk.parquet", old / "topk.parquet")  # a run before query_run.json
    with pytest.raises(QueryRunError, match="format 1"):
        Results.open(old)
    with pytest.raises(QueryRunError, match="holds no query run"):
        Results.open(tmp_path)
    mixed = tmp_path / "mixed"
    shutil.copytree(results.output_dir, mixed, ignore=shutil.ignore_patterns("index", "curvature", "inputs"))
    attributor.query(QUERIES[:1])  # another run's topk.parquet over this one's: as if this run stopped part-way
    shutil.copy(results.output_dir / "topk.parquet", mixed / "topk.parquet")
    with pytest.raises(QueryRunError, match="topk.parquet does not match the checksum this run recorded .a file of "
                                            "another run"):
        Results.open(mixed)
