"""Stage 1 on Ray: the featurize backend ``RayFeaturize`` of ``lorif_ray.stages.index.run_index``.

    run_index (the driver: meta, reuse, lock, the one ShardWriter, bar, commits)
      │ shard_input in a Ray task ──(hash, row range of each shard)──► driver (never opens the input)
      ▼
    RayFeaturize ──(shard i: its row range)──► gradient pool: one member per model replica (tp_size
                                                │ GradientWorker ranks in one placement group; model
                                                │ loaded once; each rank reads and tokenizes the rows)
                                                │ rank 0's payload, with the shard's K-FAC statistics:
                                                │ fused: FinishedShard (store columns)
                                                │ not fused: CapturedShard ((A, B) pairs per batch)
                                                ▼
                                           writer pool: ShardWorkers (factorize a CapturedShard, then
                                                │ FinishedShard.write: statistics, Parquet file, with a
                                                │ copy of the driver's writer)
                                                ▼
    driver ◄──────────── ShardRecord ───────────┘  commits it to the manifest

Shards are the deterministic unit of work (shard i = examples [i·size, (i+1)·size) in input order); the
driver holds the row range of each shard (O(shards) numbers) and object refs, never a row, a payload or
statistics (they go from the gradient actor to the pool through the object store). Both pools are
``ReplacingActorPool``s (Ray's ``ActorPool`` pattern: a call per free member, ``cluster.inflight_per_actor``
at once per actor), and captured payloads wait for a free pool member (backpressure: at most
2·``inflight_per_actor`` payloads per pool actor queued or in writing). A shard counts only once its record
is committed, so a crash loses at most uncommitted work and a re-run skips committed shards (their rows
are never read). If an actor dies for good, its member gets fresh actors (a replica in the same
placement group, a pool actor in the same bundle) and its calls come back: a shard to featurize again,
or a payload (which outlives its writer) to write again; a payload lost with its node is featurized
again. Single-rank actors that Ray can restart retry their in-flight calls themselves.

The bar counts examples as the gradient actors featurize them, batch by batch (``ActorProgress``: each
shard in flight reports to a small board actor, the driver polls it while it waits); a requeued shard's
examples leave the bar until they are featurized again, and the final count is the committed rows.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from lorif_ray.config import Config
from lorif_ray.data import InputShards, InputShard, shard_input
from lorif_ray.distributed.cluster import (actor_options, in_bundle, ready_placement_group, replica_count,
                                          replica_placement_group)
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.errors import LorifError
from lorif_ray.footprint import Held, shard_records
from lorif_ray.math.capture import nonfinite_rows
from lorif_ray.model.loading import load_model, load_tokenizer, model_identity
from lorif_ray.stages.featurize import DEVICE_BYTES, ColumnMaker, Featurizer, LayerSpec
from lorif_ray.stages.index import (FeaturizeBackend, FinishedShard, IndexLayout, build_featurizer, capture_chunk,
                                    columns_of_captured, featurize_chunk, index_meta)
from lorif_ray.stages.inputs import tokenized_shard
from lorif_ray.store import ShardRecord, ShardWriter
from lorif_ray.store.schema import BYTES_PER_VALUE

if TYPE_CHECKING:  # ray is imported where Ray work starts
    from lorif_ray.distributed.actor_pool import Member


@dataclass
class CapturedShard:
    """A shard's captured (A, B) pairs per batch [(ids, {layer: (A, B)})] and its K-FAC statistics, for the
    factorization pool to make into a ``FinishedShard`` (``cluster.fused=false``)."""

    index: int
    batches: list
    statistics: dict | None

    def finish(self, maker: ColumnMaker) -> FinishedShard:
        ids, columns = columns_of_captured(maker, self.batches)
        return FinishedShard(self.index, ids, columns, self.statistics)


class GradientWorker:
    """One model replica, or one tensor-parallel rank of it: loads the model once and featurizes whole
    shards (a plain class; wrap with ``ray.remote``).

    With ``tp_size`` > 1 the constructor only records its rank; ``setup`` (called on every rank of
    the replica at once) joins the replica's process group and shards the model with DeepSpeed
    AutoTP. Every rank then runs the same batches (each reads and tokenizes the same rows); each
    factorizes its share of the layers and rank 0 gathers and returns the columns (the other ranks
    return no payload).

    Example:
        >>> worker = GradientWorker(cfg, model_path)
        >>> status, shard = worker.featurize_input(0, plan.shard(0), fused=True)  # a FinishedShard
    """

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, tp_size: int = 1):
        self.cfg, self.model_path, self.rank, self.tp_size = cfg, model_path, rank, tp_size
        if tp_size == 1:
            model, tokenizer = load_model(model_path, dtype=cfg.model.dtype, device=cfg.model.device,
                                          adapter=cfg.model.adapter)
            self.identity = model_identity(model)
            self.featurizer = build_featurizer(cfg, model, statistics=True)
        else:  # the model is loaded, sharded, in ``setup``
            tokenizer = load_tokenizer(model_path)
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id

    def ready(self) -> int:
        """This process's id, once the constructor (model loading) has finished."""
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """A free port on this (rank 0's) node; the replica's ranks share the node (STRICT_PACK)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the replica's process group and shard the model (collective: all ranks at once)."""
        from lorif_ray.model import tensor_parallel as tp

        accelerator = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows each rank its own GPU
        os.environ.update(tp.rank_environment(self.rank, self.tp_size, master_addr, master_port, local_rank=0,
                                              accelerator=accelerator))
        tp.init_distributed()
        # Each rank reads only its slices of the checkpoint; the identity of the unsharded model (as the
        # query stage sees it) is the digest of every tensor, read from the files (cached per file).
        self.sharded = tp.load_sharded(self.model_path, self.tp_size, dtype=self.cfg.model.dtype,
                                       patterns=self.cfg.model.layers, identity=True)
        self.identity = self.sharded.identity
        group = self.sharded.group
        cfg = self.cfg
        self.featurizer = Featurizer(
            self.sharded.model, self.sharded.layers, kind=cfg.method.store_kind, f=cfg.f, c=cfg.c, seed=cfg.seed,
            factor_iters=cfg.factor_iters, dims=self.sharded.dims,
            capture_factory=lambda m, layers, p: tp.TensorParallelCapture(m, layers, p, group=group),
            statistics=True, statistics_labels=cfg.kfac_labels)  # of the all-reduced blocks: every rank has all
        # of them, rank 0 ships them with the shard; sampled labels: every rank draws the same (seeded per example id)
        specs = self.featurizer.specs
        mine = set(tp.layers_of_rank({s.name: s.dim for s in specs}, self.rank, self.tp_size))
        self.my_maker = None if self.featurizer.kind == "hidden" else ColumnMaker(
            [s for s in specs if s.name in mine], kind=self.featurizer.kind, seed=cfg.seed,
            iterations=self.featurizer.iterations, device=self.featurizer.device)

    def describe(self, data_sha256: str, num_examples: int) -> dict:
        """The index's manifest fields as this replica makes them: kind, columns, meta."""
        f = self.featurizer
        return {"kind": f.kind, "columns": f.columns,
                "meta": index_meta(self.cfg, f, self.identity, data_sha256, num_examples)}

    def featurize_input(self, shard: int, rows: InputShard, fused: bool,
                        progress=None) -> tuple[dict, FinishedShard | CapturedShard | None]:
        """One shard of the training input, read and tokenized here from its rows → (status, payload). Rank 0's
        payload is the shard with its K-FAC statistics: factorized (``FinishedShard``: fused, or hidden states)
        or as captured pairs for the pool (``CapturedShard``); the other ranks' is None."""
        chunk = tokenized_shard(rows, self.tokenizer, self.cfg.data.max_length)
        status, payload = self.featurize(shard, chunk, fused, progress=progress)
        if payload is None:
            return status, None
        if payload[0] == "captured":
            return status, CapturedShard(shard, payload[1], self.shard_stats)
        return status, FinishedShard(shard, payload[1], payload[2], self.shard_stats)

    def featurize(self, shard: int, chunk: list, fused: bool, measurement: str = "loss",
                  progress=None) -> tuple[dict, tuple | None]:
        """One shard → (status, payload); payload is ("columns", ids, {column: (n, width)}) or, not
        fused, ("captured", [(batch ids, {layer: (A, B)})]) for the pool to factorize; None on
        tensor-parallel ranks other than 0. ``measurement`` (``query.measurement``, for queries; training
        shards keep "loss") applies to this call only, so a restarted actor needs no state. ``progress``
        (a ``Reporter``, or None) gets each batch's example count."""
        start = time.perf_counter()
        batch_size, kind = self.cfg.data.batch_size, self.featurizer.kind
        previous, self.featurizer.measurement = self.featurizer.measurement, measurement
        try:
            if fused or kind == "hidden":
                if self.tp_size == 1 or kind == "hidden":
                    payload = ("columns", *featurize_chunk(self.featurizer, chunk, batch_size, self.pad_token_id,
                                                           progress))
                else:
                    payload = self._featurize_tensor_parallel(chunk, progress)
            else:
                payload = ("captured", capture_chunk(self.featurizer, chunk, batch_size, self.pad_token_id, progress))
        finally:
            self.featurizer.measurement = previous
            statistics = self.featurizer.statistics
            self.shard_stats = None if statistics is None else statistics.pop()  # this call's only
        status = {"shard": shard, "rows": len(chunk), "rank": self.rank, "pid": os.getpid(),
                  "seconds": time.perf_counter() - start}
        return status, payload if self.rank == 0 else None

    def _featurize_tensor_parallel(self, chunk: list, progress=None) -> tuple | None:
        """Each rank factorizes its layers of the (identical) captured blocks; rank 0 gathers."""
        from lorif_ray.model.tensor_parallel import gather_columns

        ids, columns = featurize_chunk(_RankShare(self.featurizer, self.my_maker), chunk, self.cfg.data.batch_size,
                                       self.pad_token_id, progress)
        columns = gather_columns(columns, self.sharded.group)
        return None if columns is None else ("columns", ids, columns)


class _RankShare:
    """One tensor-parallel rank's part of ``featurize_chunk``: every layer's captured blocks are checked
    for NaN/Inf on every rank (all ranks raise alike, none waits in the gather), and only this rank's
    layers are factorized."""

    def __init__(self, featurizer: Featurizer, maker: ColumnMaker):
        self.featurizer, self.maker = featurizer, maker
        self.columns = maker.columns

    def unchecked(self, ids: list[str], batch: dict) -> tuple[dict, list]:
        captured = self.featurizer.capture(ids, batch)
        masks = [(name, nonfinite_rows(t)) for name, pair in captured.items() for t in pair]
        return self.maker.unchecked(ids, captured)[0], masks


class ShardWorker:
    """A member of the factorization pool: writes shards (``FinishedShard.write``), factorizing captured ones
    first, with a copy of the driver's writer; the driver commits the records it returns (a plain class; wrap
    with ``ray.remote``)."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        meta, kind = writer.manifest.meta, writer.manifest.kind
        specs = [LayerSpec(**layer) for layer in meta["layers"]]
        self.maker = None if kind == "hidden" else ColumnMaker(
            specs, kind=kind, seed=meta["config"]["seed"], iterations=meta["config"]["factor_iters"])

    def write(self, payload: FinishedShard | CapturedShard) -> ShardRecord:
        """Write one shard from a ``GradientWorker.featurize_input`` payload; returns its record."""
        shard = payload.finish(self.maker) if isinstance(payload, CapturedShard) else payload
        return shard.write(self.writer)


class GradientReplicas:
    """The model replicas of a stage on Ray: ``cluster.tp_size`` ``GradientWorker`` ranks each (joined into one
    process group), one placement group per replica (STRICT_PACK), models loaded when it returns; at most
    ``max_replicas`` (e.g. the shards). ``members``: a ``Member`` per replica; ``close()`` ends them."""

    def __init__(self, cfg: Config, model_path: str, max_replicas: int | None = None):
        import ray

        from lorif_ray.distributed.actor_pool import Member

        self.cfg, self.model_path = cfg, model_path
        tensor_parallel = cfg.cluster.tp_size > 1  # a restarted rank could not rejoin its group
        self.options = actor_options(cfg.cluster, gpu=True, restartable=not tensor_parallel)
        self.remote = ray.remote(GradientWorker)
        self.groups, self.members = [], []
        try:
            for _ in range(replica_count(cfg.cluster, max_replicas)):
                self.groups.append(replica_placement_group(cfg.cluster, self.options))
                self.members.append(Member(partial(self._ranks, self.groups[-1])))
            ray.get([actor.ready.remote() for member in self.members for actor in member.actors])  # models loaded
        except BaseException:
            self.close()
            raise

    def _ranks(self, group) -> list:
        """The ranks of one replica in ``group``'s bundles; with TP, joined into one process group."""
        import ray

        tp_size = self.cfg.cluster.tp_size
        ranks = [self.remote.options(**self.options, **in_bundle(group, rank)).remote(
            self.cfg, self.model_path, rank, tp_size) for rank in range(tp_size)]
        if tp_size > 1:
            address, port = ray.get(ranks[0].rendezvous.remote())
            ray.get([rank.setup.remote(address, port) for rank in ranks])
        return ranks

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for member in self.members:
            member.kill()
        for group in self.groups:
            remove_placement_group(group)
        self.members, self.groups = [], []


class RayFeaturize(FeaturizeBackend):
    """The featurize backend of stage 1 on the connected Ray cluster: writes the same index as ``run_index(cfg)``.
    ``cluster.gradient_actors``, ``tp_size``, ``writer_actors``, ``fused`` and ``inflight_per_actor`` shape it.

    Attributes (while it runs):
        gradient_actors: rank 0 of each live replica; writer_actors: the live pool actors.
        replaced: how many replicas or pool actors were renewed after dying.

    Example:
        >>> ray.init(num_cpus=2)
        >>> run_index(cfg, RayFeaturize)["examples_per_second"]    # doctest: +SKIP
    """

    label = "stage 1: index (ray)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.replicas: GradientReplicas | None = None
        self.writers: list[Member] = []
        self.writer_group = None
        self.replaced = 0

    def shard_input(self, train_path, rows_table) -> InputShards:
        """``shard_input`` run by a Ray task where the data is (every node sees the path), not by the driver: the
        driver receives the hash and each shard's row range, never a row; the task writes the row table
        (``rows_table``) itself, a shard of rows at a time, and the driver only renames it into place.

        Raises:
            DataError: as ``shard_input`` (the task's error, unwrapped).
        """
        import ray
        from ray.exceptions import RayTaskError

        cfg = self.cfg
        try:
            return ray.get(ray.remote(shard_input).remote(str(train_path), cfg.shard_size, cfg.data.columns,
                                                         str(rows_table)))
        except RayTaskError as error:
            raise error.as_instanceof_cause() from None

    def open(self, plan: InputShards, model_path) -> IndexLayout:
        import ray

        self.replicas = GradientReplicas(self.cfg, str(model_path), max_replicas=len(plan.ranges))
        return IndexLayout(**ray.get(self.replicas.members[0].actor.describe.remote(plan.sha256, plan.num_rows)))

    @property
    def gradient_actors(self) -> list:
        return [member.actor for member in self.replicas.members]

    @property
    def writer_actors(self) -> list:
        return [member.actor for member in self.writers]

    def _start_writers(self, writer: ShardWriter) -> None:
        """The factorization pool (one placement group, a bundle per actor), each with a copy of ``writer``."""
        import ray

        from lorif_ray.distributed.actor_pool import Member

        cluster = self.cfg.cluster
        options = actor_options(cluster, gpu=False, restartable=True)
        self.writer_group = ready_placement_group([options] * cluster.writer_actors, "PACK", "the factorization pool",
                                                  cluster.placement_timeout_s)
        remote = ray.remote(ShardWorker)

        def pool_actor(bundle: int) -> list:
            return [remote.options(**options, **in_bundle(self.writer_group, bundle)).remote(writer)]

        self.writers = [Member(partial(pool_actor, i)) for i in range(cluster.writer_actors)]

    def _renew(self, member: Member, error: Exception) -> None:
        """Fresh actors in a dead member's place, up to 2 per member on average."""
        self.replaced += 1
        limit = 2 * (len(self.replicas.members) + len(self.writers))
        if self.replaced > limit:
            raise LorifError(f"stage 1: {self.replaced} actors died (more than {limit}); last: {error}") from error
        member.renew()

    def shards(self, plan: InputShards, todo: list[int], writer: ShardWriter,
               on_rows: Callable[[int], None] | None) -> Iterator[ShardRecord]:
        self._start_writers(writer)
        progress = ActorProgress(on_rows)
        try:
            yield from self._pipeline(plan, todo, progress)
        finally:
            progress.close()

    def _pipeline(self, plan: InputShards, todo: list[int], progress: ActorProgress) -> Iterator[ShardRecord]:
        """Hand out shards to the gradient pool, their payloads to the writer pool, and yield the records;
        ``progress`` follows each shard from its hand-out (batches reported by the actor) to its featurized rows."""
        from ray.exceptions import ObjectLostError

        from lorif_ray.distributed.actor_pool import LostCall, ReplacingActorPool, next_results

        cluster = self.cfg.cluster
        fused = cluster.fused

        def featurize(member: Member, shard: int):
            reporter = progress.start(shard, plan.ranges[shard].rows)
            calls = [rank.featurize_input.options(num_returns=2).remote(shard, plan.shard(shard), fused,
                                                                         reporter if i == 0 else None)
                     for i, rank in enumerate(member.actors)]
            (status, payload), others = calls[0], [status for status, _ in calls[1:]]
            return status, others, payload  # every rank must finish the shard; rank 0's payload goes on

        def write(member: Member, job: tuple):
            return member.actor.write.remote(job[1]), [], None  # job: (shard, its payload's ref)

        per_actor = cluster.inflight_per_actor
        gradients = ReplacingActorPool(self.replicas.members, featurize, per_actor, self._renew)
        writers = ReplacingActorPool(self.writers, write, per_actor, self._renew)
        budget = 2 * per_actor * len(self.writers)  # payloads queued for the pool or being written
        pending, writing = deque(todo), 0
        while pending or gradients.has_next() or writers.has_next():
            handed = 0
            while pending and gradients.has_free() and writing + handed < budget:
                gradients.put(pending.popleft())
                handed += 1
            for pool, outcome in next_results([writers, gradients], progress.wait_s):
                lost = isinstance(outcome, LostCall)
                if pool is gradients and lost:  # its replica died: featurize it elsewhere
                    progress.drop(outcome.value)
                    pending.appendleft(outcome.value)
                elif pool is gradients:
                    shard, _, payload = outcome
                    progress.finish(shard)  # featurized: its rows count, exactly (a lost payload drops them again)
                    writers.put((shard, payload))
                    writing += 1
                elif lost and not isinstance(outcome.error, ObjectLostError):
                    writers.put(outcome.value)  # the payload survives its writer: the renewed one writes it
                elif lost:  # the payload died with its gradient actor's node: featurize again
                    shard = outcome.value[0]
                    writing -= 1
                    progress.retract(plan.ranges[shard].rows)
                    pending.appendleft(shard)
                else:
                    writing -= 1
                    yield outcome[1]
            progress.poll()

    def info(self) -> dict:
        return {"gradient_actors": len(self.replicas.members), "writer_actors": len(self.writers),
                "fused": self.cfg.cluster.fused, "replaced_actors": self.replaced}

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for member in self.writers:
            member.kill()
        if self.writer_group is not None:
            remove_placement_group(self.writer_group)
        if self.replicas is not None:
            self.replicas.close()
        self.writers, self.writer_group = [], None


def _fused(cfg: Config) -> bool:
    """Whether the gradient actors factorize in place (else they ship the captured (A, B) pairs to the pool)."""
    return cfg.cluster.fused or cfg.method.store_kind == "hidden"


def _captured(cfg: Config, specs: list[LayerSpec], rows: int, what: str) -> Held:
    return Held(f"captured (A, B) of every batch of the shard{what} ({rows:,} × T × Σ(d1+d2))", "float32",
                DEVICE_BYTES * rows * cfg.data.max_length * sum(s.d1 + s.d2 for s in specs))


def gradient_actor_footprint(cfg: Config, specs: list[LayerSpec], columns: dict[str, int], *, rows: int, weights: int,
                             activations: int, projections: int, captured: int, store: int) -> tuple[Held, ...]:
    """What one TP rank of a gradient replica holds at its largest step, for shards of ``rows`` examples: the
    model shard and its activations (bytes as the caller estimates them from the model's shapes), the
    featurizer's device tensors (``stages.featurize.featurizer_footprint``: ``projections``, ``captured``,
    ``store``), and what it returns per shard (store columns when fused, else the captured pairs)."""
    dtype, values = cfg.model.dtype, sum(columns.values())
    returned = (Held(f"the shard's store columns, returned ({rows:,} × {values:,})", "float32",
                     DEVICE_BYTES * rows * values) if _fused(cfg) else _captured(cfg, specs, rows, ", returned"))
    return (Held("model shard: block linears / TP + the rest", dtype, weights, "GPU"),
            Held(f"activations saved for backward, B={cfg.data.batch_size}, T={cfg.data.max_length}", dtype,
                 activations, "GPU"),
            Held("projections P_in, P_out of the rank's rows", "float32", projections, "GPU"),
            Held("captured A (B·T×d1), B (B·T×d2) of every layer", "float32", captured, "GPU"),
            Held(f"store columns of the shard's batches ({rows:,} rows), until the shard ends", "float32", store, "GPU"),
            returned)


def writer_actor_footprint(cfg: Config, specs: list[LayerSpec], columns: dict[str, int], *, rows: int
                           ) -> tuple[Held, ...]:
    """What a member of the factorization pool holds: one shard's payload at a time (the captured pairs it
    factorizes when not fused), its store columns and their storage-dtype copy; the payloads waiting for the pool
    sit in the object store (at most 2·``inflight_per_actor`` per pool actor: the driver's budget)."""
    values = sum(columns.values())
    shard = Held(f"one shard's store columns ({rows:,} × {values:,})", "float32", DEVICE_BYTES * rows * values)
    held = [shard, Held("the same rounded to the storage dtype (Arrow table)", cfg.dtype,
                        BYTES_PER_VALUE[cfg.dtype] * rows * values)]
    if not _fused(cfg):
        held.insert(0, _captured(cfg, specs, rows, ""))
    waiting = 2 * cfg.cluster.inflight_per_actor * cfg.cluster.writer_actors
    held.append(Held(f"shard payloads waiting for the pool (≤ {waiting}, the driver's budget)", "float32",
                     waiting * held[0].bytes, "object store"))
    return tuple(held)


def driver_footprint(shards: int) -> tuple[Held, ...]:
    """What stage 1's driver holds: a record per committed shard and its to-do entries (never a row: the gradient
    actors read the input)."""
    return (Held(f"shard records and to-do entries: {shards:,} shards × ~{shard_records(1).bytes} B", "—",
                 shard_records(shards).bytes),)
