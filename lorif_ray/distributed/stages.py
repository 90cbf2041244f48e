"""The three stages on the backend the config names: Ray actors, or this process (``cluster.backend=none``).

The jobs call ``run_stage``; with the Ray backend it starts or joins Ray (``cluster.address``) first.
"""

from __future__ import annotations

from lorif_ray.config import Config
from lorif_ray.stages.attribute import STAGES, run_local_stage


def run_stage(name: str, cfg: Config) -> dict:
    """Run stage ``name`` ("index", "curvature" or "query") of ``cfg``; returns its report."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
    if cfg.cluster.backend == "none":
        return run_local_stage(name, cfg)
    from lorif_ray.distributed.cluster import actor_options, connect
    from lorif_ray.distributed.index_pipeline import run_index_distributed
    from lorif_ray.distributed.query_service import run_query_distributed
    from lorif_ray.distributed.rsvd import run_curvature_distributed

    connect(cfg.cluster)
    cluster = cfg.cluster
    if name == "index":
        return run_index_distributed(cfg)
    if name == "curvature":
        return run_curvature_distributed(cfg, cluster.gram_actors, actor_options=actor_options(cluster, gpu=True))
    return run_query_distributed(cfg, cluster.query_actors, actor_options=actor_options(cluster, gpu=True))
