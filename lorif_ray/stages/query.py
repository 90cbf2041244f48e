"""Stage 3: score queries against every indexed training example; write top-k (and full scores).

One driver for every placement of the rows. ``run_query`` opens the index, pins every row-shaping setting
to the index's (``query_config``), checks that the saved curvature is the one this config asks for, and
hands the queries to a *query backend*: it featurizes them exactly like the index, the driver chooses
the curvature term's route once (``choose_route``: stored g'_t, query side, or recompute, recorded in
the report), and the backend scores every training row with the one batched scorer
(``lorif_ray.math.scoring.StackedQuery``) into a running top-k. ``local_query`` keeps the model and the
rows in this process (streamed shard by shard, or resident with ``query.resident``); on Ray,
``lorif_ray.distributed.query_pool.ray_query`` does the same across query actors.

The queries are read and featurized by ``lorif_ray.stages.queries``; the running ends, the full-score files and
the query run's tables (``topk``, ``opponents``, ``queries``, ``report.html``, as asked the full scores, the token
rows' tables, the per-layer scores and the self-influence) are ``lorif_ray.outputs.query_outputs``'.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from lorif_ray.config import Config
from lorif_ray.data import TrainTexts, load_examples
from lorif_ray.errors import ConfigError, DataError
from lorif_ray.math.blocks import RowLayout, TrainBlock
from lorif_ray.math.curvature import Curvature
from lorif_ray.math.scoring import RepSimQuery, StackedQuery, choose_route
from lorif_ray.model.loading import resolve_device
from lorif_ray.outputs.query_outputs import (NORMALIZED_MEANING, BlockOutputs, IndexRowIds, OutputFiles, TableRowIds,
                                            TopK, output_files, write_query_outputs, write_self_influence)
from lorif_ray.outputs.report_page import write_report_page
from lorif_ray.outputs.summary import expected_sources
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.progress import progress_bar
from lorif_ray.stages.curvature import check_curvature, load_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs, query_config, require, resolve_inputs
from lorif_ray.stages.queries import QueryFeaturizer
from lorif_ray.stages.rows import ResidentRows, layer_rows
from lorif_ray.store import CurvatureFolder, IndexFolder, writer_lock
from lorif_ray.store.curvature_folder import ranks
from lorif_ray.store.query_run import QueryRun
from lorif_ray.store.schema import HIDDEN_COLUMN

log = logging.getLogger(__name__)

QUERY_WRITER = ("query", "stage 3 (jobs/query.py)")  # ``writer_lock(cfg.output_dir, *QUERY_WRITER)``


def score_blocks(query: StackedQuery | RepSimQuery, blocks: Iterable[TrainBlock], topk: TopK,
                 files: OutputFiles | None = None, on_block=None) -> None:
    """Score the blocks of a row source's pass into ``topk`` (and the asked-for ``files``), each at its global
    offset; ``on_block`` gets each block's row count."""
    outputs = BlockOutputs(files)
    try:
        for block in blocks:
            topk.update(outputs(query, block, block.offset), block.offset)
            if on_block is not None:
                on_block(len(block))
    finally:
        outputs.close()


def prepare_query(manifest, query_columns: dict[str, torch.Tensor], curvature: dict | None, *, route: str,
                  normalize: bool, **options) -> StackedQuery | RepSimQuery:
    """The batched scorer of one query batch, for the training blocks of ``layer_rows(..., curvature=curvature)``
    (RepSim: blocks of hidden states); ``options`` go to ``StackedQuery``."""
    if manifest.kind == "hidden":
        return RepSimQuery(query_columns[HIDDEN_COLUMN])
    specs = layer_specs(manifest)
    layout = RowLayout.build(specs, manifest.kind, curvature)
    blocks = blocks_from_columns(specs, manifest.kind, query_columns)
    return StackedQuery(layout, blocks, curvature, route=route, normalize=normalize, **options)


class LocalScorer:
    """Scores query batches in this process: the rows streamed shard by shard, or (``query.resident``)
    read once and kept on the device (``layer_rows``); the curvature loaded once from its folder, V_r included.

    Args:
        cfg: the query config (``query_config``); device from ``model.device``.
        folder: the curvature folder (``CurvatureFolder``).
        stored: the blocks carry the folder's stored g'_t (route "stored").
    """

    def __init__(self, cfg: Config, manifest, folder: CurvatureFolder, stored: bool):
        self.cfg, self.manifest = cfg, manifest
        self.device = resolve_device(cfg.model.device)
        self.precision = Precision.of(cfg, self.device)
        self.curvature = load_curvature(folder, cfg, manifest, self.device, self.precision.math)
        coordinates = None
        if stored:
            stored_rows = folder.stored_coordinates()
            coordinates = lambda start, stop: stored_rows.rows(start, stop, dtype=self.precision.math)  # noqa: E731
        start = time.perf_counter()
        loading = progress_bar(manifest.num_rows, "stage 3: load rows", "ex", cfg.progress) if cfg.query.resident \
            else nullcontext()
        with loading as bar:
            self.rows = layer_rows(IndexFolder(cfg.index_path), manifest, layer_specs(manifest),
                                   dtype=self.precision.math,
                                   device=self.device, batch_rows=cfg.query.train_batch_rows,
                                   resident=cfg.query.resident, curvature=self.curvature, coordinates=coordinates,
                                   block_rows=cfg.query.train_batch_rows, on_load=None if bar is None else bar.update)
        self.info: dict = {}
        if isinstance(self.rows, ResidentRows):
            self.info = {"load_seconds": time.perf_counter() - start, "resident_bytes": self.rows.nbytes()}

    def score(self, query_columns: dict[str, torch.Tensor], route: str, k: int, files: OutputFiles | None = None
              ) -> TopK:
        """The top-k and bottom-k (``TopK``: scores and global rows, (nq, k) each) of one query batch, in one pass;
        the asked-for ``files`` written."""
        columns = {c: v.to(device=self.device, dtype=self.precision.math) for c, v in query_columns.items()}
        query = prepare_query(self.manifest, columns, self.curvature, route=route,
                              normalize=self.cfg.query.normalize, matmul_dtype=self.precision.matmul)
        num_queries, num_train = next(iter(columns.values())).shape[0], self.manifest.num_rows
        topk = TopK(num_queries, min(k, num_train), self.device)
        with progress_bar(num_train, "stage 3: score", "ex", self.cfg.progress) as bar:
            score_blocks(query, self.rows.blocks(), topk, files, bar.update)
        return topk

    def close(self) -> None:
        pass


class QueryBackend:
    """What ``run_query`` drives: a featurizer (query file → ids, columns, seconds) and a scorer
    (``score(columns, route, k, files)``, ``info``); closing it releases both."""

    def __init__(self, featurize, scorer):
        self.featurize, self.scorer, self.info = featurize, scorer, scorer.info

    def score(self, *args, **kwargs) -> TopK:
        return self.scorer.score(*args, **kwargs)

    def close(self) -> None:
        self.featurize.close()
        self.scorer.close()


def local_query(cfg: Config, manifest, folder: CurvatureFolder, stored: bool) -> QueryBackend:
    """The query backend of one process: the model for query gradients and a ``LocalScorer``."""
    return QueryBackend(QueryFeaturizer(cfg, manifest), LocalScorer(cfg, manifest, folder, stored))


def open_query(cfg: Config) -> tuple[Config, object, CurvatureFolder, dict, bool]:
    """The query config pinned to the index, the manifest, the curvature folder and its header (checked
    against the config), and whether its stored g'_t in the policy's dtype can serve the curvature term."""
    manifest = IndexFolder(cfg.index_path).manifest()
    cfg = query_config(cfg, manifest)
    folder = CurvatureFolder(cfg.curvature_path)
    header = check_curvature(folder, cfg, manifest)
    warn_if_unsafe(cfg)
    stored = bool(ranks(header)) and folder.coordinates_match(cfg.precision.coordinates)
    if ranks(header) and not stored and folder.coordinates_match():
        log.warning("stored g'_t in %s are not in precision.coordinates=%s: not used (re-run stage 2 to store "
                    "them in that dtype)", folder.coordinates_path, cfg.precision.coordinates)
    return cfg, manifest, folder, header, stored


def run_query(cfg: Config, make_backend=local_query) -> dict:
    """Score ``data.queries`` against the index; returns a report with the output paths.

    Args:
        make_backend: ``(cfg, manifest, folder, stored) →`` a ``QueryBackend``; default ``local_query`` (this
            process).
    """
    cfg, manifest, folder, header, stored = open_query(cfg)
    backend = make_backend(cfg, manifest, folder, stored)
    try:
        return answer(cfg, manifest, header, stored, backend, require(resolve_inputs(cfg).queries_path, "data.queries"))
    finally:
        backend.close()


@dataclass(frozen=True)
class TrainNames:
    """Where a run's training rows get their names: ``texts`` (``TrainTexts``, or None: ids only), ``ids``
    (``IndexRowIds`` or ``TableRowIds``) and ``source`` (recorded as the run's "index": the index folder, or
    "live" for rows no index holds)."""

    texts: TrainTexts | None
    ids: IndexRowIds | TableRowIds
    source: str

    @classmethod
    def of_index(cls, cfg: Config, manifest) -> "TrainNames":
        return cls(open_train_texts(cfg, manifest), IndexRowIds(cfg.index_path, manifest), str(cfg.index_path))


def answer(cfg: Config, manifest, header: dict, stored: bool, backend, queries_path: Path,
           names: TrainNames | None = None) -> dict:
    """One query file through ``backend``: featurize, choose the route, score, write the run (``QueryRun``),
    holding the output folder's writer lock (``QUERY_WRITER``: one run writes a folder's query outputs at a time).
    ``names``: the training rows' texts and ids (None: the index's)."""
    check_outputs(cfg, manifest)
    with writer_lock(cfg.output_dir, *QUERY_WRITER):
        return _answer(cfg, manifest, header, backend, queries_path, stored, names or TrainNames.of_index(cfg, manifest))


def _answer(cfg: Config, manifest, header: dict, backend, queries_path: Path, stored: bool, names: TrainNames) -> dict:
    texts = names.texts
    examples = load_examples(queries_path, cfg.data.columns)
    queries = backend.featurize(queries_path)
    row_ids = queries.row_ids
    route = query_route(cfg, header, stored, len(row_ids))
    start = time.perf_counter()
    facts = {"route": route, "precision": Precision.of(cfg, resolve_device(cfg.model.device)).describe()}
    curvature = Curvature.of(header.get("kind", cfg.curvature_kind))
    meaning = NORMALIZED_MEANING if cfg.query.normalize else curvature.score_meaning
    top_k = min(cfg.query.top_k, manifest.num_rows)
    meta = {"config": cfg.to_dict(), "index": names.source, "curvature": cfg.curvature_kind, "score": meaning,
            **facts}
    run = QueryRun.begin(cfg.output_dir, meta, queries=len(queries.ids), tokens=len(queries.tokens),
                         train=manifest.num_rows, top_k=top_k, texts=texts is not None)
    with output_files(cfg, manifest, len(queries.ids), len(queries.tokens), run) as files:
        ends = backend.score(queries.columns, route, top_k, files)
        if files.self_influence is not None:
            write_self_influence(run, cfg, manifest, np.load(files.self_influence, mmap_mode="r"))
    report = write_query_outputs(run, cfg, manifest, queries, examples, expected_sources(queries_path, cfg.data.columns),
                                 ends, texts, names.ids)
    write_report_page(run)
    run.commit()
    return {**report, "report_path": str(run.path("report")), **backend.info, **facts,
            "query_gradient_seconds": queries.seconds, "score_seconds": time.perf_counter() - start}


def query_route(cfg: Config, header: dict, stored: bool, num_rows: int) -> str:
    """The curvature term's route for a batch of ``num_rows`` query rows (``choose_route``)."""
    return choose_route(num_rows, list(ranks(header).values()), stored=stored,
                        train_self=cfg.query.normalize or cfg.query.self_influence)


def open_train_texts(cfg: Config, manifest) -> TrainTexts | None:
    """The texts of the index's training rows (``TrainTexts``, from the row table stage 1 wrote), or None
    with a warning that says why (an index without its row table, a training input that moved or changed):
    the results then hold ids without training texts."""
    try:
        return TrainTexts(cfg.index_path, resolve_inputs(cfg).train_path, sha256=manifest.meta["data"]["sha256"])
    except DataError as error:
        log.warning("no training texts in the results: %s", error)
        return None


def check_outputs(cfg: Config, manifest) -> None:
    """Refuse, before any work, outputs that a RepSim index cannot give (it has no gradients)."""
    asked = [key for key in ("self_influence", "per_layer", "per_token") if getattr(cfg.query, key)]
    if manifest.kind == "hidden" and asked:
        raise ConfigError(f"query.{asked[0]}: a RepSim index holds hidden states, not gradients")
