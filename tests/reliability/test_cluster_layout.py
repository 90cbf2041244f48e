"""Case 14 of issue 12: the stage-1 layout fits the cluster it is given. With the default layout
(cluster.gradient_actors=null) a tensor-parallel replica on the 2-CPU machine runs — as many replicas as
fit beside the pool — and equals TP=1; a fixed layout the local instance cannot hold fails at once, in one
line (asked vs available), instead of after a two-minute wait."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.distributed.cluster import replica_count
from lorif_ray.errors import ConfigError
from tests.conftest import QUERY_CONFIG, SHARD_SIZE
from tests.stages.helpers import make_config


def test_the_default_layout_fits_a_tensor_parallel_replica_on_two_cpus(tiny_assets, baseline, ray_cluster):
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.stages.attribute import run_attribute

    cluster = ClusterConfig(tp_size=2)  # everything else as conf/cluster/local.yaml: gradient_actors=null
    assert replica_count(cluster) == 1  # 2 CPUs: one replica of 2 ranks x 0.5 CPU beside the 0.5-CPU pool
    cfg = make_config(tiny_assets, baseline["root"] / "tp2_default", shard_size=SHARD_SIZE,
                      query=QueryConfig(**QUERY_CONFIG), cluster=cluster)
    report = run_attribute(cfg, run_stage)
    assert report["index"]["gradient_actors"] == 1
    one = baseline["cfg"]
    expected = pq.read_table(one.output_dir + "/topk.parquet").select(["query_id", "rank", "train_id"])
    assert pq.read_table(cfg.output_dir + "/topk.parquet").select(["query_id", "rank", "train_id"]).equals(expected)
    scores, expected_scores = np.load(cfg.output_dir + "/scores.npy"), np.load(one.output_dir + "/scores.npy")
    assert np.abs(scores - expected_scores).max() <= 1e-4 * np.abs(expected_scores).max()


@pytest.mark.parametrize("cluster", [dict(gradient_actors=8), dict(tp_size=2, gradient_actors=2)])
def test_a_layout_the_local_instance_cannot_hold_fails_at_once(tiny_assets, tmp_path, ray_cluster, cluster):
    from lorif_ray.distributed.featurize import RayFeaturize
    from lorif_ray.stages.index import run_index

    cfg = make_config(tiny_assets, tmp_path, shard_size=SHARD_SIZE, cluster=ClusterConfig(**cluster))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        run_index(cfg, RayFeaturize)
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "\n" not in message and "does not fit this Ray cluster" in message and "the cluster has 2 CPUs" in message
    assert f"{cluster['gradient_actors']} replica(s)" in message


def test_replicas_follow_the_cluster(ray_cluster):
    assert replica_count(ClusterConfig()) == 3  # (2 CPUs − 0.5 for the pool) / 0.5
    assert replica_count(ClusterConfig(), limit=2) == 2  # no more replicas than shards
    assert replica_count(ClusterConfig(gradient_actors=2)) == 2


def test_stages_2_and_3_refuse_a_layout_a_local_instance_cannot_hold():
    """Gram and query actors are not placed in groups: on a fixed local instance too many of them waited forever;
    the check counts the actors a stage starts (at most one per shard) and, for stage 3, its gradient replica."""
    from lorif_ray.distributed.cluster import check_layout

    two_cpus = {"CPU": 2.0}
    check_layout(ClusterConfig(gram_actors=4), "curvature", two_cpus, shards=4)  # 4 x 0.5 CPU
    check_layout(ClusterConfig(query_actors=8), "query", two_cpus, shards=2)  # capped at the 2 shards + 1 replica
    with pytest.raises(ConfigError, match=r"^the stage-2 layout does not fit this Ray cluster: 5 actor\(s\) x "
                                          r"\(0.5 CPU, 0 GPU\) = 2.5 CPUs, 0 GPUs; the cluster has 2 CPUs"):
        check_layout(ClusterConfig(gram_actors=5), "curvature", two_cpus, shards=10)
    with pytest.raises(ConfigError, match=r"stage-3 layout .* 4 actor\(s\) \+ a query-gradient replica of 1 rank"):
        check_layout(ClusterConfig(query_actors=4), "query", two_cpus, shards=10)
    check_layout(ClusterConfig(address="auto", gram_actors=64), "curvature", two_cpus, shards=64)  # may grow
