"""The query service gives run_query's top-k and scores, and keeps shards resident across batches."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.config import QueryConfig
from lorif_ray.distributed.gram import shard_groups
from lorif_ray.distributed.query_pool import QueryPool, QueryWorker, merge_topk, ray_query
from lorif_ray.errors import LorifError
from lorif_ray.stages.inputs import query_config
from lorif_ray.stages.query import run_query
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.outputs.query_outputs import OutputFiles
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.conftest import QUERY_CONFIG
from tests.distributed.conftest import NUM_WORKERS


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_workers_without_ray_write_the_full_scores_and_merge_to_the_top_k(baseline, tmp_path):
    cfg = baseline["config"]("plain_workers", with_curvature=True)
    manifest = IndexFolder(cfg.index_path).manifest()
    columns = featurize_queries(cfg, manifest).columns
    folder = CurvatureFolder(cfg.curvature_path)
    workers = [QueryWorker(query_config(cfg, manifest), folder, g) for g in shard_groups(manifest, NUM_WORKERS)]
    np.save(tmp_path / "full.npy", np.zeros((6, manifest.num_rows), dtype=np.float32))
    files = OutputFiles(scores=str(tmp_path / "full.npy"))
    results = [w.score({"columns": columns, "k": 5, "route": "recompute", "files": files})
               for w in workers]
    full = np.load(tmp_path / "full.npy")
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    assert _relative_error(full, expected) <= 1e-5
    merged = merge_topk(results, 5)
    np.testing.assert_array_equal(merged.index.numpy(), np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(merged.low_index.numpy(), np.argsort(full, axis=1, kind="stable")[:, :5])
    assert torch.all(merged.low_scores[:, :-1] <= merged.low_scores[:, 1:]) and torch.all(merged.low_scores[:, 0] < 0)
    assert [w.loads for w in workers] == [1, 1]


def test_the_ray_backend_equals_run_query(baseline, ray_cluster, monkeypatch):
    """The query actors give run_query's top-k and scores; the driver reads the curvature's header only (V_r and
    σ² stay with the actors)."""
    import lorif_ray.store.curvature_folder as saved

    read = []
    monkeypatch.setattr(saved, "load_tensors", lambda *a, **kw: read.append(a) or (_ for _ in ()).throw(
        AssertionError("the driver read a curvature tensor file")))
    one = baseline["cfg"]
    dist = baseline["config"]("dist_query", with_curvature=True)
    report = run_query(dist, partial(ray_query, num_workers=NUM_WORKERS))
    assert report["workers"] == NUM_WORKERS and report["route"] == "query" and not read
    scores, expected_scores = np.load(dist.output_dir + "/scores.npy"), np.load(one.output_dir + "/scores.npy")
    assert scores.shape == expected_scores.shape and _relative_error(scores, expected_scores) <= 1e-5
    train_ids = json.loads(open(one.output_dir + "/scores.json").read())["train_ids"]
    for name, order in (("topk.parquet", -expected_scores), ("opponents.parquet", expected_scores)):
        expected = pq.read_table(f"{one.output_dir}/{name}").to_pydict()
        actual = pq.read_table(f"{dist.output_dir}/{name}").to_pydict()
        for column in ("query_id", "rank", "train_id"):
            assert actual[column] == expected[column], (name, column)
        np.testing.assert_allclose(actual["score"], expected["score"], rtol=1e-5)
        ranked = np.argsort(order, axis=1, kind="stable")[:, :5]  # both ends are the full matrix's, sorted
        assert expected["train_id"] == [train_ids[i] for i in ranked.reshape(-1)], name
    saved, expected_saved = (json.loads(open(d + "/scores.json").read()) for d in (dist.output_dir, one.output_dir))
    assert (saved["query_ids"], saved["train_ids"]) == (expected_saved["query_ids"], expected_saved["train_ids"])


def test_the_ray_backend_writes_the_extra_outputs_of_run_query(baseline, ray_cluster):
    """Self-influence, per-layer scores and per-token rows: the query actors write their columns of each, equal to
    one process."""
    query = QueryConfig(**QUERY_CONFIG, self_influence=True, per_layer=True, per_token=True)
    one = baseline["config"]("outputs_one", with_curvature=True, query=query)
    dist = baseline["config"]("outputs_ray", with_curvature=True, query=query)
    run_query(one)
    report = run_query(dist, partial(ray_query, num_workers=NUM_WORKERS))
    assert report["route"] == "recompute" and report["tokens"] > report["queries"]
    for name in ("layer_scores.npy", "scores.npy", "token_scores.npy"):
        actual, expected = np.load(f"{dist.output_dir}/{name}"), np.load(f"{one.output_dir}/{name}")
        assert actual.shape == expected.shape and _relative_error(actual, expected) <= 1e-5, name
    for name, columns in (("self_influence.parquet", ["self_influence"]), ("topk_per_token.parquet", ["score"]),
                          ("tokens.parquet", ["best_score", "score_on_top_proponent"])):
        actual, expected = (pq.read_table(f"{d}/{name}").to_pydict() for d in (dist.output_dir, one.output_dir))
        assert actual.keys() == expected.keys()
        for column in columns:
            np.testing.assert_allclose(actual.pop(column), expected.pop(column), rtol=1e-5)
        assert actual == expected, name


def test_service_keeps_shards_resident_across_query_batches(baseline, ray_cluster):
    cfg = baseline["config"]("service", with_curvature=True)
    manifest = IndexFolder(cfg.index_path).manifest()
    columns = featurize_queries(cfg, manifest).columns
    with QueryPool(query_config(cfg, manifest), CurvatureFolder(cfg.curvature_path), num_workers=NUM_WORKERS) as pool:
        first = pool.score(columns, "query", 5)
        before = pool.stats()
        second = pool.score({k: v[3:] for k, v in columns.items()}, "query", 5)  # another batch
        after = pool.stats()
    assert [s["shards"] for s in after] == [[0, 1, 2], [3, 4]]
    assert [s["loads"] for s in after] == [1, 1] and [s["pid"] for s in after] == [s["pid"] for s in before]
    assert sum(s["rows"] for s in after) == manifest.num_rows
    torch.testing.assert_close(second.index, first.index[3:])
    torch.testing.assert_close(second.scores, first.scores[3:], rtol=1e-6, atol=0)
    torch.testing.assert_close(second.low_index, first.low_index[3:])
    assert second.scores.shape == second.low_scores.shape == (3, 5)


def test_a_service_without_curvature_fails_at_start_naming_it(baseline, ray_cluster):
    cfg = baseline["config"]("no_curvature")  # the index, but stage 2 never ran for this output dir
    with pytest.raises(LorifError, match="curvature"):
        QueryPool(cfg, CurvatureFolder(cfg.curvature_path), NUM_WORKERS)
