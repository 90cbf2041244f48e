"""Query service (stage 3 over shard owners): resident shards, scatter queries, gather top-k.

Each ``QueryWorker`` owns a consecutive group of shards and loads their rows, in the stacked layout
of the batched scorer, once, on its own device (the GPU Ray gave it, if any). The driver ships each
batch's query columns to every worker with one ``ray.put``; each worker prepares the query-side terms
on its device and returns its top-k per query with *global* row indices (and optionally its block of
the full score matrix); the driver merges. The service stays alive across query batches, and the
driver never loads the model or the curvature.

No worker holds all of V_r unless a batch needs it: each holds V_r of a share of the layers
(balanced by D·r) and a batch takes two scatter-gathers, one in which every worker projects the
queries for its layers and one in which all score. The projection gives g'_q when stage 2 stored g'_t
(``query.store_coordinates``; the curvature term then costs r per pair) and also h_q = V_r(w ⊙ g'_q)
when the batch has fewer queries than r (the query side: nq·D per training row). Only a batch that
must recompute g'_t (normalized scores, or at least r queries, without stored g'_t) makes the
workers read every V_r, once; otherwise the whole curvature (253 GiB at 70B f=64 r=4096) is never
in one process.

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
from lorif_ray.distributed.query_gradients import RemoteQueryFeaturizer
from lorif_ray.distributed.rsvd import DEFAULT_ACTOR_OPTIONS, shard_groups
from lorif_ray.errors import LorifError
from lorif_ray.math.scoring import ScoreLayout, score_in_chunks
from lorif_ray.model.loading import resolve_device
from lorif_ray.model.tensor_parallel import divide_layers
from lorif_ray.stages.coordinates import QueryProjector, coordinates_match, curvature_ranks, load_coordinates
from lorif_ray.stages.curvature import check_method_matches_index, layer_specs, load_curvature
from lorif_ray.stages.fast_query import ResidentIndex
from lorif_ray.stages.inputs import math_dtype, require, resolve_inputs
from lorif_ray.stages.query import TopK, full_scores_file, prepare_query, write_query_outputs
from lorif_ray.store import open_index, read_ids


class QueryWorker:
    """Scores query batches against the resident rows of its shards (a plain class; wrap with ``ray.remote``).

    The worker picks its own device (``model.device``; "auto" = the GPU Ray gave it, else the CPU)
    and the matching scoring dtype and loads its rows once. Of the curvature it holds λ and σ² of every
    layer, and V_r of its share of the layers only (to project queries for the others); all of V_r
    is read only if a batch must recompute g'_t (no stored g'_t, and normalized scores or at least r
    queries). ``QueryService`` picks each batch's route and hands the query terms around.

    Args:
        cfg: the run config (index, curvature, method, query settings, device).
        shards: the consecutive shard indices this worker owns (rows keep their global index).
        projection_layers: the Woodbury layers whose V_r this worker holds to project queries.
        stored_coordinates: score against the stored g'_t of its rows.

    Example:
        >>> worker = QueryWorker(cfg, [0, 1])
        >>> scores, rows, full = worker.score({"columns": query_columns, "k": 5, "full": False,
        ...                                    "route": "recompute"})
        >>> scores.shape, rows.shape            # (nq, 5) each; rows are global row indices
    """

    def __init__(self, cfg: Config, shards: Sequence[int], projection_layers: Sequence[str] = (),
                 stored_coordinates: bool = False):
        self.cfg, self.shards = cfg, list(shards)
        self.device = resolve_device(cfg.model.device)
        self.dtype = math_dtype(self.device)
        self.manifest = manifest = open_index(cfg.index_path)
        self.rows = manifest.row_range(self.shards)
        self.specs = layer_specs(manifest)
        self.curvature, self.layout, coordinates = None, None, None
        if manifest.kind != "hidden":
            self.curvature = load_curvature(cfg, manifest, self.device, self.dtype, vectors=False)
            self.layout = ScoreLayout.build(self.specs, manifest.kind, self.curvature)
        self.projector = QueryProjector(cfg, manifest, projection_layers, self.device) if projection_layers else None
        if stored_coordinates:
            coordinates = load_coordinates(cfg, rows=self.rows, device=self.device, dtype=self.dtype)
        self.index = ResidentIndex.from_index(cfg.index_path, manifest, self.layout, device=self.device,
                                              dtype=self.dtype, coordinates=coordinates, shards=self.shards)
        self.loads, self.all_vectors = 1, False

    @property
    def num_rows(self) -> int:
        return len(self.index.ids)

    def info(self) -> dict:
        """What this worker holds: shards, rows, how often it loaded them, its process id, device, and
        the layers whose V_r it has (``vectors``)."""
        vectors = list(self.projector.vectors) if self.projector is not None else []
        if self.all_vectors:
            vectors = [n for n, c in self.curvature.items() if c.vectors is not None]
        return {"shards": self.shards, "rows": self.num_rows, "loads": self.loads, "pid": os.getpid(),
                "device": str(self.device), "vectors": vectors}

    def project(self, query_columns: dict[str, torch.Tensor], query_side: bool = False) -> dict:
        """This worker's share of the query terms, on the CPU: {"coordinates": {layer: g'_q (nq, r)}} and,
        with ``query_side``, {"terms": {layer: h_q (nq, D)}}."""
        if self.projector is None:
            return {"coordinates": {}, "terms": {}}
        coordinates = self.projector(query_columns)
        terms = self.projector.query_side_terms(coordinates) if query_side else {}
        return {"coordinates": {n: c.cpu() for n, c in coordinates.items()},
                "terms": {n: t.cpu() for n, t in terms.items()}}

    def score(self, payload: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Top-k of one query batch against this worker's rows.

        Args:
            payload: {"columns": query columns {column: (nq, width)} as the featurizer makes them,
                "route": the curvature term's route, "stored" | "query" | "recompute" (``StackedQuery``),
                "coordinates": {layer: g'_q} and "terms": {layer: h_q} (routes stored / query),
                "k": top-k, "full": also return the (nq, rows) block of scores}.

        Returns:
            (scores (nq, k'), global row indices (nq, k'), full block (nq, rows) float32 or None), on
            the CPU, with k' = min(k, rows).
        """
        columns = {k: v.to(device=self.device, dtype=self.dtype) for k, v in payload["columns"].items()}
        num_queries = next(iter(columns.values())).shape[0]
        route = payload.get("route", "recompute")
        if route == "recompute" and self.layout is not None and not self.all_vectors:
            self.curvature = load_curvature(self.cfg, self.manifest, self.device, self.dtype)  # every V_r, once
            self.all_vectors = True
        query, _ = prepare_query(self.manifest, columns, self.curvature, normalize=self.cfg.query.normalize,
                                 keep_vectors=route == "recompute", query_side=route == "query",
                                 query_coordinates=payload.get("coordinates") if route != "recompute" else None,
                                 query_side_terms=payload.get("terms") if route == "query" else None)
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
        self.ranks = curvature_ranks(cfg) if cfg.method.name == "lorif" else {}
        self.stored_coordinates = bool(self.ranks) and coordinates_match(cfg)
        dims = {s.name: s.dim for s in layer_specs(self.manifest)}
        self.projection_layers = divide_layers({n: dims[n] * r for n, r in self.ranks.items()}, len(self.groups))
        remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(QueryWorker)
        self.workers = [remote.remote(cfg, group, share, self.stored_coordinates)
                        for group, share in zip(self.groups, self.projection_layers)]
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
        route = self.route(next(iter(columns.values())).shape[0])
        payload = {"columns": columns, "k": k, "full": full, "route": route}
        if route in ("stored", "query"):  # the query terms: every worker projects its share of the layers
            shared = ray.put(columns)
            parts = ray.get([w.project.remote(shared, route == "query") for w in self.workers])
            for key in ("coordinates", "terms"):
                payload[key] = {name: t for part in parts for name, t in part[key].items()}
        payload = ray.put(payload)
        results = ray.get([w.score.remote(payload) for w in self.workers])
        scores, index = merge_topk([(s, i) for s, i, _ in results], k)
        matrix = None
        if full:
            matrix = np.concatenate([block.numpy() for _, _, block in results], axis=1)  # groups are in input order
        return QueryResult(scores, index, matrix)

    def route(self, num_queries: int) -> str:
        """How a batch of ``num_queries`` gets its curvature term (see ``StackedQuery``): "stored" g'_t,
        the "query" side (fewer queries than every layer's r, not normalized; no V_r needed beyond the
        shares), "recompute" g'_t (the workers then read every V_r once), or "none" (no Woodbury layers)."""
        if not self.ranks:
            return "none"
        if self.stored_coordinates:
            return "stored"
        if not self.cfg.query.normalize and num_queries < min(self.ranks.values()):
            return "query"
        return "recompute"

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
