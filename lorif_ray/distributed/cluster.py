"""Joining a Ray cluster and placing actors on it, from ``cluster.*`` of the config.

    cluster.address=null   start a local Ray instance (``python jobs/attribute.py``)
    cluster.address=auto   join the running cluster (``ray job submit ... -- python jobs/attribute.py``)

Every actor asks for ``cluster.cpus_per_actor`` CPUs and ``cluster.gpus_per_actor`` GPUs (by default
one GPU when the cluster has any). Gradient actors are placed with one placement group per model
replica: its tensor-parallel ranks, STRICT_PACK (one node: they rendezvous on 127.0.0.1 and
all-reduce every batch), so a replacement replica reuses the same bundles.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from lorif_ray.config import ClusterConfig
from lorif_ray.errors import ClusterLostError, ConfigError


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


def _resources(values: dict) -> str:
    return f"{values.get('CPU', 0):g} CPUs, {values.get('GPU', 0):g} GPUs"


def replica_count(cluster: ClusterConfig, limit: int | None = None) -> int:
    """How many stage-1 replicas to start: ``cluster.gradient_actors``, or (null) as many replicas of
    ``tp_size`` ranks as the cluster holds beside the factorization pool (at most ``limit``, e.g. the shards).

    Raises:
        ConfigError: at once, in one line (asked vs available), when a local instance (fixed size) cannot
            hold one replica, or the requested replicas.
    """
    import ray

    total = ray.cluster_resources()
    fits = replicas_that_fit(cluster, total)
    check_layout(cluster, "index", total)
    wanted = cluster.gradient_actors
    if wanted is None:
        wanted = int(min(max(fits, 1), 1024))
    return max(1, min(wanted, limit or wanted))


def replicas_that_fit(cluster: ClusterConfig, total: dict) -> float:
    """How many stage-1 replicas of ``tp_size`` ranks a cluster of ``total`` resources holds beside the
    factorization pool (inf when a replica asks for nothing)."""
    cpus, gpus = cluster.cpus_per_actor * cluster.tp_size, _gpus_per_actor(cluster, total) * cluster.tp_size
    pool = cluster.writer_actors * cluster.cpus_per_actor
    fits = math.inf
    if cpus > 0:
        fits = math.floor((total.get("CPU", 0) - pool) / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(total.get("GPU", 0) / gpus + 1e-9))
    return fits


def _gpus_per_actor(cluster: ClusterConfig, total: dict) -> float:
    """``gpus_per_actor`` of a cluster of ``total`` resources (``gpus_per_actor`` without asking Ray)."""
    if cluster.gpus_per_actor is not None:
        return cluster.gpus_per_actor
    return 1.0 if total.get("GPU", 0) > 0 else 0.0


def local_resources(cluster: ClusterConfig) -> dict:
    """What a local Ray instance started for ``cluster`` will hold, known before it starts: ``num_cpus`` (or
    this machine's CPUs: at least what Ray counts, so nothing is refused that Ray would hold) and the GPUs this
    process sees."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no driver: Ray finds no GPU either
        pass
    return {"CPU": float(cluster.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_layout(cluster: ClusterConfig, stage: str, total: dict, shards: int | None = None) -> None:
    """Refuse, in one line, a layout that a local Ray instance of ``total`` resources cannot hold for ``stage``
    (it never grows, so its actors would wait forever); a joined cluster (``cluster.address``) may still be
    adding nodes and is not checked.

    Args:
        stage: "index" (the replicas beside the pool), "curvature" (the Gram actors) or "query"/"serve" (one
            replica for the query gradients and the query actors).
        shards: the index's shard count where known (stages 2 and 3 start at most one actor per shard);
            None for stages 2 and 3 = not checked yet.

    Raises:
        ConfigError: what the layout asks and what the instance has, and which keys to lower.
    """
    if cluster.address:
        return
    cpa, gpa = cluster.cpus_per_actor, _gpus_per_actor(cluster, total)
    hint = "lower cluster.tp_size, cluster.gradient_actors (null = as many as fit), cluster.cpus_per_actor"
    if stage == "index":
        fits, wanted = replicas_that_fit(cluster, total), cluster.gradient_actors
        if fits >= 1 and (wanted is None or wanted <= fits):
            return
        asked = (f"{wanted or 1} replica(s) x {cluster.tp_size} rank(s) x ({cpa:g} CPU, {gpa:g} GPU) + a pool of "
                 f"{cluster.writer_actors} x {cpa:g} CPU")
        raise ConfigError(f"the stage-1 layout does not fit this Ray cluster: it asks {asked}; the cluster has "
                          f"{_resources(total)}; {hint}")
    if shards is None:
        return
    if stage == "curvature":
        actors, extra, keys = min(cluster.gram_actors, shards), 0, "cluster.gram_actors"
    else:
        actors, extra, keys = min(cluster.query_actors, shards), cluster.tp_size, "cluster.query_actors"
    need = {"CPU": (actors + extra) * cpa, "GPU": (actors + extra) * gpa}
    if all(need[r] <= total.get(r, 0) + 1e-9 for r in need):
        return
    what = f"{actors} actor(s)" + (f" + a query-gradient replica of {extra} rank(s)" if extra else "")
    raise ConfigError(f"the stage-{2 if stage == 'curvature' else 3} layout does not fit this Ray cluster: {what} x "
                      f"({cpa:g} CPU, {gpa:g} GPU) = {_resources(need)}; the cluster has {_resources(total)}; lower "
                      f"{keys} or cluster.cpus_per_actor")


def replica_placement_group(cluster: ClusterConfig, options: dict):
    """A ready placement group of ``cluster.tp_size`` bundles (one per rank, one node) for one model replica."""
    return ready_placement_group([options] * cluster.tp_size, "STRICT_PACK",
                                 "a model replica (its tensor-parallel ranks)", cluster.placement_timeout_s)


def ready_placement_group(options: list[dict], strategy: str, what: str, timeout_s: float = 120.0):
    """A placement group with one bundle per actor's ``ray.remote`` options, once the cluster placed it.

    Raises:
        ConfigError: the cluster cannot place it within ``timeout_s`` (``cluster.placement_timeout_s``; one
            line: what was asked, what the cluster has and has free), instead of waiting forever.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"CPU": o["num_cpus"], **({"GPU": o["num_gpus"]} if o.get("num_gpus") else {})} for o in options]
    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        asked = _resources({"CPU": sum(b["CPU"] for b in bundles), "GPU": sum(b.get("GPU", 0) for b in bundles)})
        raise ConfigError(f"cannot place {what} ({asked} in {len(bundles)} bundle(s), {strategy}) within "
                          f"{timeout_s:g} s: the cluster has {_resources(ray.cluster_resources())}, "
                          f"{_resources(ray.available_resources())} free; lower cluster.*_actors or "
                          "cluster.cpus_per_actor, or raise cluster.placement_timeout_s while nodes boot")
    return group


def in_bundle(group, index: int) -> dict:
    """``ray.remote`` options that put an actor in bundle ``index`` of ``group``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


@contextmanager
def node_watch(stage: str, interval_s: float = 2.0) -> Iterator[None]:
    """Turn the death of this driver's own Ray node (its raylet) during ``stage`` into one line.

    Without it the driver waits in ``ray.get`` until Ray's own timeouts end it with log noise. A thread asks
    the cluster's control store every ``interval_s`` whether the driver's node is alive; once it is marked
    dead (about 15 s after the raylet died) the main thread is interrupted and ``ClusterLostError`` says
    what happened and that a re-run resumes (committed shards and finished curvature layers are kept).
    Other nodes' deaths are not this: their actors are replaced and their work redone.
    """
    import _thread

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    stop, died = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            try:
                alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
            except Exception:  # the control store is busy or restarting: ask again
                continue
            if alive.get(node_id) is False:
                died.set()
                _thread.interrupt_main()
                return

    thread = threading.Thread(target=watch, name="lorif-node-watch", daemon=True)
    thread.start()
    try:
        yield
    except KeyboardInterrupt:
        if died.is_set():
            raise ClusterLostError(f"Ray lost this driver's node (its raylet died) during stage {stage}; the work "
                                   "already committed is kept: re-run the same command to resume") from None
        raise
    finally:
        stop.set()
