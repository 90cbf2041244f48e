"""A small local Ray cluster for the session, and one tiny index scored in one process (the baseline)."""

from __future__ import annotations

import shutil

import pytest

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from tests.stages.helpers import make_config

NUM_WORKERS = 2
SHARD_SIZE = 10  # 48 examples → 5 shards, split 3 + 2 between the two workers
QUERY = QueryConfig(full_scores=True, top_k=5, train_batch_rows=7)  # batches never align with shards


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def baseline(tiny_assets, tmp_path_factory):
    """Index + curvature + query of the tiny model, all in one process.

    r = 64 + oversample 10 exceeds D = 64 of the attention output projection (exact eigh path) and
    not D = 192 / 256 of the other layers (randomized path), so both paths are compared.
    """
    root = tmp_path_factory.mktemp("dist")
    cfg = make_config(tiny_assets, root / "one", shard_size=SHARD_SIZE, query=QUERY, cluster=ClusterConfig(backend="none"))
    run_index(cfg)
    run_curvature(cfg)
    run_query(cfg)

    def config(name: str, with_curvature: bool = False, **overrides):
        """A config on the same index, writing to its own output dir (optionally with the baseline curvature)."""
        other = make_config(tiny_assets, root / name, shard_size=SHARD_SIZE, query=QUERY,
                            index_dir=str(cfg.index_path), **overrides)
        if with_curvature:
            other.curvature_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(cfg.curvature_path, other.curvature_path)
        return other

    return {"cfg": cfg, "config": config, "root": root}
