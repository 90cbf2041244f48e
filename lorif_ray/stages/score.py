"""On-the-fly scoring: stage 3 over a *live* row source, no index written (``jobs/score.py``, issue 24 item 1).

The queries are featurized and prepared first, exactly as ``run_query`` does; the training set is then streamed
through the model once (``LiveRows``: stage 1's shard ranges, tokenization and ``Featurizer``, each shard's rows
rounded to the storage ``dtype`` as a shard file would hold them) and every block is scored by the one scorer
(``score_blocks``) into the running top-k and dropped. Nothing goes into an index folder: no shard, no manifest;
the run's "manifest" (``LiveRows.manifest``) is the one stage 1 would write, held in memory only, and the row
table that names the rows (ids, texts) lives in a scratch folder of ``output_dir`` for the run's duration.

Curvatures, asked of the registry's capabilities: one that neither reads rows nor needs statistics (identity) is
made here (one pass); one that needs only stage 1's K-FAC statistics (kfac) gets a statistics pass first (a
forward+backward per batch, no rows kept), then the scoring pass; one that reads the rows (woodbury, exact,
ekfac) comes from an earlier run's folder, ``curvature_from=<output_dir>``, checked against this config as stage 3
checks it (every setting, the model and the row settings; not the shard hashes: live rows have none). This slice
runs in one process (``cluster=none``); on Ray it is refused by name.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from lorif_ray.config import Config
from lorif_ray.data import InputShards, TrainTexts, commit_row_table, shard_input
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.blocks import RowLayout, TrainBlock
from lorif_ray.math.curvature import Curvature, fit_layers
from lorif_ray.model.loading import load_model, model_identity, resolve_device
from lorif_ray.outputs.folders import claim_output_dir
from lorif_ray.outputs.query_outputs import TableRowIds, TopK
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.progress import progress_bar
from lorif_ray.stages.curvature import curvature_meta, fit_settings, meta_diff, read_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.index import build_featurizer, featurize_chunk, index_meta, quiet_transformers, train_input
from lorif_ray.stages.preflight import check_before_work
from lorif_ray.stages.inputs import TokenizedShards, layer_specs, query_config, require, resolve_inputs
from lorif_ray.stages.queries import QueryFeaturizer
from lorif_ray.stages.query import QueryBackend, TrainNames, answer, prepare_query, score_blocks
from lorif_ray.store import CurvatureFolder, IndexFolder, Manifest
from lorif_ray.store.schema import HIDDEN_COLUMN, TORCH_STORAGE_DTYPES

log = logging.getLogger(__name__)

LIVE_SOURCE = "live"  # the query run's "index": rows no index holds


def check_score(cfg: Config) -> None:
    """Refuse, before any work, what on-the-fly scoring cannot do yet or at all.

    Raises:
        ConfigError: ``cluster.backend`` is not none; the curvature reads the rows themselves and no
            ``curvature_from`` is given; ``curvature_from`` holds no curvature; ``query.self_influence``.
    """
    if cfg.cluster.backend != "none":
        raise ConfigError(f"cluster.backend={cfg.cluster.backend}: on-the-fly scoring (jobs/score.py) on Ray is not yet "
                          "available; run it in one process with cluster=none")
    kind = Curvature.of(cfg.curvature_kind)
    if cfg.curvature_from is None and kind.reads_rows:
        raise ConfigError(f"curvature={kind.kind}: its fit reads the training rows themselves, which on-the-fly "
                          "scoring does not keep; fit it once with jobs/attribute.py (or jobs/index.py + "
                          "jobs/curvature.py) and pass curvature_from=<that output_dir>, or use curvature=identity "
                          "or curvature=kfac")
    if cfg.curvature_from is not None and not curvature_folder(cfg).exists():
        raise ConfigError(f"curvature_from={cfg.curvature_from}: no curvature in {curvature_folder(cfg).path}; "
                          "give the output_dir of a run that fitted one (jobs/attribute.py, jobs/curvature.py)")
    if cfg.query.self_influence:
        raise ConfigError("query.self_influence: not yet available with on-the-fly scoring (jobs/score.py); use "
                          "jobs/query.py over an index")


def curvature_folder(cfg: Config) -> CurvatureFolder:
    """The curvature folder ``curvature_from`` names (``<curvature_from>/curvature``)."""
    return CurvatureFolder(Path(cfg.curvature_from) / "curvature")


class LiveRows:
    """A row source of the training set featurized in this process (``blocks()``: one pass of ``TrainBlock``s
    with their global row offsets and ids, at most ``batch_rows`` rows of one shard each), made like stage 1's
    ``LocalFeaturize`` makes shards, rows rounded to the storage dtype; nothing is written.

    Attributes:
        manifest: what stage 1 would record for these rows (kind, columns, dtype, shard_size, num_rows, meta),
            in memory only (no shards).
        featurizer: the training rows' ``Featurizer`` (loss, summed); ``statistics_pass`` uses it too.
        passes: passes made over the training set (scoring and statistics).
    """

    def __init__(self, cfg: Config, plan: InputShards, model_path: Path):
        self.cfg, self.plan = cfg, plan
        with quiet_transformers():
            model, self.tokenizer = load_model(model_path, dtype=cfg.model.dtype, device=cfg.model.device,
                                               adapter=cfg.model.adapter)
        self.featurizer = build_featurizer(cfg, model)
        meta = index_meta(cfg, self.featurizer, model_identity(model), plan.sha256, plan.num_rows)
        self.manifest = Manifest(kind=self.featurizer.kind, columns=self.featurizer.columns, dtype=cfg.dtype,
                                 shard_size=cfg.shard_size, num_rows=plan.num_rows, complete=True, meta=meta)
        self.layout: RowLayout | None = None
        self.dtype, self.device, self.batch_rows = torch.float32, torch.device("cpu"), cfg.query.train_batch_rows
        self.passes = 0

    def set_scoring(self, curvature: dict | None, dtype: torch.dtype, device) -> None:
        """Lay the blocks out for the scorer (``RowLayout.build`` with ``curvature``), in ``dtype`` on ``device``."""
        if self.manifest.kind != "hidden":
            self.layout = RowLayout.build(layer_specs(self.manifest), self.manifest.kind, curvature)
        self.dtype, self.device = dtype, torch.device(device)

    def num_rows(self) -> int:
        return self.plan.num_rows

    def shards(self) -> Iterator[tuple[int, list]]:
        """(global offset, tokenized examples) of every shard, in order (each read when its turn comes)."""
        self.passes += 1
        chunks = TokenizedShards(self.plan, list(range(len(self.plan.ranges))), self.tokenizer,
                                 self.cfg.data.max_length)
        for shard, chunk in chunks.items():
            yield self.plan.ranges[shard].start, chunk

    def blocks(self) -> Iterator[TrainBlock]:
        stored = TORCH_STORAGE_DTYPES[self.manifest.dtype]
        specs = layer_specs(self.manifest)
        for offset, chunk in self.shards():
            ids, columns = featurize_chunk(self.featurizer, chunk, self.cfg.data.batch_size,
                                           self.tokenizer.pad_token_id)
            # as a shard file holds them: stored in the storage dtype, read back in the math dtype
            columns = {k: v.to(stored).to(device=self.device, dtype=self.dtype) for k, v in columns.items()}
            for at in range(0, len(ids), self.batch_rows):
                part = {k: v[at:at + self.batch_rows] for k, v in columns.items()}
                block_ids = ids[at:at + self.batch_rows]
                if self.layout is None:
                    yield TrainBlock(dense=part[HIDDEN_COLUMN], offset=offset + at, ids=block_ids)
                else:
                    yield self.layout.train_block(blocks_from_columns(specs, self.manifest.kind, part), None,
                                                  offset=offset + at, ids=block_ids)

    def statistics_pass(self) -> dict:
        """{layer: KroneckerStats} of the whole training set, as stage 1 sums them (the config's ``kfac_labels``):
        one forward+backward per batch, no rows made or kept."""
        cfg, featurizer = self.cfg, self.featurizer
        counting = build_featurizer(cfg, featurizer.model, layer_names=[s.name for s in featurizer.specs],
                                    statistics=True)
        total: dict = {}
        with progress_bar(self.plan.num_rows, "score: K-FAC statistics", "ex", cfg.progress) as bar:
            for _, chunk in self.shards():
                for batch_ids, batch in token_batches(chunk, cfg.data.batch_size, self.tokenizer.pad_token_id):
                    counting.capture(batch_ids, batch)
                    bar.update(len(batch_ids))
                for layer, stats in counting.statistics.pop().items():
                    total[layer] = total[layer] + stats if layer in total else stats
        return total


def check_live_curvature(folder: CurvatureFolder, cfg: Config, manifest: Manifest, plan: InputShards) -> dict:
    """The header of ``folder`` after checking it against this config as stage 3 does (``curvature_meta``: the
    method, curvature, fit settings, precision, the model and the row settings), except the index's shard hashes
    (live rows have none); the training input is checked against the index it was fitted on where that index
    is still at ``<curvature_from>/index``.

    Raises:
        IndexMismatchError: a setting differs (named), or the input is not the one the curvature was fitted on.
    """
    header = folder.header()
    saved = header.get("method_meta", {})
    expected = curvature_meta(cfg, manifest)
    expected["index"] = {**expected["index"], "shards": saved.get("index", {}).get("shards")}
    diff = meta_diff(saved, expected)
    if diff:
        raise IndexMismatchError(f"curvature_from={cfg.curvature_from}: {folder.path} was made with other settings "
                                 f"than this config asks for ({', '.join(diff)} differ): score with its settings or "
                                 "fit one with these")
    fitted_on = IndexFolder(Path(cfg.curvature_from) / "index")
    if fitted_on.exists():
        sha = fitted_on.manifest().meta["data"]["sha256"]
        if sha != plan.sha256:
            raise IndexMismatchError(f"curvature_from={cfg.curvature_from}: its curvature was fitted on another "
                                     f"training input (sha256 {sha[:12]}…) than data.train={cfg.data.train} "
                                     f"({plan.sha256[:12]}…)")
    else:
        log.warning("curvature_from=%s: no index there to check that its curvature was fitted on data.train",
                    cfg.curvature_from)
    return header


def live_curvature(cfg: Config, rows: LiveRows, plan: InputShards, device, dtype) -> tuple[dict, dict]:
    """({layer: Curvature}, header) of the run: read from ``curvature_from``, or made here (``check_score``
    refused the kinds that need the rows); ({}, header) for RepSim."""
    manifest = rows.manifest
    if cfg.curvature_from is not None:
        folder = curvature_folder(cfg)
        header = check_live_curvature(folder, cfg, manifest, plan)
        return read_curvature(folder, header, manifest, device, dtype), header
    kind = Curvature.of(cfg.curvature_kind)
    if not kind.scores_gradients:
        return {}, {"kind": kind.kind}
    stats = None
    if kind.needs_stats:
        log.info("score: curvature=%s needs K-FAC statistics: a statistics pass over the %d training examples "
                 "first, then the scoring pass (two passes)", kind.kind, plan.num_rows)
        stats = rows.statistics_pass()
    settings = fit_settings(cfg, dtype, device, manifest.num_rows)
    specs = layer_specs(manifest)
    fitted = fit_layers({s.name: kind.steps(s.dim, s.name, settings) for s in specs}, None, stats)
    curvature = {name: c.to(device=device, dtype=dtype) for name, c in fitted.items()}
    return curvature, {"kind": kind.kind, "layers": {name: c.info() for name, c in fitted.items()}}


class LiveScorer:
    """Scores a query batch against ``LiveRows`` in one pass (the ``LocalScorer`` of rows no index holds)."""

    def __init__(self, cfg: Config, rows: LiveRows, curvature: dict, device, precision: Precision):
        self.cfg, self.rows, self.curvature = cfg, rows, curvature
        self.device, self.precision, self.info = device, precision, {"rows": LIVE_SOURCE}
        rows.set_scoring(curvature, precision.math, device)

    def score(self, query_columns: dict[str, torch.Tensor], route: str, k: int, files=None) -> TopK:
        """The top-k and bottom-k of one query batch over the training set streamed once; ``files`` written."""
        manifest = self.rows.manifest
        columns = {c: v.to(device=self.device, dtype=self.precision.math) for c, v in query_columns.items()}
        query = prepare_query(manifest, columns, self.curvature, route=route, normalize=self.cfg.query.normalize,
                              matmul_dtype=self.precision.matmul)
        num_queries, num_train = next(iter(columns.values())).shape[0], manifest.num_rows
        topk = TopK(num_queries, min(k, num_train), self.device)
        start = time.perf_counter()
        with progress_bar(num_train, "score: train gradients + scores", "ex", self.cfg.progress) as bar:
            score_blocks(query, self.rows.blocks(), topk, files, bar.update)
        self.info["live_pass_seconds"] = time.perf_counter() - start
        return topk

    def close(self) -> None:
        pass


def run_score(cfg: Config) -> dict:
    """Score ``data.queries`` against ``data.train`` streamed through the model once (no index written); writes
    the query run's outputs into ``output_dir`` like ``run_query`` and returns its report (``rows`` = "live",
    ``passes``: passes over the training set)."""
    cfg = check_before_work(cfg, ("score",))  # check_score too
    claim_output_dir(cfg)
    model_path, train_path = train_input(cfg)
    queries_path = require(resolve_inputs(cfg).queries_path, "data.queries")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".live-rows-", dir=cfg.output_dir) as scratch:
        plan = shard_input(train_path, cfg.shard_size, cfg.data.columns, IndexFolder(scratch).row_table_path)
        commit_row_table(plan.rows_table)  # the names of the rows (ids, texts), for this run only
        rows = LiveRows(cfg, plan, model_path)
        cfg = query_config(cfg, rows.manifest)
        warn_if_unsafe(cfg)
        device = resolve_device(cfg.model.device)
        precision = Precision.of(cfg, device)
        curvature, header = live_curvature(cfg, rows, plan, device, precision.math)
        texts = TrainTexts(scratch, train_path, sha256=plan.sha256)
        names = TrainNames(texts, TableRowIds(texts), LIVE_SOURCE)
        backend = QueryBackend(QueryFeaturizer(cfg, rows.manifest), LiveScorer(cfg, rows, curvature, device, precision))
        try:
            report = answer(cfg, rows.manifest, header, False, backend, queries_path, names)
        finally:
            backend.close()
    return {**report, "passes": rows.passes}
