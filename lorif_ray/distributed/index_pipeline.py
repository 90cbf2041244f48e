"""Stage 1 on Ray: gradient actors read and featurize shards, a factorization pool writes them, the driver commits.

    task: plan_input ──(hash, row range of each shard)──► driver
    driver ──(shard i: its row range)──► GradientWorker (one per model replica, model loaded once;
                                                  │ reads and tokenizes the shard's rows itself)
                                                  │ fused: store columns (rank-c factors)
                                                  │ not fused: captured (A, B) pairs per batch
                                                  ▼
                                             ShardWorker pool (factorizes if needed, writes shard i's
                                                  │            Parquet file atomically)
                                                  ▼
    driver ◄────────── ShardRecord ───────────────┘  commits it to the manifest (one writer)

Shards are the deterministic unit of work (shard i = examples [i·size, (i+1)·size) in input order),
planned by one pass over the input in a Ray task: the driver never opens the input, it holds the row
range of each shard (O(shards) numbers). They are handed out on demand with at most
``cluster.inflight_per_actor`` per gradient actor, and captured payloads wait for a free pool member
(backpressure: no more payloads in flight than the pool can take). A shard counts only once its
record is committed, so a crash loses at most uncommitted work and a re-run skips committed shards
(their rows are never read). If an actor dies, its shards go back in the queue and a replacement
takes its place (same placement-group bundle); actors that Ray can restart retry their in-flight
calls themselves.

The bar counts examples as the gradient actors featurize them, batch by batch (``ActorProgress``: each
shard in flight reports to a small board actor, the driver polls it while it waits); a requeued shard's
examples leave the bar until they are featurized again, and the final count is the committed rows.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorif_ray.config import Config
from lorif_ray.distributed.cluster import (actor_options, in_bundle, ready_placement_group, replica_count,
                                          replica_placement_group)
from lorif_ray.data import Columns, InputPlan, InputShard, commit_row_table, discard_row_table, plan_input, row_table_path
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.errors import LorifError
from lorif_ray.model.loading import load_model, load_tokenizer, model_identity
from lorif_ray.math.capture import nonfinite_rows
from lorif_ray.progress import progress_bar
from lorif_ray.stages.featurize import ColumnMaker, Featurizer, LayerSpec
from lorif_ray.stages.index import (
    INDEX_WRITER,
    announce,
    build_featurizer,
    capture_chunk,
    columns_of_captured,
    featurize_chunk,
    finish_index,
    index_meta,
    index_writer,
    reuse_finished_index,
    shards_left,
    train_input,
)
from lorif_ray.stages.inputs import tokenized_shard
from lorif_ray.stages.kronecker_stats import fold_now_and_then, write_shard_stats
from lorif_ray.store import ShardRecord, ShardWriter, writer_lock


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
        >>> status, payload = worker.featurize_input(0, plan.shard(0), fused=True)  # ("columns", ids, columns)
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
        # of them, rank 0 writes them; sampled labels: every rank draws the same (seeded per example id)
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

    def featurize_input(self, shard: int, rows: InputShard, fused: bool, progress=None) -> tuple[dict, tuple | None]:
        """``featurize`` of one shard of the training input, read and tokenized here from its rows; rank 0
        writes the shard's K-FAC statistics (before the driver can commit the shard)."""
        chunk = tokenized_shard(rows, self.tokenizer, self.cfg.data.max_length)
        out = self.featurize(shard, chunk, fused, progress=progress)
        if self.rank == 0 and self.shard_stats is not None:
            write_shard_stats(self.cfg.index_path, shard, self.shard_stats)
        return out

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
    """A member of the factorization pool: factorizes captured pairs (when given them) and writes the
    shard's file; the driver commits the returned record (a plain class; wrap with ``ray.remote``).

    Args:
        index_dir: the index directory (its manifest must already exist: the driver creates it).
        layout: {"kind", "columns", "dtype", "shard_size", "meta"} of the index.
    """

    def __init__(self, index_dir: str, layout: dict):
        self.writer = ShardWriter(index_dir, **layout)
        meta, kind = layout["meta"], layout["kind"]
        specs = [LayerSpec(**layer) for layer in meta["layers"]]
        self.maker = None if kind == "hidden" else ColumnMaker(
            specs, kind=kind, seed=meta["config"]["seed"], iterations=meta["config"]["factor_iters"])

    def write(self, shard: int, payload: tuple) -> ShardRecord:
        """Write shard ``shard`` from a ``GradientWorker.featurize`` payload; returns its record."""
        if payload[0] == "captured":
            ids, columns = columns_of_captured(self.maker, payload[1])
        else:
            _, ids, columns = payload
        return self.writer.write_file(shard, ids, columns)


@dataclass
class _Slot:
    """One actor position: the actors now in it (a replica's ranks, or a pool member) and their calls
    in flight (keyed by the call's first result)."""

    actors: list
    inflight: set = field(default_factory=set)
    group: object = None  # the placement group of a gradient replica
    bundle: int = 0  # a pool member's bundle in the pool's placement group

    @property
    def actor(self):
        """The actor that answers: rank 0 of a replica, or the pool member."""
        return self.actors[0]


class IndexPipeline:
    """The actors of one stage-1 run: gradient replicas (``cluster.tp_size`` ranks each, one
    placement group per replica) and the factorization pool.

    Attributes:
        gradient_actors: rank 0 of each live replica, by slot (a replacement takes a dead one's slot).
        writer_actors: the live pool members, by slot.
        replaced: how many replicas or pool members were replaced after dying.
    """

    def __init__(self, cfg: Config, model_path: str, max_replicas: int | None = None):
        import ray

        self.cfg, self.model_path = cfg, model_path
        tensor_parallel = cfg.cluster.tp_size > 1  # a restarted rank could not rejoin its group
        self._gradient_options = actor_options(cfg.cluster, gpu=True, restartable=not tensor_parallel)
        self._writer_options = actor_options(cfg.cluster, gpu=False, restartable=True)
        self._gradient_remote = ray.remote(GradientWorker)
        self._writer_remote = ray.remote(ShardWorker)
        self.gradient_slots = []
        for _ in range(replica_count(cfg.cluster, max_replicas)):
            group = replica_placement_group(cfg.cluster, self._gradient_options)
            self.gradient_slots.append(_Slot(self._new_replica(group), group=group))
        ray.get([actor.ready.remote() for slot in self.gradient_slots for actor in slot.actors])  # models loaded
        self.writer_slots: list[_Slot] = []
        self.writer_group = None
        self.layout: dict | None = None
        self.replaced = 0

    def _new_replica(self, group) -> list:
        """The ranks of one replica in ``group``'s bundles; with TP, joined into one process group."""
        import ray

        tp_size = self.cfg.cluster.tp_size
        ranks = [self._gradient_remote.options(**self._gradient_options, **in_bundle(group, rank)).remote(
            self.cfg, self.model_path, rank, tp_size) for rank in range(tp_size)]
        if tp_size > 1:
            address, port = ray.get(ranks[0].rendezvous.remote())
            ray.get([rank.setup.remote(address, port) for rank in ranks])
        return ranks

    def start_writers(self, index_dir: str, layout: dict) -> None:
        """Start the factorization pool (one placement group, a bundle per member) once the driver
        has created the manifest."""
        self.index_dir, self.layout = index_dir, layout
        count = self.cfg.cluster.writer_actors
        self.writer_group = ready_placement_group([self._writer_options] * count, "PACK", "the factorization pool",
                                                  self.cfg.cluster.placement_timeout_s)
        self.writer_slots = [_Slot([self._new_writer(i)], bundle=i) for i in range(count)]

    def _new_writer(self, bundle: int):
        return self._writer_remote.options(**self._writer_options, **in_bundle(self.writer_group, bundle)).remote(
            self.index_dir, self.layout)

    @property
    def gradient_actors(self) -> list:
        return [s.actor for s in self.gradient_slots]

    @property
    def writer_actors(self) -> list:
        return [s.actor for s in self.writer_slots]

    def featurize(self, slot: _Slot, shard: int, rows: InputShard, progress=None) -> tuple:
        """Send shard ``shard``'s row range to every rank of a replica (each reads the same rows): (rank 0's
        status, its payload, all statuses); rank 0 reports its batches to ``progress`` (a ``Reporter``)."""
        calls = [rank.featurize_input.options(num_returns=2).remote(shard, rows, self.cfg.cluster.fused,
                                                                     progress if i == 0 else None)
                 for i, rank in enumerate(slot.actors)]
        return calls[0][0], calls[0][1], [status for status, _ in calls]

    def replace(self, slot: _Slot, error: Exception) -> None:
        """Put fresh actors in a dead slot (a whole replica, or a pool member), up to 2 per slot on average."""
        import ray

        self.replaced += 1
        limit = 2 * (len(self.gradient_slots) + len(self.writer_slots))
        if self.replaced > limit:
            raise LorifError(f"stage 1: {self.replaced} actors died (more than {limit}); last: {error}") from error
        for actor in slot.actors:
            ray.kill(actor)
        slot.inflight.clear()
        slot.actors = self._new_replica(slot.group) if slot.group is not None else [self._new_writer(slot.bundle)]

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for slot in self.gradient_slots + self.writer_slots:
            for actor in slot.actors:
                ray.kill(actor)
        for group in [slot.group for slot in self.gradient_slots] + [self.writer_group]:
            if group is not None:
                remove_placement_group(group)
        self.gradient_slots, self.writer_slots = [], []


def run_index_distributed(cfg: Config, *, on_commit: Callable[[ShardRecord, IndexPipeline], None] | None = None) -> dict:
    """Stage 1 on the connected Ray cluster; writes the same index as ``run_index(cfg)``.

    Args:
        cfg: the run config; ``cluster.gradient_actors``, ``writer_actors``, ``fused`` and
            ``inflight_per_actor`` shape the pipeline.
        on_commit: called with each committed shard's record and the pipeline (progress hooks; the
            fault tests kill actors from it).

    Example:
        >>> ray.init(num_cpus=2)
        >>> run_index_distributed(cfg)["examples_per_second"]
    """
    model_path, train_path = train_input(cfg)
    plan = _plan_in_a_task(train_path, cfg.shard_size, cfg.data.columns, str(row_table_path(cfg.index_path)))
    try:
        return _index_on(cfg, model_path, plan, on_commit)
    finally:
        discard_row_table(plan.rows_table)  # committed once the index accepted the input; else dropped


def _index_on(cfg: Config, model_path, plan: InputPlan, on_commit) -> dict:
    import ray

    pipeline = IndexPipeline(cfg, str(model_path), max_replicas=len(plan.ranges))
    try:
        layout = ray.get(pipeline.gradient_actors[0].describe.remote(plan.sha256, plan.num_rows))
        layout.update(dtype=cfg.dtype, shard_size=cfg.shard_size)
        reused = reuse_finished_index(cfg, layout["kind"], layout["columns"], layout["meta"], plan.num_rows)
        if reused is not None:  # complete and intact: no lock, no shard writes (read-only storage is fine)
            commit_row_table(plan.rows_table)  # a finished index without its row table gets it (a rename)
            return reused
        with writer_lock(cfg.index_path, *INDEX_WRITER):  # the driver's: its pool writes for this run
            writer = index_writer(cfg, layout["kind"], layout["columns"], layout["meta"])  # creates or checks it
            commit_row_table(plan.rows_table)  # the index accepted this input: the task's table moves into place
            pipeline.start_writers(str(cfg.index_path), layout)
            announce(cfg, plan.num_rows, layout["columns"], layout["kind"])
            todo = shards_left(plan, writer)
            skipped = len(plan.ranges) - len(todo)
            start = time.perf_counter()
            with progress_bar(plan.num_rows, "stage 1: index (ray)", "ex", cfg.progress) as bar:
                bar.update(plan.num_rows - sum(plan.ranges[i].rows for i in todo))
                progress = ActorProgress(bar.update if cfg.progress else None)
                try:
                    computed = _schedule(cfg, pipeline, writer, plan, todo, progress, on_commit)
                finally:
                    progress.close()
            return finish_index(cfg, writer, plan.num_rows, computed=computed, skipped_shards=skipped,
                                seconds=time.perf_counter() - start, gradient_actors=len(pipeline.gradient_slots),
                                writer_actors=len(pipeline.writer_slots), fused=cfg.cluster.fused,
                                replaced_actors=pipeline.replaced)
    finally:
        pipeline.close()


def _plan_in_a_task(train_path, shard_size: int, columns: Columns, rows_table: str | None = None) -> InputPlan:
    """``plan_input`` run by a Ray task where the data is (every node sees the path), not by the driver:
    the driver receives the hash and each shard's row range, never a row; the task writes the row table
    (``rows_table``) itself, a shard of rows at a time, and the driver only renames it into place.

    Raises:
        DataError: as ``plan_input`` (the task's error, unwrapped).
    """
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ray.remote(plan_input).remote(str(train_path), shard_size, columns, rows_table))
    except RayTaskError as error:
        raise error.as_instanceof_cause() from None


def _schedule(cfg: Config, pipeline: IndexPipeline, writer: ShardWriter, plan: InputPlan, todo: list[int],
              progress: ActorProgress, on_commit) -> int:
    """The driver loop: hand out shards, route payloads to the pool, commit records. Returns rows computed.
    ``progress`` follows each shard from its hand-out (batches reported by the actor) to its featurized rows."""
    import ray
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    cluster = cfg.cluster
    pending = deque(todo)  # shards to featurize
    to_write: deque = deque()  # (shard, payload ref) waiting for a free pool member
    featurizing: dict = {}  # status ref → (slot, shard, payload ref)
    writing: dict = {}  # record ref → (slot, shard, payload ref)
    computed = 0
    while pending or to_write or featurizing or writing:
        for slot in pipeline.writer_slots:  # pool first: it frees payloads
            while to_write and len(slot.inflight) < cluster.inflight_per_actor:
                shard, payload = to_write.popleft()
                ref = slot.actor.write.remote(shard, payload)
                slot.inflight.add(ref)
                writing[ref] = (slot, shard, payload)
        waiting_payloads = len(to_write) + len(writing)
        payload_budget = 2 * cluster.inflight_per_actor * len(pipeline.writer_slots)
        for slot in pipeline.gradient_slots:
            while pending and len(slot.inflight) < cluster.inflight_per_actor and waiting_payloads < payload_budget:
                shard = pending.popleft()
                reporter = progress.start(shard, plan.ranges[shard].rows)
                status, payload, statuses = pipeline.featurize(slot, shard, plan.shard(shard), reporter)
                slot.inflight.add(status)
                featurizing[status] = (slot, shard, payload, statuses)
                waiting_payloads += 1
        done, _ = ray.wait(list(featurizing) + list(writing), num_returns=1, timeout=progress.wait_s)
        progress.poll()
        if not done:
            continue
        (ready,) = done
        if ready in featurizing:
            slot, shard, payload, statuses = featurizing.pop(ready)
            slot.inflight.discard(ready)
            try:
                ray.get(statuses)  # every rank of the replica finished the shard
            except RayActorError as error:  # an actor died for good: redo its shards elsewhere
                lost = [entry[1] for entry in _drop(featurizing, slot) + [(slot, shard)]]
                for unit in lost:
                    progress.drop(unit)
                pending.extendleft(lost)
                pipeline.replace(slot, error)
                continue
            except RayTaskError as error:
                raise error.as_instanceof_cause() from None  # e.g. NaN gradients, named by example
            progress.finish(shard)  # featurized: its rows count, exactly (a lost payload drops them again)
            to_write.append((shard, payload))
        else:
            slot, shard, payload = writing.pop(ready)
            slot.inflight.discard(ready)
            try:
                record = ray.get(ready)
            except RayActorError as error:  # the payloads survive their writer: hand them to the new one
                to_write.extendleft((entry[1], entry[2]) for entry in _drop(writing, slot) + [(slot, shard, payload)])
                pipeline.replace(slot, error)
                continue
            except ObjectLostError:  # the payload died with its gradient actor's node: featurize again
                progress.retract(plan.ranges[shard].rows)
                pending.appendleft(shard)
                continue
            except RayTaskError as error:
                raise error.as_instanceof_cause() from None
            writer.commit(record)
            fold_now_and_then(writer.directory, writer.is_done)
            computed += record.rows
            if on_commit:
                on_commit(record, pipeline)
    return computed


def _drop(inflight: dict, slot: _Slot) -> list[tuple]:
    """Remove and return the in-flight entries of ``slot`` (its actor died)."""
    refs = [ref for ref, entry in inflight.items() if entry[0] is slot]
    return [inflight.pop(ref) for ref in refs]
