"""Stage 3: score queries against every indexed training example; write top-k (and full scores).

One driver for every placement of the rows. ``run_query`` opens the index, pins every row-shaping setting
to the index's (``query_config``), checks that the saved curvature is the one this config asks for, and
hands the queries to a *query backend*: it featurizes them exactly like the index, the driver chooses
the curvature term's route once (``choose_route``: stored g'_t, query side, or recompute, recorded in
the report), and the backend scores every training row with the one batched scorer
(``lorif_ray.math.scoring.StackedQuery``) into a running top-k. ``local_query`` keeps the model and the
rows in this process (streamed shard by shard, or resident with ``query.resident``); on Ray,
``lorif_ray.distributed.query_service.ray_query`` does the same across query actors.

Outputs in ``output_dir``: ``topk.parquet`` (query_id, rank, train_id, score; its metadata holds the
config used, the route and the precision) and, with ``query.full_scores``, ``scores.npy`` (float32,
queries × train, input order, written by whoever scores the rows) + ``scores.json``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import ConfigError
from lorif_ray.math.scoring import RepSimQuery, ScoreLayout, StackedQuery, TrainBlock, choose_route
from lorif_ray.model.loading import check_same_model, load_model, model_identity, resolve_device
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.stages.coordinates import StoredCoordinates, coordinates_dir, coordinates_match
from lorif_ray.stages.index import build_featurizer, quiet_transformers
from lorif_ray.stages.inputs import layer_specs, query_config, require, resolve_inputs, tokenized
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.rows import ResidentIndex, streamed_blocks
from lorif_ray.stages.saved_curvature import check_curvature, load_curvature, ranks
from lorif_ray.store import atomic_path, open_index, read_ids, write_json, write_table
from lorif_ray.store.artifacts import preallocated_memmap

log = logging.getLogger(__name__)


class TopK:
    """Running top-k per query over streamed blocks of scores."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.scores = torch.full((num_queries, 0), float("-inf"), device=device)
        self.index = torch.zeros((num_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge (nq, nb) scores of training rows offset … offset + nb − 1."""
        columns = torch.arange(offset, offset + scores.shape[1], device=scores.device).expand_as(scores)
        merged = torch.cat([self.scores.to(scores.dtype), scores], dim=1)
        merged_index = torch.cat([self.index, columns], dim=1)
        best = torch.topk(merged, min(self.k, merged.shape[1]), dim=1)
        self.scores, self.index = best.values, torch.gather(merged_index, 1, best.indices)


class ScoreFile:
    """Writes column blocks of the (nq, N) float32 score matrix made by ``full_scores_file``; any process
    that sees the file may write its own rows' columns."""

    def __init__(self, path):
        self.array = np.load(path, mmap_mode="r+")

    def __call__(self, scores: torch.Tensor, offset: int) -> None:
        self.array[:, offset:offset + scores.shape[1]] = scores.float().cpu().numpy()

    def close(self) -> None:
        self.array.flush()
        del self.array


def score_blocks(query: StackedQuery | RepSimQuery, blocks: Iterable[tuple[int, list[str], TrainBlock]], topk: TopK,
                 sink: ScoreFile | None = None, on_block=None) -> None:
    """Score (global offset, ids, block) triples into ``topk`` (and the full-score ``sink``)."""
    for offset, ids, block in blocks:
        scores = query.scores(block)
        topk.update(scores, offset)
        if sink is not None:
            sink(scores, offset)
        if on_block is not None:
            on_block(len(ids))


def prepare_query(manifest, query_columns: dict[str, torch.Tensor], curvature: dict | None, *, route: str,
                  normalize: bool, **options) -> tuple[StackedQuery | RepSimQuery, ScoreLayout | None]:
    """The batched scorer of one query batch and the layout its training blocks take (None: RepSim,
    whose blocks are ``TrainBlock(dense=hidden)``); ``options`` go to ``StackedQuery``."""
    if manifest.kind == "hidden":
        return RepSimQuery(query_columns["hidden"]), None
    specs = layer_specs(manifest)
    layout = ScoreLayout.build(specs, manifest.kind, curvature)
    blocks = blocks_from_columns(specs, manifest.kind, query_columns)
    return StackedQuery(layout, blocks, curvature, route=route, normalize=normalize, **options), layout


class QueryFeaturizer:
    """Loads the model once and featurizes query files exactly like the index (``query_config``), taking each
    query's gradient of ``query.measurement`` (training rows: always the summed loss).

    Args:
        measurement: a function ``(model outputs, batch) → (B,)`` to use instead of ``query.measurement``
            (which then reads ``custom:<name>``, set by ``lorif_ray.api``).

    Raises:
        ModelMismatchError / IndexMismatchError: the model or a row-shaping setting differs from the index's.
        ConfigError: ``query.measurement`` names a function but none is given.
    """

    def __init__(self, cfg: Config, manifest, measurement=None):
        cfg = query_config(cfg, manifest)
        if measurement is None and cfg.query.measurement.startswith("custom:"):
            raise ConfigError(f"query.measurement={cfg.query.measurement}: pass the function (Python API) or "
                              "choose one of loss, logprob, mean_loss")
        with quiet_transformers():
            model, self.tokenizer = load_model(resolve_inputs(cfg).model_path, dtype=cfg.model.dtype,
                                               device=cfg.model.device, adapter=cfg.model.adapter)
        check_same_model(manifest.meta["model"], model_identity(model), f"index {cfg.index_path}")
        self.featurizer = build_featurizer(cfg, model, kind=manifest.kind,
                                           layer_names=[s.name for s in layer_specs(manifest)])
        self.featurizer.measurement = measurement or cfg.query.measurement
        self.max_length, self.batch_size = manifest.meta["config"]["max_length"], cfg.data.batch_size

    def __call__(self, queries_path: Path) -> tuple[list[str], dict[str, torch.Tensor], float]:
        """Query ids, query columns {column: (nq, width)} (float32, CPU), and seconds."""
        queries = tokenized(Path(queries_path), self.tokenizer, self.max_length)
        if not queries:
            raise ConfigError(f"{queries_path} holds no queries")
        start = time.perf_counter()
        parts = [self.featurizer(ids, batch)
                 for ids, batch in token_batches(queries, self.batch_size, self.tokenizer.pad_token_id)]
        columns = {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}
        return [q.id for q in queries], columns, time.perf_counter() - start

    def close(self) -> None:
        pass


def featurize_queries(cfg: Config, manifest) -> tuple[list[str], dict[str, torch.Tensor], float]:
    """Query ids, query columns and seconds of ``data.queries``, in this process."""
    return QueryFeaturizer(cfg, manifest)(require(resolve_inputs(cfg).queries_path, "data.queries"))


class LocalScorer:
    """Scores query batches in this process: the rows streamed shard by shard, or (``query.resident``)
    read once and kept on the device; the curvature loaded once, V_r included.

    Args:
        cfg: the query config (``query_config``); device from ``model.device``.
    """

    def __init__(self, cfg: Config, manifest, stored: bool):
        self.cfg, self.manifest = cfg, manifest
        self.device = resolve_device(cfg.model.device)
        self.precision = Precision.of(cfg, self.device)
        self.curvature = load_curvature(cfg, manifest, self.device, self.precision.math)
        specs = layer_specs(manifest)
        self.layout = None if manifest.kind == "hidden" else ScoreLayout.build(specs, manifest.kind, self.curvature)
        self.coordinates = StoredCoordinates(cfg) if stored else None
        self.resident: ResidentIndex | None = None
        self.info: dict = {}
        if cfg.query.resident:
            start = time.perf_counter()
            self.resident = ResidentIndex.from_index(cfg.index_path, manifest, self.layout, device=self.device,
                                                     dtype=self.precision.math, coordinates=self._stored_rows())
            self.info = {"load_seconds": time.perf_counter() - start, "resident_bytes": self.resident.nbytes()}

    def _stored_rows(self):
        if self.coordinates is None:
            return None
        return lambda start, stop: self.coordinates.rows(start, stop, dtype=self.precision.math)

    def score(self, query_columns: dict[str, torch.Tensor], route: str, k: int, full_path=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores (nq, k), global row indices (nq, k)) of one query batch; full scores into ``full_path``."""
        columns = {c: v.to(device=self.device, dtype=self.precision.math) for c, v in query_columns.items()}
        query, _ = prepare_query(self.manifest, columns, self.curvature, route=route,
                                 normalize=self.cfg.query.normalize, matmul_dtype=self.precision.matmul)
        num_queries, num_train = next(iter(columns.values())).shape[0], self.manifest.num_rows
        topk = TopK(num_queries, min(k, num_train), self.device)
        if self.resident is not None:
            blocks = self.resident.blocks(self.cfg.query.train_batch_rows)
        else:
            blocks = streamed_blocks(self.cfg.index_path, self.manifest, self.layout, dtype=self.precision.math,
                                     device=self.device, batch_rows=self.cfg.query.train_batch_rows,
                                     coordinates=self._stored_rows() if route == "stored" else None)
        sink = ScoreFile(full_path) if full_path is not None else None
        with tqdm(total=num_train, unit="ex", desc="stage 3: score", disable=not self.cfg.progress) as bar:
            score_blocks(query, blocks, topk, sink, bar.update)
        if sink is not None:
            sink.close()
        return topk.scores, topk.index

    def close(self) -> None:
        pass


class QueryBackend:
    """What ``run_query`` drives: a featurizer (query file → ids, columns, seconds) and a scorer
    (``score(columns, route, k, full_path)``, ``info``); closing it releases both."""

    def __init__(self, featurize, scorer):
        self.featurize, self.scorer, self.info = featurize, scorer, scorer.info

    def score(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer.score(*args, **kwargs)

    def close(self) -> None:
        self.featurize.close()
        self.scorer.close()


def local_query(cfg: Config, manifest, stored: bool) -> QueryBackend:
    """The query backend of one process: the model for query gradients and a ``LocalScorer``."""
    return QueryBackend(QueryFeaturizer(cfg, manifest), LocalScorer(cfg, manifest, stored))


def open_query(cfg: Config) -> tuple[Config, object, dict, bool]:
    """The query config pinned to the index, the manifest, the curvature header (checked against the
    config), and whether stored g'_t in the policy's dtype can serve the curvature term."""
    manifest = open_index(cfg.index_path)
    cfg = query_config(cfg, manifest)
    header = check_curvature(cfg, manifest)
    warn_if_unsafe(cfg)
    stored = bool(ranks(header)) and coordinates_match(cfg, cfg.precision.coordinates)
    if ranks(header) and not stored and coordinates_match(cfg):
        log.warning("stored g'_t in %s are not in precision.coordinates=%s: not used (re-run stage 2 to store "
                    "them in that dtype)", coordinates_dir(cfg), cfg.precision.coordinates)
    return cfg, manifest, header, stored


def run_query(cfg: Config, make_backend=local_query) -> dict:
    """Score ``data.queries`` against the index; returns a report with the output paths.

    Args:
        make_backend: ``(cfg, manifest, stored) →`` a ``QueryBackend``; default ``local_query`` (this process).
    """
    cfg, manifest, header, stored = open_query(cfg)
    backend = make_backend(cfg, manifest, stored)
    try:
        return answer(cfg, manifest, header, stored, backend, require(resolve_inputs(cfg).queries_path, "data.queries"))
    finally:
        backend.close()


def answer(cfg: Config, manifest, header: dict, stored: bool, backend, queries_path: Path,
           train_ids: list[str] | None = None) -> dict:
    """One query file through ``backend``: featurize, choose the route, score, write the outputs."""
    query_ids, columns, query_seconds = backend.featurize(queries_path)
    route = choose_route(len(query_ids), list(ranks(header).values()), stored=stored,
                         normalize=cfg.query.normalize)
    start = time.perf_counter()
    with full_scores_file(cfg, (len(query_ids), manifest.num_rows)) as full_path:
        scores, index = backend.score(columns, route, min(cfg.query.top_k, manifest.num_rows), full_path)
    train_ids = train_ids if train_ids is not None else read_ids(cfg.index_path, manifest)
    precision = Precision.of(cfg, resolve_device(cfg.model.device)).describe()
    report = write_query_outputs(cfg, header, query_ids, train_ids, scores, index, route=route, precision=precision)
    return {**report, **backend.info, "route": route, "precision": precision, "query_gradient_seconds": query_seconds,
            "score_seconds": time.perf_counter() - start}


def write_query_outputs(cfg: Config, header: dict, query_ids: list[str], train_ids: list[str], scores: torch.Tensor,
                        index: torch.Tensor, **facts) -> dict:
    """``topk.parquet`` from (nq, k) scores and row indices, and ``scores.json`` next to ``scores.npy``;
    both record the config used and ``facts`` (route, precision)."""
    output_dir = Path(cfg.output_dir)
    meaning = NORMALIZED_MEANING if cfg.query.normalize else SCORE_MEANING[header.get("kind", "none")]
    meta = {"config": cfg.to_dict(), "index": str(cfg.index_path), "score": meaning, **facts}
    write_table(output_dir / "topk.parquet", topk_table(query_ids, train_ids, scores, index), meta)
    if cfg.query.full_scores:
        write_json(output_dir / "scores.json", {**meta, "query_ids": query_ids, "train_ids": train_ids})
    return {"topk_path": str(output_dir / "topk.parquet"),
            "scores_path": str(output_dir / "scores.npy") if cfg.query.full_scores else None,
            "queries": len(query_ids), "train": len(train_ids)}


SCORE_MEANING = {  # by curvature
    "woodbury": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (truncated SVD + Woodbury); > 0: proponent (training on t "
                "lowers the query loss); ~ rise of the query loss (nats) if t were left out",
    "exact": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (exact per-layer inverse); > 0: proponent; ~ rise of the "
             "query loss (nats) if t were left out",
    "identity": "g_q^T g_t (no curvature); > 0: proponent; unscaled",
    "none": "cosine of last-layer last-token hidden states in [-1, 1]; similarity, not influence",
}
NORMALIZED_MEANING = "I(t,q) / sqrt(I(t,t) I(q,q)) in [-1, 1]; > 0: proponent"


def topk_table(query_ids: list[str], train_ids: list[str], scores: torch.Tensor, index: torch.Tensor) -> pa.Table:
    """One row per (query, rank) from (nq, k) scores and training row indices."""
    scores, index = scores.float().cpu().numpy(), index.cpu().numpy()
    k = scores.shape[1]
    return pa.table({
        "query_id": pa.array(np.repeat(query_ids, k).tolist(), pa.string()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), len(query_ids)), pa.int32()),
        "train_id": pa.array([train_ids[i] for i in index.reshape(-1)], pa.string()),
        "score": pa.array(scores.reshape(-1), pa.float32()),
    })


@contextmanager
def full_scores_file(cfg: Config, shape: tuple[int, int]):
    """The path of a float32 (nq, N) .npy that replaces ``<output_dir>/scores.npy`` only on success (None
    unless ``query.full_scores``); its bytes are allocated up front, so a full disk fails here."""
    if not cfg.query.full_scores:
        yield None
        return
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(cfg.output_dir) / "scores.npy") as tmp:
        scores = preallocated_memmap(tmp, np.float32, shape)
        scores.flush()
        del scores
        yield tmp

