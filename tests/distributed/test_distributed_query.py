"""The query service gives run_query's top-k and scores, and keeps shards resident across batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.distributed.query_service import QueryService, QueryWorker, merge_topk, run_query_distributed
from lorif_ray.errors import LorifError
from lorif_ray.stages.query import featurize_queries
from lorif_ray.distributed.rsvd import shard_groups
from lorif_ray.store import open_index
from tests.distributed.conftest import NUM_WORKERS


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_workers_without_ray_merge_to_the_full_scores(baseline):
    cfg = baseline["config"]("plain_workers", with_curvature=True)
    manifest = open_index(cfg.index_path)
    _, columns, _ = featurize_queries(cfg, manifest)
    workers = [QueryWorker(cfg, g) for g in shard_groups(manifest, NUM_WORKERS)]
    results = [w.score({"columns": columns, "k": 5, "full": True}) for w in workers]
    full = np.concatenate([b.numpy() for _, _, b in results], axis=1)
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    assert _relative_error(full, expected) <= 1e-5
    scores, index = merge_topk([(s, i) for s, i, _ in results], 5)
    np.testing.assert_array_equal(index.numpy(), np.argsort(-full, axis=1, kind="stable")[:, :5])
    assert [w.loads for w in workers] == [1, 1]


def test_run_query_distributed_equals_run_query(baseline, ray_cluster):
    one = baseline["cfg"]
    dist = baseline["config"]("dist_query", with_curvature=True)
    report = run_query_distributed(dist, num_workers=NUM_WORKERS)
    assert report["workers"] == NUM_WORKERS
    expected = pq.read_table(one.output_dir + "/topk.parquet").to_pydict()
    actual = pq.read_table(dist.output_dir + "/topk.parquet").to_pydict()
    for column in ("query_id", "rank", "train_id"):
        assert actual[column] == expected[column], column
    np.testing.assert_allclose(actual["score"], expected["score"], rtol=1e-5)
    scores, expected_scores = np.load(dist.output_dir + "/scores.npy"), np.load(one.output_dir + "/scores.npy")
    assert scores.shape == expected_scores.shape and _relative_error(scores, expected_scores) <= 1e-5
    saved, expected_saved = (json.loads(open(d + "/scores.json").read()) for d in (dist.output_dir, one.output_dir))
    assert (saved["query_ids"], saved["train_ids"]) == (expected_saved["query_ids"], expected_saved["train_ids"])


def test_service_keeps_shards_resident_across_query_batches(baseline, ray_cluster):
    cfg = baseline["config"]("service", with_curvature=True)
    manifest = open_index(cfg.index_path)
    _, columns, _ = featurize_queries(cfg, manifest)
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    with QueryService(cfg, num_workers=NUM_WORKERS) as service:
        first = service.query(columns)
        before = service.stats()
        second = service.query({k: v[3:] for k, v in columns.items()})  # another batch: the last 3 queries
        after = service.stats()
    assert [s["shards"] for s in after] == [[0, 1, 2], [3, 4]]
    assert [s["loads"] for s in after] == [1, 1] and [s["pid"] for s in after] == [s["pid"] for s in before]
    assert sum(s["rows"] for s in after) == manifest.num_rows
    assert _relative_error(first.full, expected) <= 1e-5
    assert _relative_error(second.full, expected[3:]) <= 1e-5
    torch.testing.assert_close(second.index, first.index[3:])
    assert second.scores.shape == (3, 5)


def test_a_service_without_curvature_fails_at_start_naming_it(baseline, ray_cluster):
    cfg = baseline["config"]("no_curvature")  # the index, but stage 2 never ran for this output dir
    with pytest.raises(LorifError, match="curvature"):
        QueryService(cfg, NUM_WORKERS)
