"""cluster.tp_size=2: each model replica is two Ray actors sharded with DeepSpeed AutoTP on gloo.

These run in float32 (the stored dtype): TP sums in another order, so factors agree to ~1e-5 of
their scale, and ~1e-4 where a layer's top singular values are close. tests/model checks the same
capture in float64 to 1e-10."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.distributed.featurize import RayFeaturize
from lorif_ray.distributed.backends import run_stage
from lorif_ray.stages.attribute import run_attribute
from lorif_ray.stages.index import run_index
from tests.conftest import QUERY_CONFIG, SHARD_SIZE, write_tiny_model_dir
from tests.distributed.test_distributed_index import _assert_same_index
from tests.stages.helpers import make_config

TP = dict(backend="ray", gradient_actors=1, tp_size=2, writer_actors=1, gram_actors=2, query_actors=2)


def test_tensor_parallel_replica_gives_the_tp1_top_k(tiny_assets, baseline, ray_cluster):
    """GPT-2 (Conv1D → Linear, c_attn split by heads): the same factors and the same top-k."""
    cfg = make_config(tiny_assets, baseline["root"] / "tp2", shard_size=SHARD_SIZE,
                      query=QueryConfig(**QUERY_CONFIG), cluster=ClusterConfig(**TP))
    report = run_attribute(cfg, run_stage)
    assert report["index"]["computed"] == 48
    one = baseline["cfg"]
    _assert_same_index(cfg.index_path, one.index_path, rtol=1e-4, same_bytes=False)  # TP sums in another order
    expected = pq.read_table(one.output_dir + "/topk.parquet").select(["query_id", "rank", "train_id"])
    assert pq.read_table(cfg.output_dir + "/topk.parquet").select(["query_id", "rank", "train_id"]).equals(expected)
    scores, expected_scores = np.load(cfg.output_dir + "/scores.npy"), np.load(one.output_dir + "/scores.npy")
    assert np.abs(scores - expected_scores).max() <= 1e-4 * np.abs(expected_scores).max()


@pytest.mark.parametrize("fused", [True, False])
def test_tensor_parallel_llama_index_equals_tp1(tmp_path, ray_cluster, fused):
    """Llama (column-parallel q/k/v/gate/up, row-parallel o/down): fused (ranks split the layers and
    gather) and not fused (rank 0 ships the captured pairs to the pool)."""
    assets = write_tiny_model_dir(tmp_path, arch="llama")
    one = make_config(assets, tmp_path / "tp1", shard_size=SHARD_SIZE, cluster=ClusterConfig(backend="none"))
    run_index(one)
    cfg = make_config(assets, tmp_path / "tp2", shard_size=SHARD_SIZE, cluster=ClusterConfig(**TP, fused=fused))
    run_index(cfg, RayFeaturize)
    _assert_same_index(cfg.index_path, one.index_path, rtol=1e-4, same_bytes=False)  # TP sums in another order
