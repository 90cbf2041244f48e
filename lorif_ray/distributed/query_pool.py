"""Stage 3 on Ray: query actors keep their shards resident, the driver scatters queries and merges top-k.

``ray_query`` is the query backend of ``lorif_ray.stages.query.run_query`` on a cluster: the queries are
featurized on a gradient replica (``RemoteQueryFeaturizer``; the driver never loads the model) and
scored by a ``QueryPool`` — one ``QueryWorker`` per contiguous group of shards, whose rows it reads
once onto its own device (the GPU Ray gave it, if any; ``lorif_ray.stages.rows.layer_rows``, resident) in
the layout of the one batched scorer.
Each worker returns its top-k per query with *global* row indices and writes its columns of the full
score matrix straight into the shared ``scores.npy``; the driver only merges top-k. The service stays
alive across query batches (``serve``).

The driver's bars move as the actors report each batch of query gradients and each block of scored rows
(``lorif_ray.distributed.progress``).

No worker holds all of V_r unless a batch needs it: each holds V_r of a share of the layers (balanced
by D·r) and a batch whose route is "stored" or "query" (``choose_route``, decided by the driver) takes
two scatter-gathers, one in which every worker projects the queries for its layers (g'_q, and h_q for
the query side) and one in which all score. Only the "recompute" route makes the workers read every
V_r, once; otherwise the whole curvature (253 GiB at 70B f=64 r=4096) is never in one process.

Example (needs a running Ray):
    >>> with QueryPool(cfg, CurvatureFolder(cfg.curvature_path), num_workers=2) as pool:
    ...     ends = pool.score(query_columns, "query", k=10)   # workers load their shards once; ends.scores, .index
    ...     again = pool.score(other_columns, "query", k=10)           # reuses the resident shards
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from lorif_ray.config import Config
from lorif_ray.distributed.gram import DEFAULT_ACTOR_OPTIONS, shard_groups
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.distributed.query_gradients import RemoteQueryFeaturizer
from lorif_ray.errors import LorifError
from lorif_ray.model.loading import resolve_device
from lorif_ray.model.tensor_parallel import divide_layers
from lorif_ray.precision import Precision
from lorif_ray.progress import progress_bar
from lorif_ray.stages.coordinates import QueryProjector
from lorif_ray.stages.curvature import load_curvature
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.query import QueryBackend, prepare_query, score_blocks
from lorif_ray.outputs.query_outputs import OutputFiles, TopK
from lorif_ray.stages.rows import layer_rows
from lorif_ray.store import CurvatureFolder, IndexFolder
from lorif_ray.store.curvature_folder import ranks


class QueryWorker:
    """Scores query batches against the resident rows of its shards (a plain class; wrap with ``ray.remote``).

    The worker picks its own device (``model.device``; "auto" = the GPU Ray gave it, else the CPU) and
    the policy's math dtype, and loads its rows once. Of the curvature it holds λ and σ² of every layer,
    and V_r of its share of the layers only (to project queries for the others); all of V_r is read only
    when a batch's route is "recompute".

    Args:
        cfg: the query config (``query_config``: index, curvature settings, method, query settings, device).
        folder: the curvature folder (``CurvatureFolder``: the curvature and its stored g'_t).
        shards: the consecutive shard indices this worker owns (rows keep their global index).
        projection_layers: the low-rank layers whose V_r this worker holds to project queries.
        stored: score against the stored g'_t of its rows.
        progress: a ``Reporter`` (or None) given the row count of each block of rows it loads.

    Example:
        >>> worker = QueryWorker(cfg, CurvatureFolder(cfg.curvature_path), [0, 1])
        >>> ends = worker.score({"columns": query_columns, "k": 5, "route": "recompute"})
        >>> ends.index.shape, ends.low_index.shape   # (nq, 5) each: global rows of the top-k and the bottom-k
    """

    def __init__(self, cfg: Config, folder: CurvatureFolder, shards: Sequence[int],
                 projection_layers: Sequence[str] = (), stored: bool = False, progress=None):
        self.cfg, self.folder, self.shards = cfg, folder, list(shards)
        self.device = resolve_device(cfg.model.device)
        self.precision = Precision.of(cfg, self.device)
        self.index = IndexFolder(cfg.index_path)
        self.manifest = manifest = self.index.manifest()
        self.curvature = load_curvature(folder, cfg, manifest, self.device, self.precision.math, vectors=False)
        self.projector = (QueryProjector(folder, cfg, manifest, projection_layers, self.device)
                          if projection_layers else None)
        coordinates = None
        if stored:
            stored_rows = folder.stored_coordinates()
            coordinates = lambda start, stop: stored_rows.rows(start, stop, dtype=self.precision.math)  # noqa: E731
        self.rows = layer_rows(self.index, manifest, layer_specs(manifest), dtype=self.precision.math,
                               device=self.device, shards=self.shards, resident=True, curvature=self.curvature,
                               coordinates=coordinates, block_rows=cfg.query.train_batch_rows, on_load=progress)
        self.loads, self.all_vectors = 1, False

    def info(self) -> dict:
        """What this worker holds: shards, rows, how often it loaded them, its process id, device, and
        the layers whose V_r it has (``vectors``)."""
        vectors = list(self.projector.vectors) if self.projector is not None else []
        if self.all_vectors:
            vectors = [n for n, c in self.curvature.items() if c.low_rank is not None]
        return {"shards": self.shards, "rows": len(self.rows), "loads": self.loads, "pid": os.getpid(),
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

    def score(self, payload: dict, progress=None) -> TopK:
        """Top-k and bottom-k of one query batch against this worker's rows.

        Args:
            payload: {"columns": query columns {column: (nq, width)}, "route": ``choose_route``'s choice,
                "coordinates": {layer: g'_q} and "terms": {layer: h_q} (routes "stored" / "query"),
                "k": top-k, "files": the shared ``OutputFiles`` to write this worker's columns of, or None}.
            progress: a ``Reporter`` (or None) given each scored block's row count.

        Returns:
            ``TopK`` on the CPU: both ends' scores and global row indices (nq, k'), with k' = min(k, rows).
        """
        columns = {k: v.to(device=self.device, dtype=self.precision.math) for k, v in payload["columns"].items()}
        route = payload.get("route", "recompute")
        if route == "recompute" and self.rows.layout is not None and not self.all_vectors:
            self.curvature = load_curvature(self.folder, self.cfg, self.manifest, self.device,
                                            self.precision.math)  # every V_r
            self.all_vectors = True
        query = prepare_query(self.manifest, columns, self.curvature, route=route,
                              normalize=self.cfg.query.normalize, matmul_dtype=self.precision.matmul,
                              query_coordinates=payload.get("coordinates") if route != "recompute" else None,
                              query_side_terms=payload.get("terms") if route == "query" else None)
        topk = TopK(next(iter(columns.values())).shape[0], min(payload["k"], len(self.rows)), self.device)
        score_blocks(query, self.rows.blocks(), topk, payload.get("files"), progress)
        return topk.cpu()


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Merge per-worker ends (of disjoint rows, global indices) into the overall top-k and bottom-k, exactly."""
    merged = TopK(parts[0].scores.shape[0], k, "cpu")
    for part in parts:
        merged.merge(part)
    return merged


class QueryPool:
    """Long-lived query actors over an index's shards (one contiguous shard group each).

    Args:
        cfg: the query config (``query_config``).
        folder: the curvature folder (``CurvatureFolder``).
        num_workers: number of actors (capped at the number of shards).
        stored: the workers score against stored g'_t (the driver decided they serve this policy).
        actor_options: ``ray.remote`` options of each actor (default ``{"num_cpus": 0.5}``; add
            ``num_gpus`` to keep shards in GPU memory).
    """

    def __init__(self, cfg: Config, folder: CurvatureFolder, num_workers: int, *, stored: bool = False,
                 actor_options: dict | None = None):
        import ray

        self.cfg = cfg
        self.manifest = IndexFolder(cfg.index_path).manifest()
        self.groups = shard_groups(self.manifest, num_workers)
        self.rows = [stop - start for start, stop in (self.manifest.row_range(group) for group in self.groups)]
        self.ranks = ranks(folder.header())
        self.stored = stored
        dims = {s.name: s.dim for s in layer_specs(self.manifest)}
        self.projection_layers = divide_layers({n: dims[n] * r for n, r in self.ranks.items()}, len(self.groups))
        remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(QueryWorker)
        self.info = {"workers": len(self.groups)}
        with progress_bar(self.manifest.num_rows, "stage 3: load rows (ray)", "ex", cfg.progress) as bar:
            progress = ActorProgress(bar.update if cfg.progress else None)
            self.workers = [remote.remote(cfg, folder, group, share, stored, progress.start(i, self.rows[i]))
                            for i, (group, share) in enumerate(zip(self.groups, self.projection_layers))]
            try:  # surface a constructor's error (e.g. a stale curvature file) here, named
                progress.wait([w.info.remote() for w in self.workers], range(len(self.workers)))
                self.stats()
            except ray.exceptions.RayActorError as error:
                self.close()
                raise LorifError(f"a query actor failed to start: {error}") from error

    def score(self, query_columns: dict[str, torch.Tensor], route: str, k: int, files: OutputFiles | None = None
              ) -> TopK:
        """The top-k and bottom-k (``TopK``, (nq, k) each) of one query batch against every shard, in one pass;
        the workers write their columns of the asked-for ``files`` (files every node sees)."""
        import ray

        columns = {c: v.cpu() for c, v in query_columns.items()}
        payload = {"columns": columns, "k": k, "route": route, "files": files}
        if route in ("stored", "query"):  # the query terms: every worker projects its share of the layers
            shared = ray.put(columns)
            parts = ray.get([w.project.remote(shared, route == "query") for w in self.workers])
            for key in ("coordinates", "terms"):
                payload[key] = {name: t for part in parts for name, t in part[key].items()}
        payload = ray.put(payload)
        with progress_bar(self.manifest.num_rows, "stage 3: score (ray)", "ex", self.cfg.progress) as bar:
            progress = ActorProgress(bar.update if self.cfg.progress else None)
            refs = [w.score.remote(payload, progress.start(i, self.rows[i])) for i, w in enumerate(self.workers)]
            progress.wait(refs, range(len(refs)))
        return merge_topk(ray.get(refs), k)

    def stats(self) -> list[dict]:
        """Each worker's ``info()``: shards, rows, load count, pid, device, layers whose V_r it holds."""
        import ray

        return ray.get([w.info.remote() for w in self.workers])

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def __enter__(self) -> "QueryPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ray_query(cfg: Config, manifest, folder: CurvatureFolder, stored: bool, *, num_workers: int,
              actor_options: dict | None = None) -> QueryBackend:
    """The query backend of ``run_query`` on Ray: a gradient replica featurizes, a ``QueryPool`` scores."""
    featurize = RemoteQueryFeaturizer(cfg, manifest)
    try:
        pool = QueryPool(cfg, folder, num_workers, stored=stored, actor_options=actor_options)
        return QueryBackend(featurize, pool)
    except BaseException:
        featurize.close()
        raise

