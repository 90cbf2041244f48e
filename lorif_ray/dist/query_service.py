"""Query service (stage 3 over shard owners): resident shards, scatter queries, gather top-k.

Each ``QueryWorker`` owns a consecutive group of shards and loads their rows, in the stacked layout
of the batched scorer, once, on its own device (the GPU Ray gave it, if any). The driver ships each
batch's query columns to every worker with one ``ray.put``; each worker prepares the query-side terms
on its device and returns its top-k per query with *global* row indices (and optionally its block of
the full score matrix); the driver merges. The service stays alive across query batches, and the
driver never loads the model or the curvature.

With stored g'_t (stage 2 with ``query.store_coordinates=true``) the workers hold no V_r for scoring:
each holds V_r of a share of the layers only, and a query batch takes two scatter-gathers, one that
projects the queries (g'_q = V_rᵀ g_q, every worker its layers) and one that scores. The whole
curvature is then never in one process (253 GiB at 70B f=64 r=4096, split over the query actors).

Example (needs a running Ray):
    >>> with QueryService(cfg, num_workers=2) as service:
    ...     first = service.query(query_columns)      # workers load their shards here, once
    ...     second = service.query(other_columns)     # reuses the resident shards
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from lorif_ray.config import Config
from lorif_ray.dist.query_gradients import RemoteQueryFeaturizer
from lorif_ray.dist.rsvd import DEFAULT_ACTOR_OPTIONS, shard_groups
from lorif_ray.errors import LorifError
from lorif_ray.math.scoring import RepSimQuery, ScoreLayout, StackedQuery, score_in_chunks
from lorif_ray.model.loading import resolve_device
from lorif_ray.model.tensor_parallel import divide_layers
from lorif_ray.stages.coordinates import QueryProjector, coordinates_match, curvature_ranks, load_coordinates
from lorif_ray.stages.curvature import check_method_matches_index, layer_specs, load_curvature
from lorif_ray.stages.fast_query import ResidentIndex
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import math_dtype, require, resolve_inputs
from lorif_ray.stages.query import TopK, full_scores_file, write_query_outputs
from lorif_ray.store import open_index, read_ids


class QueryWorker:
    """Scores query batches against the resident rows of its shards (a plain class; wrap with ``ray.remote``).

    The worker picks its own device (``model.device``; "auto" = the GPU Ray gave it, else the CPU)
    and the matching scoring dtype, loads its rows and the curvature once, and builds each batch's
    query-side terms itself, so nothing device-specific crosses the wire.

    Args:
        cfg: the run config (index, curvature, method, query settings, device).
        shards: the consecutive shard indices this worker owns (rows keep their global index).
        projection_layers: with stored g'_t, the layers whose V_r this worker holds to project queries
            (``project``); None = no stored g'_t: the worker holds every V_r and computes g'_t itself.

    Example:
        >>> worker = QueryWorker(cfg, [0, 1])
        >>> scores, rows, full = worker.score({"columns": query_columns, "k": 5, "full": False})
        >>> scores.shape, rows.shape            # (nq, 5) each; rows are global row indices
    """

    def __init__(self, cfg: Config, shards: Sequence[int], projection_layers: Sequence[str] | None = None):
        self.cfg, self.shards = cfg, list(shards)
        self.device = resolve_device(cfg.model.device)
        self.dtype = math_dtype(self.device)
        self.manifest = manifest = open_index(cfg.index_path)
        self.rows = manifest.row_range(self.shards)
        self.specs = layer_specs(manifest)
        self.stored_coordinates = projection_layers is not None
        self.curvature, self.layout, self.projector, coordinates = None, None, None, None
        if manifest.kind != "hidden":
            self.curvature = load_curvature(cfg, manifest, self.device, self.dtype,
                                            vectors=not self.stored_coordinates)
            self.layout = ScoreLayout.build(self.specs, manifest.kind, self.curvature)
        if self.stored_coordinates:
            coordinates = load_coordinates(cfg, rows=self.rows, device=self.device, dtype=self.dtype)
            self.projector = QueryProjector(cfg, manifest, projection_layers, self.device) if projection_layers \
                else None
        self.index = ResidentIndex.from_index(cfg.index_path, manifest, self.layout, device=self.device,
                                              dtype=self.dtype, coordinates=coordinates, shards=self.shards)
        self.loads = 1

    @property
    def num_rows(self) -> int:
        return len(self.index.ids)

    def info(self) -> dict:
        """What this worker holds: shards, rows, how often it loaded them, its process id, device, and
        whether it holds V_r (``vectors``: the layers whose V_r it has)."""
        vectors = [] if self.curvature is None else [n for n, c in self.curvature.items() if c.vectors is not None]
        if self.projector is not None:
            vectors = list(self.projector.vectors)
        return {"shards": self.shards, "rows": self.num_rows, "loads": self.loads, "pid": os.getpid(),
                "device": str(self.device), "vectors": vectors}

    def project(self, query_columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """g'_q {layer: (nq, r)} of this worker's projection layers, on the CPU."""
        if self.projector is None:
            return {}
        return {name: c.cpu() for name, c in self.projector(query_columns).items()}

    def score(self, payload: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Top-k of one query batch against this worker's rows.

        Args:
            payload: {"columns": query columns {column: (nq, width)} as the featurizer makes them,
                "coordinates": {layer: g'_q (nq, r)} (with stored g'_t), "k": top-k,
                "full": also return the (nq, rows) block of scores}.

        Returns:
            (scores (nq, k'), global row indices (nq, k'), full block (nq, rows) float32 or None), on
            the CPU, with k' = min(k, rows).
        """
        columns = {k: v.to(device=self.device, dtype=self.dtype) for k, v in payload["columns"].items()}
        num_queries = next(iter(columns.values())).shape[0]
        if self.layout is None:
            query = RepSimQuery(columns["hidden"])
        else:
            query = StackedQuery(self.layout, blocks_from_columns(self.specs, self.manifest.kind, columns),
                                 self.curvature, normalize=self.cfg.query.normalize,
                                 keep_vectors=not self.stored_coordinates,
                                 query_coordinates=payload.get("coordinates"))
        topk = TopK(num_queries, min(payload["k"], self.num_rows), self.device)
        blocks = []
        score_in_chunks(query, self.index.block, topk, chunk_rows=self.cfg.query.train_batch_rows,
                        sink=(lambda scores, _: blocks.append(scores.float().cpu())) if payload["full"] else None)
        full = None
        if payload["full"]:
            full = torch.cat(blocks, dim=1) if blocks else torch.zeros(num_queries, 0)
        return topk.scores.cpu(), (topk.index + self.rows[0]).cpu(), full


@dataclass
class QueryResult:
    """Merged answer for one query batch.

    Attributes:
        scores: (nq, k) best scores, descending.
        index: (nq, k) global training row indices (rows of the index in input order).
        full: (nq, N) float32 scores in input order, or None.
    """

    scores: torch.Tensor
    index: torch.Tensor
    full: np.ndarray | None = None


def merge_topk(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-worker (scores (nq, k_w), global index (nq, k_w)) into the overall top-k."""
    scores = torch.cat([s for s, _ in parts], dim=1)
    index = torch.cat([i for _, i in parts], dim=1)
    best = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return best.values, torch.gather(index, 1, best.indices)


class QueryService:
    """Long-lived query actors over an index's shards (one contiguous shard group each).

    Args:
        cfg: the run config (index path, method, query settings, device).
        num_workers: number of actors (capped at the number of shards).
        actor_options: ``ray.remote`` options of each actor (default ``{"num_cpus": 0.5}``; add
            ``num_gpus`` to keep shards in GPU memory).
    """

    def __init__(self, cfg: Config, num_workers: int, *, actor_options: dict | None = None):
        import ray

        self.cfg = cfg
        self.manifest = open_index(cfg.index_path)
        check_method_matches_index(cfg.method.name, self.manifest, cfg.index_path)
        self.groups = shard_groups(self.manifest, num_workers)
        self.projection_layers = projection_shares(cfg, self.manifest, len(self.groups))
        remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(QueryWorker)
        shares = self.projection_layers or [None] * len(self.groups)
        self.workers = [remote.remote(cfg, group, share) for group, share in zip(self.groups, shares)]
        self._train_ids: list[str] | None = None
        try:  # surface a constructor's error (e.g. a stale curvature file) here, named
            self.stats()
        except ray.exceptions.RayActorError as error:
            self.close()
            raise LorifError(f"a query actor failed to start: {error}") from error

    @property
    def train_ids(self) -> list[str]:
        """Example ids of every training row, in input order (read once, only the id column)."""
        if self._train_ids is None:
            self._train_ids = read_ids(self.cfg.index_path, self.manifest)
        return self._train_ids

    def query(self, query_columns: dict[str, torch.Tensor], *, full_scores: bool | None = None) -> QueryResult:
        """Score one batch of query columns (as the featurizer makes them) against every shard.

        Example:
            >>> result = service.query(query_columns)
            >>> [service.train_ids[i] for i in result.index[0]]   # best training examples of query 0
        """
        import ray

        full = self.cfg.query.full_scores if full_scores is None else full_scores
        k = min(self.cfg.query.top_k, self.manifest.num_rows)
        columns = {k: v.cpu() for k, v in query_columns.items()}
        payload = {"columns": columns, "k": k, "full": full}
        if self.projection_layers is not None:  # g'_q: every worker projects its layers' share
            shared = ray.put(columns)
            payload["coordinates"] = {name: c for part in ray.get([w.project.remote(shared) for w in self.workers])
                                      for name, c in part.items()}
        payload = ray.put(payload)
        results = ray.get([w.score.remote(payload) for w in self.workers])
        scores, index = merge_topk([(s, i) for s, i, _ in results], k)
        matrix = None
        if full:
            matrix = np.concatenate([block.numpy() for _, _, block in results], axis=1)  # groups are in input order
        return QueryResult(scores, index, matrix)

    def stats(self) -> list[dict]:
        """Each worker's ``info()``: shards, rows, load count, pid, device, layers whose V_r it holds."""
        import ray

        return ray.get([w.info.remote() for w in self.workers])

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def __enter__(self) -> "QueryService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def projection_shares(cfg: Config, manifest, num_workers: int) -> list[list[str]] | None:
    """With stored g'_t matching the curvature: the Woodbury layers each worker projects queries for,
    balanced by the size of V_r (D·r); None when there are none (workers then hold every V_r)."""
    if cfg.method.name != "lorif" or not coordinates_match(cfg):
        return None
    ranks = curvature_ranks(cfg)
    dims = {s.name: s.dim for s in layer_specs(manifest)}
    return divide_layers({name: dims[name] * rank for name, rank in ranks.items()}, num_workers)


def write_result(cfg: Config, query_ids: list[str], train_ids: list[str], result: QueryResult) -> dict:
    """``topk.parquet`` (and, with full scores, ``scores.npy`` + ``scores.json``) in ``cfg.output_dir``."""
    with full_scores_file(cfg, (len(query_ids), len(train_ids))) as full:
        if full is not None:
            full[:] = result.full
    return write_query_outputs(cfg, query_ids, train_ids, result.scores, result.index)


def run_query_distributed(cfg: Config, num_workers: int, *, actor_options: dict | None = None) -> dict:
    """Stage 3 through a ``QueryService``: writes the same ``topk.parquet`` (and ``scores.npy`` +
    ``scores.json`` with ``query.full_scores``) as ``run_query(cfg)``.

    Example:
        >>> ray.init(num_cpus=4)
        >>> run_query_distributed(cfg, num_workers=4)["topk_path"]
    """
    manifest = open_index(cfg.index_path)
    check_method_matches_index(cfg.method.name, manifest, cfg.index_path)
    with RemoteQueryFeaturizer(cfg, manifest) as featurize:  # on a gradient replica: the driver loads no model
        query_ids, query_columns, query_seconds = featurize(require(resolve_inputs(cfg).queries_path, "data.queries"))
    start = time.perf_counter()
    with QueryService(cfg, num_workers, actor_options=actor_options) as service:
        result = service.query(query_columns)
        report = write_result(cfg, query_ids, service.train_ids, result)
    return {**report, "workers": len(service.groups), "query_gradient_seconds": query_seconds,
            "score_seconds": time.perf_counter() - start}


def serve(cfg: Config, query_files: Iterable[str], num_workers: int, *, actor_options: dict | None = None
          ) -> Iterator[dict]:
    """Answer query files one after another with one long-lived service (model and shards loaded once).

    Batch n's outputs go to ``<output_dir>/serve/<n>-<file stem>/``. A bad query file yields an
    error report and the service goes on.

    Yields:
        per batch {"batch", "queries", "topk_path", "queries_count", "seconds", "shard_loads"} or
        {"batch", "queries", "error"}.
    """
    manifest = open_index(cfg.index_path)
    check_method_matches_index(cfg.method.name, manifest, cfg.index_path)
    with RemoteQueryFeaturizer(cfg, manifest) as featurize, \
            QueryService(cfg, num_workers, actor_options=actor_options) as service:
        for batch, line in enumerate(q.strip() for q in query_files):
            if not line:
                continue
            start = time.perf_counter()
            try:
                query_ids, columns, _ = featurize(Path(line))
                out = replace(cfg, output_dir=str(Path(cfg.output_dir) / "serve" / f"{batch}-{Path(line).stem}"))
                report = write_result(out, query_ids, service.train_ids, service.query(columns))
            except (LorifError, OSError) as error:
                yield {"batch": batch, "queries": line, "error": f"{type(error).__name__}: {error}"}
                continue
            yield {"batch": batch, "queries": line, "topk_path": report["topk_path"],
                   "queries_count": report["queries"], "seconds": time.perf_counter() - start,
                   "shard_loads": sum(s["loads"] for s in service.stats())}
