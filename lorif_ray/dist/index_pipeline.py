"""Stage 1 on Ray: gradient actors stream shards, a factorization pool writes them, the driver commits.

    driver ──(shard i: tokenized examples)──► GradientWorker (one per model replica, model loaded once)
                                                  │ fused: store columns (rank-c factors)
                                                  │ not fused: captured (A, B) pairs per batch
                                                  ▼
                                             ShardWorker pool (factorizes if needed, writes shard i's
                                                  │            Parquet file atomically)
                                                  ▼
    driver ◄────────── ShardRecord ───────────────┘  commits it to the manifest (one writer)

Shards are the deterministic unit of work (shard i = examples [i·size, (i+1)·size) in input order),
handed out on demand with at most ``cluster.inflight_per_actor`` per gradient actor, and captured
payloads wait for a free pool member (backpressure: no more payloads in flight than the pool can
take). A shard counts only once its record is committed, so a crash loses at most uncommitted work
and a re-run skips committed shards. If an actor dies, its shards go back in the queue and a
replacement takes its place (same placement-group bundle); actors that Ray can restart retry
their in-flight calls themselves.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.dist.cluster import actor_options, in_bundle, replica_placement_group
from lorif_ray.errors import ConfigError, LorifError
from lorif_ray.model.loading import load_model, load_tokenizer
from lorif_ray.stages.featurize import ColumnMaker, LayerSpec
from lorif_ray.stages.index import (
    announce,
    build_featurizer,
    capture_chunk,
    columns_of_captured,
    featurize_chunk,
    finish_index,
    index_meta,
    shard_chunks,
    train_examples,
)
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.store import ShardRecord, ShardWriter, file_sha256


class GradientWorker:
    """One model replica: loads the model once and featurizes whole shards (a plain class; wrap with
    ``ray.remote``).

    Example:
        >>> worker = GradientWorker(cfg, model_path)
        >>> status, payload = worker.featurize(0, chunk, fused=True)   # payload: ("columns", ids, columns)
    """

    def __init__(self, cfg: Config, model_path: str):
        model, tokenizer = load_model(model_path, dtype=cfg.model.dtype, device=cfg.model.device)
        self.cfg, self.model = cfg, model
        self.featurizer = build_featurizer(cfg, model)
        self.pad_token_id = tokenizer.pad_token_id

    def describe(self, data_sha256: str, num_examples: int) -> dict:
        """The index's manifest fields as this replica makes them: kind, columns, meta."""
        f = self.featurizer
        return {"kind": f.kind, "columns": f.columns,
                "meta": index_meta(self.cfg, f, self.model, data_sha256, num_examples)}

    def featurize(self, shard: int, chunk: list, fused: bool) -> tuple[dict, tuple]:
        """One shard → (status, payload); payload is ("columns", ids, {column: (n, width)}) or, not
        fused, ("captured", [(batch ids, {layer: (A, B)})]) for the pool to factorize."""
        start = time.perf_counter()
        batch_size = self.cfg.data.batch_size
        if fused or self.featurizer.kind == "hidden":
            payload = ("columns", *featurize_chunk(self.featurizer, chunk, batch_size, self.pad_token_id))
        else:
            payload = ("captured", capture_chunk(self.featurizer, chunk, batch_size, self.pad_token_id))
        status = {"shard": shard, "rows": len(chunk), "pid": os.getpid(), "seconds": time.perf_counter() - start}
        return status, payload

    def pid(self) -> int:
        return os.getpid()


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
    """One actor position: the actor now in it and its calls in flight."""

    actor: object
    inflight: set = field(default_factory=set)
    group: object = None  # the placement group of a gradient actor


class IndexPipeline:
    """The actors of one stage-1 run: gradient actors (one per replica) and the factorization pool.

    Attributes:
        gradient_actors: the live gradient actors, by slot (a replacement takes a dead one's slot).
        writer_actors: the live pool members, by slot.
        replaced: how many actors were replaced after dying.
    """

    def __init__(self, cfg: Config, model_path: str):
        import ray

        if cfg.cluster.tp_size != 1:
            raise ConfigError("cluster.tp_size > 1 needs the tensor-parallel gradient actors (lorif_ray.dist.tp)")
        self.cfg, self.model_path = cfg, model_path
        self._gradient_options = actor_options(cfg.cluster, gpu=True, restartable=True)
        self._writer_options = actor_options(cfg.cluster, gpu=False, restartable=True)
        self._gradient_remote = ray.remote(GradientWorker)
        self._writer_remote = ray.remote(ShardWorker)
        self.gradient_slots = []
        for _ in range(cfg.cluster.gradient_actors):
            group = replica_placement_group(cfg.cluster, self._gradient_options)
            self.gradient_slots.append(_Slot(self._new_gradient_actor(group), group=group))
        self.writer_slots: list[_Slot] = []
        self.layout: dict | None = None
        self.replaced = 0

    def _new_gradient_actor(self, group):
        return self._gradient_remote.options(**self._gradient_options, **in_bundle(group, 0)).remote(
            self.cfg, self.model_path)

    def start_writers(self, index_dir: str, layout: dict) -> None:
        """Start the factorization pool once the driver has created the manifest."""
        self.index_dir, self.layout = index_dir, layout
        self.writer_slots = [_Slot(self._writer_remote.options(**self._writer_options).remote(index_dir, layout))
                             for _ in range(self.cfg.cluster.writer_actors)]

    @property
    def gradient_actors(self) -> list:
        return [s.actor for s in self.gradient_slots]

    @property
    def writer_actors(self) -> list:
        return [s.actor for s in self.writer_slots]

    def replace(self, slot: _Slot, error: Exception) -> None:
        """Put a fresh actor in a dead actor's slot (gradient or pool), up to 2 per slot on average."""
        import ray

        self.replaced += 1
        limit = 2 * (len(self.gradient_slots) + len(self.writer_slots))
        if self.replaced > limit:
            raise LorifError(f"stage 1: {self.replaced} actors died (more than {limit}); last: {error}") from error
        ray.kill(slot.actor)
        slot.inflight.clear()
        if slot.group is not None:
            slot.actor = self._new_gradient_actor(slot.group)
        else:
            slot.actor = self._writer_remote.options(**self._writer_options).remote(self.index_dir, self.layout)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for slot in self.gradient_slots + self.writer_slots:
            ray.kill(slot.actor)
        for slot in self.gradient_slots:
            remove_placement_group(slot.group)
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
    import ray

    inputs = resolve_inputs(cfg)
    train_path, examples = train_examples(cfg, load_tokenizer(inputs.model_path))
    chunks = shard_chunks(examples, cfg.shard_size)
    pipeline = IndexPipeline(cfg, str(inputs.model_path))
    try:
        layout = ray.get(pipeline.gradient_actors[0].describe.remote(file_sha256(train_path), len(examples)))
        layout.update(dtype=cfg.dtype, shard_size=cfg.shard_size)
        writer = ShardWriter(cfg.index_path, **layout)  # creates the manifest, or checks the existing one
        pipeline.start_writers(str(cfg.index_path), layout)
        announce(cfg, len(examples), layout["columns"], layout["kind"])
        todo = [i for i in range(len(chunks)) if not writer.is_done(i)]
        skipped = len(chunks) - len(todo)
        start = time.perf_counter()
        with tqdm(total=len(examples), unit="ex", desc="stage 1: index (ray)", disable=not cfg.progress) as bar:
            bar.update(len(examples) - sum(len(chunks[i]) for i in todo))
            computed = _schedule(cfg, pipeline, writer, chunks, todo, bar, on_commit)
        return finish_index(cfg, writer, len(examples), computed=computed, skipped_shards=skipped,
                            seconds=time.perf_counter() - start, gradient_actors=len(pipeline.gradient_slots),
                            writer_actors=len(pipeline.writer_slots), fused=cfg.cluster.fused,
                            replaced_actors=pipeline.replaced)
    finally:
        pipeline.close()


def _schedule(cfg: Config, pipeline: IndexPipeline, writer: ShardWriter, chunks: list, todo: list[int], bar,
              on_commit) -> int:
    """The driver loop: hand out shards, route payloads to the pool, commit records. Returns rows computed."""
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
                status, payload = slot.actor.featurize.options(num_returns=2).remote(shard, chunks[shard], cluster.fused)
                slot.inflight.add(status)
                featurizing[status] = (slot, shard, payload)
                waiting_payloads += 1
        (ready,), _ = ray.wait(list(featurizing) + list(writing), num_returns=1)
        if ready in featurizing:
            slot, shard, payload = featurizing.pop(ready)
            slot.inflight.discard(ready)
            try:
                ray.get(ready)
            except RayActorError as error:  # the actor died for good: redo its shards elsewhere
                pending.extendleft(s for _, s, _ in _drop(featurizing, slot) + [(slot, shard, payload)])
                pipeline.replace(slot, error)
                continue
            except RayTaskError as error:
                raise error.as_instanceof_cause() from None  # e.g. NaN gradients, named by example
            to_write.append((shard, payload))
        else:
            slot, shard, payload = writing.pop(ready)
            slot.inflight.discard(ready)
            try:
                record = ray.get(ready)
            except RayActorError as error:  # the payloads survive their writer: hand them to the new one
                to_write.extendleft((s, p) for _, s, p in _drop(writing, slot) + [(slot, shard, payload)])
                pipeline.replace(slot, error)
                continue
            except ObjectLostError:  # the payload died with its gradient actor's node: featurize again
                pending.appendleft(shard)
                continue
            except RayTaskError as error:
                raise error.as_instanceof_cause() from None
            writer.commit(record)
            computed += record.rows
            bar.update(record.rows)
            if on_commit:
                on_commit(record, pipeline)
    return computed


def _drop(inflight: dict, slot: _Slot) -> list[tuple]:
    """Remove and return the in-flight entries of ``slot`` (its actor died)."""
    refs = [ref for ref, entry in inflight.items() if entry[0] is slot]
    return [inflight.pop(ref) for ref in refs]
