"""The three stages on the backend the config names: Ray actors, or this process (``cluster.backend=none``).

The jobs call ``run_stage``; with the Ray backend it checks the stage's inputs and (for a local instance) the
layout first, then starts or joins Ray (``cluster.address``). Each stage runs its one driver (``run_index``,
``run_curvature``, ``run_query``) with its Ray backend (``RayFeaturize``, ``RayGram``, ``ray_query``).
``run_service`` is the HTTP query service on the same two backends (Ray Serve, or a server in this process).
"""

from __future__ import annotations

import threading
from functools import partial

from lorif_ray.config import Config
from lorif_ray.errors import LorifError
from lorif_ray.stages.attribute import STAGES, run_local_stage
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.outputs.folders import claim_output_dir
from lorif_ray.stages.preflight import check_before_work
from lorif_ray.stages.query import run_query


def check_ray_layout(cfg: Config, stages) -> None:
    """The layout of ``stages`` against the local Ray instance (``cluster.address`` null): the one running in
    this process, or the one a job would start (its size is known before it starts). A joined cluster is not
    checked here. Stages 2 and 3 are checked once their index exists (their actors are capped at its shards).

    Raises:
        ConfigError: one line, what the layout asks and what the instance has.
    """
    import sys

    from lorif_ray.distributed.cluster import check_layout, local_resources

    if cfg.cluster.backend == "none" or cfg.cluster.address:
        return
    ray = sys.modules.get("ray")  # not imported: no instance yet
    total = ray.cluster_resources() if ray is not None and ray.is_initialized() else local_resources(cfg.cluster)
    shards = None
    from lorif_ray.store import IndexFolder, Manifest

    index = IndexFolder(cfg.index_path)
    if index.exists():
        try:
            shards = len(Manifest.load(index.path).shards)
        except LorifError:  # unreadable: the stage reports it
            shards = None
    for stage in stages:
        check_layout(cfg.cluster, stage, total, shards)


def run_stage(name: str, cfg: Config) -> dict:
    """Run stage ``name`` ("index", "curvature" or "query") of ``cfg``; returns its report."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
    if cfg.cluster.backend == "none":
        return run_local_stage(name, cfg)
    cfg = check_before_work(cfg, (name,))
    check_ray_layout(cfg, (name,))
    claim_output_dir(cfg)
    from lorif_ray.distributed.cluster import actor_options, connect, node_watch
    from lorif_ray.distributed.gram import RayGram
    from lorif_ray.distributed.featurize import RayFeaturize
    from lorif_ray.distributed.query_pool import ray_query

    connect(cfg.cluster)
    cluster = cfg.cluster
    options = actor_options(cluster, gpu=True)
    with node_watch(name):
        if name == "index":
            return run_index(cfg, RayFeaturize)
        if name == "curvature":  # a Gram pass is a pure function of the rows and Q: Ray may rerun it after a crash
            restartable = actor_options(cluster, gpu=True, restartable=True)
            return run_curvature(cfg, partial(RayGram, num_workers=cluster.gram_actors, actor_options=restartable))
        return run_query(cfg, partial(ray_query, num_workers=cluster.query_actors, actor_options=options))


def run_service(cfg: Config, stop: threading.Event | None = None) -> None:
    """The HTTP query service of ``cfg``'s index until SIGINT/SIGTERM (or ``stop``): on Ray Serve, or with
    ``cluster.backend=none`` on a plain HTTP server in this process (``lorif_ray.service``)."""
    if cfg.cluster.backend == "none":
        from lorif_ray.service import serve_local

        return serve_local(cfg, stop)
    from lorif_ray.distributed.serving import serve_on_ray

    return serve_on_ray(cfg, stop)
