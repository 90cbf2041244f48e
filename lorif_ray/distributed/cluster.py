"""Joining a Ray cluster and placing actors on it, from ``cluster.*`` of the config.

    cluster.address=null   start a local Ray instance (``python jobs/attribute.py``)
    cluster.address=auto   join the running cluster (``ray job submit ... -- python jobs/attribute.py``)

Every actor asks for ``cluster.cpus_per_actor`` CPUs and ``cluster.gpus_per_actor`` GPUs (by default
one GPU when the cluster has any). Gradient actors are placed with one placement group per model
replica: its tensor-parallel ranks, STRICT_PACK (one node: they rendezvous on 127.0.0.1 and
all-reduce every batch), so a replacement replica reuses the same bundles.
"""

from __future__ import annotations

from lorif_ray.config import ClusterConfig
from lorif_ray.errors import ConfigError

PLACEMENT_TIMEOUT_S = 120  # a placement group that is not ready by then cannot be placed on this cluster


def connect(cluster: ClusterConfig) -> None:
    """Start or join Ray as the config says; keeps an already initialized Ray (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address:
        ray.init(address=cluster.address, log_to_driver=True)
    else:
        # "local": always a new instance, never a cluster some earlier `ray start` left on this machine
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False, log_to_driver=True)


def gpus_per_actor(cluster: ClusterConfig) -> float:
    """``cluster.gpus_per_actor``, or 1 if unset and the cluster has GPUs, else 0."""
    import ray

    if cluster.gpus_per_actor is not None:
        return cluster.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_options(cluster: ClusterConfig, *, gpu: bool = True, restartable: bool = False) -> dict:
    """``ray.remote`` options of one actor: its CPUs/GPUs, and restarts for idempotent work.

    Args:
        gpu: whether this kind of actor uses a GPU when the cluster has them (gradient and query
            actors and the Gram reducers of stage 2 do; the factorization pool runs on CPUs).
        restartable: Ray restarts the actor after a crash and retries its in-flight calls (only
            for actors whose calls can safely run twice, e.g. writing a shard file atomically).
    """
    options = {"num_cpus": cluster.cpus_per_actor, "num_gpus": gpus_per_actor(cluster) if gpu else 0}
    if restartable:
        options.update(max_restarts=cluster.max_restarts, max_task_retries=cluster.max_restarts)
    return options


def replica_placement_group(cluster: ClusterConfig, options: dict):
    """A ready placement group of ``cluster.tp_size`` bundles (one per rank, one node) for one model replica."""
    return ready_placement_group([options] * cluster.tp_size, "STRICT_PACK", "a model replica (its tensor-parallel ranks)")


def ready_placement_group(options: list[dict], strategy: str, what: str):
    """A placement group with one bundle per actor's ``ray.remote`` options, once the cluster placed it.

    Raises:
        ConfigError: the cluster cannot place it within PLACEMENT_TIMEOUT_S (names what was asked
            and what the cluster has), instead of waiting forever for resources.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"CPU": o["num_cpus"], **({"GPU": o["num_gpus"]} if o.get("num_gpus") else {})} for o in options]
    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(
            f"cannot place {what}: {bundles} ({strategy}) within {PLACEMENT_TIMEOUT_S}s; the cluster has "
            f"{ray.cluster_resources()} and {ray.available_resources()} free (lower cluster.*_actors, "
            "cluster.cpus_per_actor or cluster.gpus_per_actor)")
    return group


def in_bundle(group, index: int) -> dict:
    """``ray.remote`` options that put an actor in bundle ``index`` of ``group``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
