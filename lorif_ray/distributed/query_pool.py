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
from lorif_ray.footprint import Held, dtype_name, id_bytes, shard_records
from lorif_ray.math.curvature import Curvature
from lorif_ray.model.loading import resolve_device
from lorif_ray.model.tensor_parallel import divide_layers
from lorif_ray.precision import Precision
from lorif_ray.progress import progress_bar
from lorif_ray.stages.coordinates import QueryProjector
from lorif_ray.stages.curvature import fit_settings, load_curvature
from lorif_ray.stages.featurize import LayerSpec
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



# ---------------------------------------------------------------- footprints (what each process holds)

COLUMN_BYTES = 4  # query columns come float32 from the gradient replica that featurized them


def worker_footprint(cfg: Config, specs: list[LayerSpec], *, values: int, rows: int, shards: int, workers: int,
                     num_queries: int, route: str, precision: Precision, where: str,
                     num_rows: int | None = None) -> list[Held]:
    """What one ``QueryWorker`` of ``rows`` resident rows (``values`` store numbers each) holds for a batch of
    ``num_queries``: its rows in the stacked layout (in the math dtype, whatever the storage dtype), stored
    g'_t, V_r of its share of the layers (of ``workers``), and per batch the query terms of the route and one
    block's products."""
    math, matmul = precision.math, precision.matmul
    m, mm, x = dtype_name(math), dtype_name(matmul), math.itemsize
    nq, nt = num_queries, min(cfg.query.train_batch_rows, rows)
    curvature = Curvature.of(cfg.curvature_kind)
    low = specs if curvature.truncates else []
    ranks, dense = sum(min(cfg.r, s.dim) for s in low), sum(s.dim for s in low)
    vectors = x * sum(s.dim * min(cfg.r, s.dim) for s in low)
    held = [shard_records(shards),
            Held(f"its example ids ({rows:,} Python str)", "—", rows * id_bytes()),
            Held(f"its rows, resident in the stacked layout ({rows:,} × {values:,}; stored as {cfg.dtype})", m,
                 rows * values * x, where),
            Held(f"[score] the query batch's columns, and stacked for the products ({nq:,} × {values:,})", m,
                 nq * values * (x + matmul.itemsize), where, "score"),
            Held(f"[score] scores of one block and the running top-k ({nq:,} × ({nt:,} + 2·{cfg.query.top_k}))", m,
                 nq * (2 * nt * x + 2 * cfg.query.top_k * (x + 8)), where, "score")]
    if cfg.method.store_kind == "factors":  # layers of equal (d1, d2, c) are one bmm (RowLayout.factor_groups)
        groups: dict[tuple, list[int]] = {}
        for s in specs:
            groups.setdefault((s.d1, s.d2, s.c), []).append(s.dim)
        if curvature.preconditions:  # ⟨H⁻¹ g_q, vec(Σ u vᵀ)⟩ per group: the group's dense rows of the block
            held += [Held(f"[score] H⁻¹ g_q of every layer ({nq:,} × ΣD)", mm,
                          nq * sum(s.dim for s in specs) * matmul.itemsize, where, "score"),
                     Held("[score] dense rows vec(u vᵀ) of one block, the largest layer group", mm,
                          nt * max(sum(g) for g in groups.values()) * matmul.itemsize, where, "score")]
        else:
            term_one = max(len(dims) * nq * c * nt * c for (_, _, c), dims in groups.items())
            held.append(Held("[score] term 1 of the largest factor group: uᵀu and vᵀv (L × nq·c × nt·c)", m,
                             2 * term_one * (x + (matmul.itemsize if matmul != math else 0)), where, "score"))
    if curvature.preconditions:  # every layer's curvature, as saved
        settings = fit_settings(cfg, math, "cpu", num_rows)  # the curvature as fitted over the index's N rows
        numbers = sum(curvature.saved_numbers(s.d1, s.d2, settings) for s in specs)
        held.append(Held(f"every layer's {curvature.holds}", m, x * numbers, where))
    if low:
        shares = divide_layers({s.name: s.dim * min(cfg.r, s.dim) for s in low}, workers)
        by_name = {s.name: s for s in low}
        share = max(sum(by_name[n].dim * min(cfg.r, by_name[n].dim) for n in names) for names in shares)
        held += [Held(f"λ and σ² of every layer ({ranks:,})", m, ranks * x, where),
                 Held("V_r of its share of the layers, to project queries (divide_layers by D·r)", m, share * x,
                      where),
                 Held(f"[score] g'_q of the queries, concatenated and weighted ({nq:,} × Σr = {ranks:,})", m,
                      nq * ranks * (x + matmul.itemsize), where, "score")]
        if route in ("stored", "query"):
            held.append(Held("[score] g'_q of every layer, received from the driver", m, nq * ranks * x, "host",
                             "score"))
        if route == "stored":
            held.append(Held(f"stored g'_t of its rows ({rows:,} × Σr = {ranks:,}; stored as "
                             f"{cfg.precision.coordinates})", m, rows * ranks * x, where))
        if route == "query":
            held += [Held(f"[score] h_q = V_r(w ⊙ g'_q) of every layer, received ({nq:,} × ΣD = {dense:,})", m,
                          nq * dense * x, "host", "score"),
                     Held("[score] h_q stacked per layer group for the products", mm, nq * dense * matmul.itemsize,
                          where, "score")]
        if route == "recompute":
            held.append(Held("[score] every layer's V_r (read on the first such batch), and stacked per layer group",
                             m, 2 * vectors + (vectors // x * matmul.itemsize if matmul != math else 0), where,
                             "score"))
        if route in ("query", "recompute"):  # _coordinate_rows forms every coordinate group's rows at once
            held.append(Held(f"[score] dense rows vec(u vᵀ) of one block, every low-rank layer at once "
                             f"({nt:,} × ΣD = {dense:,})", m, nt * dense * x, where, "score"))
            if matmul != math:
                coordinate_groups: dict[tuple, int] = {}
                for s in low:
                    key = (s.d1, s.d2, s.c, min(cfg.r, s.dim))
                    coordinate_groups[key] = coordinate_groups.get(key, 0) + s.dim
                held.append(Held("[score] the largest layer group's dense rows cast to the matmul dtype", mm,
                                 nt * max(coordinate_groups.values()) * matmul.itemsize, where, "score"))
    return held


def driver_footprint(cfg: Config, specs: list[LayerSpec], *, values: int, num_examples: int, shards: int,
                     workers: int, num_queries: int, route: str, math: torch.dtype) -> list[Held]:
    """What ``run_query``'s driver holds with ``ray_query``: the query batch's columns (float32, from the
    gradient replica that featurized them), the route's query terms gathered from the query actors and
    scattered back through the object store, the per-actor top-k it merges and the ids of those rows (all N
    ids only for the sidecar of full-score files, not counted)."""
    nq, x, m = num_queries, math.itemsize, dtype_name(math)
    low = specs if Curvature.of(cfg.curvature_kind).truncates else []
    ranks, dense = sum(min(cfg.r, s.dim) for s in low), sum(s.dim for s in low)
    columns = COLUMN_BYTES * nq * values
    k = min(cfg.query.top_k, num_examples)
    held = [shard_records(shards),
            Held(f"[merge] ids of the top-k rows (ids_of_rows: {nq:,} × {k} Python str)", "—", nq * k * id_bytes(),
                 phase="merge"),
            Held(f"the query batch's columns ({nq:,} × {values:,})", "float32", columns),
            Held(f"[merge] top-k of each of {workers} query actors, concatenated", m,
                 2 * workers * nq * k * (x + 8), phase="merge")]
    scattered = columns
    if route in ("stored", "query") and low:
        terms = nq * ranks * x + (nq * dense * x if route == "query" else 0)
        what = "g'_q" + (" and h_q (nq × ΣD)" if route == "query" else "")
        held += [Held("[scatter] the columns put for the query actors to project them", "float32", columns,
                      "object store", "scatter"),
                 Held(f"[scatter] {what} of every layer, gathered from the query actors", m, terms, phase="scatter")]
        scattered += terms
    held.append(Held("[scatter] the batch's payload (columns" + (" and query terms" if scattered > columns else "")
                     + ") put for the query actors", m, scattered, "object store", "scatter"))
    return held
