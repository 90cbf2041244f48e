"""Stage 3: score queries against every indexed training example; write top-k (and full scores).

One driver for every placement of the rows. ``run_query`` opens the index, pins every row-shaping setting
to the index's (``query_config``), checks that the saved curvature is the one this config asks for, and
hands the queries to a *query backend*: it featurizes them exactly like the index, the driver chooses
the curvature term's route once (``choose_route``: stored g'_t, query side, or recompute, recorded in
the report), and the backend scores every training row with the one batched scorer
(``lorif_ray.math.scoring.StackedQuery``) into a running top-k. ``local_query`` keeps the model and the
rows in this process (streamed shard by shard, or resident with ``query.resident``); on Ray,
``lorif_ray.distributed.query_pool.ray_query`` does the same across query actors.

The outputs are one query run (``lorif_ray.store.query_run.QueryRun``, which owns their names, formats and
the run record): ``topk.parquet`` and ``opponents.parquet`` (the two ends of every query, kept in the same
pass, with the query and training texts), ``queries.parquet`` (with each query's score distribution),
``report.html`` and, as asked, the full scores (written by whoever scores the rows), the token rows' tables
and arrays, the per-layer scores and the self-influence.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from lorif_ray.config import Config
from lorif_ray.data import IGNORE_INDEX, Columns, Example, TokenizedExample, TrainTexts, load_examples, tokenize_examples
from lorif_ray.data.examples import DEFAULT_COLUMNS
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import ConfigError, DataError
from lorif_ray.math.blocks import RowLayout, TrainBlock
from lorif_ray.math.curvature import Curvature
from lorif_ray.math.scoring import RepSimQuery, StackedQuery, choose_route
from lorif_ray.model.loading import check_same_model, load_model, model_identity, resolve_device
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.progress import progress_bar
from lorif_ray.stages.curvature import check_curvature, load_curvature
from lorif_ray.stages.index import build_featurizer, quiet_transformers
from lorif_ray.stages.inputs import layer_specs, query_config, require, resolve_inputs, tokenized
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.rows import ResidentRows, layer_rows
from lorif_ray.outputs.report_page import write_report_page
from lorif_ray.outputs.summary import expected_sources
from lorif_ray.store import CurvatureFolder, ids_of_rows, open_index, read_ids, writer_lock
from lorif_ray.store.curvature_folder import ranks
from lorif_ray.store.schema import HIDDEN_COLUMN
from lorif_ray.store.query_run import BINS_PER_OCTAVE, HALF, NUM_SCORE_BINS, SCORE_OCTAVES, QueryRun

log = logging.getLogger(__name__)

QUERY_WRITER = ("query", "stage 3 (jobs/query.py)")  # ``writer_lock(cfg.output_dir, *QUERY_WRITER)``


class TopK:
    """Running top-k and bottom-k per query over streamed blocks of scores: ``scores``, ``index`` (nq, k') the
    largest scores and their global rows, best first (proponents); ``low_scores``, ``low_index`` the smallest,
    most negative first (opponents); k' = min(k, rows seen); ``bins`` (nq, NUM_SCORE_BINS) counts of every score
    in the fixed signed log bins of ``lorif_ray.store.query_run`` (the score distribution). Parts over disjoint
    rows merge exactly (``merge``): each end of the whole is within the union of the parts' ends, and the bins
    add."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.scores = torch.full((num_queries, 0), float("-inf"), device=device)
        self.index = torch.zeros((num_queries, 0), dtype=torch.long, device=device)
        self.low_scores, self.low_index = self.scores.clone(), self.index.clone()
        self.bins = torch.zeros((num_queries, NUM_SCORE_BINS), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge (nq, nb) scores of training rows offset … offset + nb − 1."""
        columns = torch.arange(offset, offset + scores.shape[1], device=scores.device).expand_as(scores)
        self._merge(scores, columns, scores, columns)
        bins = score_bins(scores)
        self.bins.scatter_add_(1, bins, torch.ones_like(bins))

    def merge(self, other: "TopK") -> None:
        """Merge another part's ends (of other rows) into these."""
        self._merge(other.scores.to(self.scores.device), other.index.to(self.scores.device),
                    other.low_scores.to(self.scores.device), other.low_index.to(self.scores.device))
        self.bins += other.bins.to(self.bins.device)

    def _merge(self, high, high_index, low, low_index) -> None:
        self.scores, self.index = _best(torch.cat([self.scores.to(high.dtype), high], dim=1),
                                        torch.cat([self.index, high_index], dim=1), self.k, largest=True)
        self.low_scores, self.low_index = _best(torch.cat([self.low_scores.to(low.dtype), low], dim=1),
                                                torch.cat([self.low_index, low_index], dim=1), self.k, largest=False)

    def cpu(self) -> "TopK":
        """These ends on the CPU (what a query actor returns)."""
        out = TopK(0, self.k, "cpu")
        out.scores, out.index = self.scores.cpu(), self.index.cpu()
        out.low_scores, out.low_index = self.low_scores.cpu(), self.low_index.cpu()
        out.bins = self.bins.cpu()
        return out


def score_bins(scores: torch.Tensor) -> torch.Tensor:
    """The signed log bin (``lorif_ray.store.query_run.score_bin_edges``) of every score: long, same shape."""
    level = torch.floor((torch.log2(scores.abs().double()) + SCORE_OCTAVES / 2) * BINS_PER_OCTAVE)
    level = torch.nan_to_num(level, nan=-1.0, neginf=-1.0).clamp(-1, HALF - 1).long()  # -1: |s| < 2^-64
    return torch.where(level < 0, HALF, torch.where(scores > 0, HALF + 1 + level, HALF - 1 - level))


def _best(scores: torch.Tensor, index: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest)
    return best.values, torch.gather(index, 1, best.indices)


@dataclass(frozen=True)
class OutputFiles:
    """Preallocated ``.npy`` files (``QueryRun.arrays``) that whoever scores a training row writes its part of:
    of a batch whose first ``queries`` rows are queries and the rest token rows (None: all are queries),
    ``scores`` (queries, N) float32, ``token_scores`` (token rows, N) float32, ``layer_scores`` (L, queries, N)
    float32 in ``layout.names`` order, ``self_influence`` (N,) float64; None = not asked for. Any process that
    sees the files may write its own rows."""

    scores: str | None = None
    layer_scores: str | None = None
    self_influence: str | None = None
    token_scores: str | None = None
    queries: int | None = None


class BlockOutputs:
    """Scores one block of training rows and writes its columns of the ``OutputFiles``."""

    def __init__(self, files: OutputFiles | None):
        files = files or OutputFiles()
        self.queries = files.queries  # rows [0, queries) are queries, the rest token rows
        self.arrays = {name: np.load(path, mmap_mode="r+")
                       for name, path in asdict(files).items() if name != "queries" and path is not None}

    def __call__(self, query: StackedQuery | RepSimQuery, block: TrainBlock, offset: int) -> torch.Tensor:
        """The block's scores (nq, nt); its parts of the files at columns offset … offset + nt − 1."""
        nq, columns = self.queries, slice(offset, offset + len(block))
        if "layer_scores" in self.arrays:
            layers = query.scores(block, per_layer=True)
            self.arrays["layer_scores"][:, :, columns] = layers[:, :nq].float().cpu().numpy()
            scores = layers.sum(dim=0)
        else:
            scores = query.scores(block)
        if "scores" in self.arrays:
            self.arrays["scores"][:, columns] = scores[:nq].float().cpu().numpy()
        if "token_scores" in self.arrays:
            self.arrays["token_scores"][:, columns] = scores[nq:].float().cpu().numpy()
        if "self_influence" in self.arrays:
            self_influence = query.train_self_influence(block).double().cpu().numpy()
            self.arrays["self_influence"][offset:offset + len(block)] = self_influence
        return scores

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays = {}


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


@dataclass
class QueryRows:
    """Featurized queries: the rows of ``columns`` {column: (n, width)} (float32, CPU) are the queries ``ids``
    and then, with ``query.per_token``, one row per target token, ``tokens[i]`` = (query id, position, token
    text); ``seconds`` of featurizing."""

    ids: list[str]
    columns: dict[str, torch.Tensor]
    seconds: float
    tokens: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def row_ids(self) -> list[str]:
        """Every row's id: the query's, or ``<query id>@<position>`` for a token row."""
        return self.ids + [f"{query}@{position}" for query, position, _ in self.tokens]


def query_examples(source: Path | Sequence[Example], tokenizer, max_length: int, per_token: bool,
                   columns: Columns = DEFAULT_COLUMNS
                   ) -> tuple[list[TokenizedExample], list[tuple[str, int, str]]]:
    """The tokenized queries of a file (or of examples already read, e.g. a request's) and, with ``per_token``,
    after them one copy of each query per target token whose labels keep that token only (its loss alone),
    with (query id, position, token text) each.

    Raises:
        ConfigError: the file holds no queries (or no examples are given).
    """
    if isinstance(source, (str, Path)):
        queries = tokenized(Path(source), tokenizer, max_length, columns)
    else:
        queries = tokenize_examples(list(source), tokenizer, max_length)
    if not queries:
        raise ConfigError(f"{source if isinstance(source, (str, Path)) else 'the request'} holds no queries")
    if not per_token:
        return queries, []
    rows, tokens = [], []
    for query in queries:
        for position in range(1, len(query.labels)):  # position 0 is never predicted
            label = query.labels[position]
            if label == IGNORE_INDEX:
                continue
            labels = [IGNORE_INDEX] * len(query.labels)
            labels[position] = label
            rows.append(TokenizedExample(f"{query.id}@{position}", query.input_ids, labels))
            tokens.append((query.id, position, tokenizer.decode([label])))
    return queries + rows, tokens


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
        self.per_token, self.progress, self.columns = cfg.query.per_token, cfg.progress, cfg.data.columns

    def __call__(self, queries: Path | Sequence[Example]) -> QueryRows:
        """The featurized queries of a file, or of examples in memory (``query.per_token``: and their tokens);
        the bar moves per batch."""
        queries, tokens = query_examples(queries, self.tokenizer, self.max_length, self.per_token, self.columns)
        start = time.perf_counter()
        parts = []
        with progress_bar(len(queries), "stage 3: query gradients", "query", self.progress) as bar:
            for ids, batch in token_batches(queries, self.batch_size, self.tokenizer.pad_token_id):
                parts.append(self.featurizer(ids, batch))
                bar.update(len(ids))
        columns = {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}
        return QueryRows([q.id for q in queries[:len(queries) - len(tokens)]], columns, time.perf_counter() - start,
                         tokens)

    def close(self) -> None:
        pass


def featurize_queries(cfg: Config, manifest) -> QueryRows:
    """The featurized ``data.queries``, in this process."""
    return QueryFeaturizer(cfg, manifest)(require(resolve_inputs(cfg).queries_path, "data.queries"))


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
            self.rows = layer_rows(cfg.index_path, manifest, layer_specs(manifest), dtype=self.precision.math,
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
    manifest = open_index(cfg.index_path)
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


def answer(cfg: Config, manifest, header: dict, stored: bool, backend, queries_path: Path,
) -> dict:
    """One query file through ``backend``: featurize, choose the route, score, write the run (``QueryRun``),
    holding the output folder's writer lock (``QUERY_WRITER``: one run writes a folder's query outputs at a time)."""
    check_outputs(cfg, manifest)
    with writer_lock(cfg.output_dir, *QUERY_WRITER):
        return _answer(cfg, manifest, header, backend, queries_path, stored)


def _answer(cfg: Config, manifest, header: dict, backend, queries_path: Path, stored: bool) -> dict:
    texts = open_train_texts(cfg, manifest)
    examples = load_examples(queries_path, cfg.data.columns)
    queries = backend.featurize(queries_path)
    row_ids = queries.row_ids
    route = query_route(cfg, header, stored, len(row_ids))
    start = time.perf_counter()
    facts = {"route": route, "precision": Precision.of(cfg, resolve_device(cfg.model.device)).describe()}
    curvature = Curvature.of(header.get("kind", cfg.curvature_kind))
    meaning = NORMALIZED_MEANING if cfg.query.normalize else curvature.score_meaning
    top_k = min(cfg.query.top_k, manifest.num_rows)
    meta = {"config": cfg.to_dict(), "index": str(cfg.index_path), "curvature": cfg.curvature_kind, "score": meaning,
            **facts}
    run = QueryRun.begin(cfg.output_dir, meta, queries=len(queries.ids), tokens=len(queries.tokens),
                         train=manifest.num_rows, top_k=top_k, texts=texts is not None)
    with output_files(cfg, manifest, len(queries.ids), len(queries.tokens), run) as files:
        ends = backend.score(queries.columns, route, top_k, files)
        if files.self_influence is not None:
            write_self_influence(run, cfg, manifest, np.load(files.self_influence, mmap_mode="r"))
    report = write_query_outputs(run, cfg, manifest, queries, examples, expected_sources(queries_path, cfg.data.columns),
                                 ends, texts)
    write_report_page(run)
    run.commit()
    return {**report, "report_path": str(run.path("report")), **backend.info, **facts,
            "query_gradient_seconds": queries.seconds, "score_seconds": time.perf_counter() - start}


@contextmanager
def output_files(cfg: Config, manifest, num_queries: int, num_tokens: int = 0, run: QueryRun | None = None):
    """The ``OutputFiles`` of a batch of ``num_queries`` queries (then ``num_tokens`` token rows): each asked-for
    ``.npy`` of ``run`` (default: a new run of ``output_dir``) preallocated (a full disk fails here, before any
    work) under a temporary name that replaces the run's file only on success (``QueryRun.arrays``)."""
    run = run or QueryRun.begin(cfg.output_dir, {})
    shapes, scratch = output_shapes(cfg, manifest, num_queries, num_tokens)
    with run.arrays(shapes, scratch) as paths:
        yield OutputFiles(**paths, queries=num_queries)


def output_shapes(cfg: Config, manifest, num_queries: int, num_tokens: int) -> tuple[dict, dict]:
    """The ``QueryRun.arrays`` a run asks for: {name: (shape, dtype)} of the run's ``.npy`` files, and the
    scratch file of the self-influence values (in ``self_influence.parquet`` by the end)."""
    num_train, num_layers = manifest.num_rows, len(manifest.meta["layers"])
    shapes = {"scores": ((num_queries, num_train), np.float32, cfg.query.full_scores),
              "token_scores": ((num_tokens, num_train), np.float32, cfg.query.full_scores and num_tokens > 0),
              "layer_scores": ((num_layers, num_queries, num_train), np.float32, cfg.query.per_layer)}
    scratch = {"self_influence": ((num_train,), np.float64)} if cfg.query.self_influence else {}
    return {name: (shape, dtype) for name, (shape, dtype, asked) in shapes.items() if asked}, scratch


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


def write_query_outputs(run: QueryRun, cfg: Config, manifest, queries: QueryRows, examples: list,
                        sources: dict[str, str], ends: TopK, texts: TrainTexts | None) -> dict:
    """The run's tables from the two ends of every row: ``topk``, ``opponents`` and ``queries`` (with each query's
    score bins) of the queries; ``tokens`` and ``token_topk`` of the token rows; the JSON sidecars of the
    ``.npy`` files. Reads the ids and texts of the ends' rows only (all N ids only for the sidecars of the
    full-score files, which are O(N) themselves)."""
    nq = len(queries.ids)
    rows = ends.index.reshape(-1).tolist() + ends.low_index[:nq].reshape(-1).tolist()
    named = {"train_ids": ids_of_rows(cfg.index_path, manifest, rows),
             "train_texts": texts.texts(rows) if texts is not None else {},
             "query_texts": {e.id: e.text for e in examples}}
    run.write_table("topk", topk_table(queries.ids, ends.scores[:nq], ends.index[:nq], **named))
    run.write_table("opponents", topk_table(queries.ids, ends.low_scores[:nq], ends.low_index[:nq], **named),
                    {"ranks": "rank 1 = the most negative score (the strongest opponent)"})
    run.write_table("queries", queries_table(queries.ids, examples, sources, ends.bins[:nq]))
    report = {"topk_path": str(run.path("topk")), "opponents_path": str(run.path("opponents")), "scores_path": None,
              "queries": nq, "train": manifest.num_rows}
    if run.has("scores") or run.has("layer_scores"):
        train_ids = read_ids(cfg.index_path, manifest)
    if run.has("scores"):
        run.write_json("scores_ids", {"query_ids": queries.ids, "train_ids": train_ids})
        report["scores_path"] = str(run.path("scores"))
    if run.has("layer_scores"):
        layers = [layer["name"] for layer in manifest.meta["layers"]]
        run.write_json("layer_scores_ids", {"layers": layers, "query_ids": queries.ids, "train_ids": train_ids})
        report["layer_scores_path"] = str(run.path("layer_scores"))
    if queries.tokens:
        scores, index = ends.scores[nq:], ends.index[nq:]
        run.write_table("tokens", tokens_table(queries.tokens, scores, index, ends.index[:nq], named["train_ids"],
                                               run.array("token_scores"), queries.ids))
        run.write_table("token_topk", token_topk_table(queries.tokens, scores, index, **named))
        if run.has("token_scores"):
            run.write_json("token_scores_ids", {"token_ids": queries.row_ids[nq:], "train_ids": train_ids})
        report.update(topk_per_token_path=str(run.path("token_topk")), tokens=len(queries.tokens))
    if run.has("self_influence"):
        report["self_influence_path"] = str(run.path("self_influence"))
    return report


def write_self_influence(run: QueryRun, cfg: Config, manifest, values: np.ndarray) -> None:
    """``self_influence.parquet`` (train_id, self_influence) from the (N,) values, one shard's ids at a time."""
    schema = pa.schema([("train_id", pa.string()), ("self_influence", pa.float64())])

    def tables():
        for record in manifest.shards:
            start = record.index * manifest.shard_size
            ids = read_ids(cfg.index_path, manifest, shards=[record.index])
            yield pa.table([pa.array(ids, pa.string()), pa.array(values[start:start + len(ids)])], schema=schema)

    run.write_tables("self_influence", schema, tables(), {"score": SELF_INFLUENCE_MEANING})


NORMALIZED_MEANING = "I(t,q) / sqrt(I(t,t) I(q,q)) in [-1, 1]; > 0: proponent"
SELF_INFLUENCE_MEANING = ("I(t,t) = g_t^T H^-1 g_t, the example's influence on its own loss; large: the model fits t "
                          "unlike the rest (outlier, mislabel or memorized)")


def topk_table(query_ids: list[str], scores: torch.Tensor, index: torch.Tensor, *, train_ids, train_texts: dict,
               query_texts: dict) -> pa.Table:
    """One row per (query, rank) from (nq, k) scores and training row indices: query_id, query_text, rank,
    train_id, train_text, score (``train_ids[row]``, ``train_texts[row]``, ``query_texts[id]``; a text not
    given is null)."""
    scores, index = scores.float().cpu().numpy(), index.cpu().numpy()
    k = scores.shape[1]
    ids = np.repeat(np.array(query_ids, dtype=object), k).tolist()
    rows = index.reshape(-1).tolist()
    return pa.table({
        "query_id": pa.array(ids, pa.string()),
        "query_text": pa.array([query_texts.get(q) for q in ids], pa.string()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), len(query_ids)), pa.int32()),
        "train_id": pa.array([train_ids[i] for i in rows], pa.string()),
        "train_text": pa.array([train_texts.get(i) for i in rows], pa.string()),
        "score": pa.array(scores.reshape(-1), pa.float32()),
    })


def token_topk_table(tokens: list[tuple[str, int, str]], scores: torch.Tensor, index: torch.Tensor,
                     **texts) -> pa.Table:
    """``topk_table`` of the token rows: token_id (``<query id>@<position>``), query_id, query_text, position,
    token, rank, train_id, train_text, score."""
    k = scores.shape[1]
    table = topk_table([query for query, _, _ in tokens], scores, index, **texts)
    repeat = lambda values, kind: pa.array(np.repeat(np.array(values, dtype=object), k).tolist(), kind)  # noqa: E731
    return pa.table({"token_id": repeat([f"{q}@{p}" for q, p, _ in tokens], pa.string()),
                     "query_id": table["query_id"], "query_text": table["query_text"],
                     "position": repeat([t[1] for t in tokens], pa.int32()),
                     "token": repeat([t[2] for t in tokens], pa.string()),
                     **{name: table[name] for name in ("rank", "train_id", "train_text", "score")}})


def tokens_table(tokens: list[tuple[str, int, str]], scores: torch.Tensor, index: torch.Tensor,
                 query_index: torch.Tensor, train_ids: dict, token_scores: np.ndarray | None,
                 query_ids: list[str]) -> pa.Table:
    """One row per token row: token_id, query_id, position, token, best_score and best_train_id (its own top-1),
    score_on_top_proponent (its score against its query's top-1 row, from ``token_scores``; null without)."""
    top_of = {q: int(query_index[i, 0]) for i, q in enumerate(query_ids)}
    on_top = [None] * len(tokens)
    if token_scores is not None:
        on_top = [float(token_scores[i, top_of[q]]) for i, (q, _, _) in enumerate(tokens)]
    return pa.table({
        "token_id": pa.array([f"{q}@{p}" for q, p, _ in tokens], pa.string()),
        "query_id": pa.array([q for q, _, _ in tokens], pa.string()),
        "position": pa.array([p for _, p, _ in tokens], pa.int32()),
        "token": pa.array([t for _, _, t in tokens], pa.string()),
        "best_score": pa.array(scores[:, 0].float().cpu().numpy(), pa.float32()),
        "best_train_id": pa.array([train_ids[int(i)] for i in index[:, 0].tolist()], pa.string()),
        "score_on_top_proponent": pa.array(on_top, pa.float32()),
    })


def queries_table(query_ids: list[str], examples: list, sources: dict[str, str], bins: torch.Tensor) -> pa.Table:
    """One row per query: query_id, query_text, query_prompt (null: every token carries loss), source_id (the
    known source, where the queries name one), score_bins (counts of its scores in ``score_bin_edges``)."""
    by_id = {e.id: e for e in examples}
    return pa.table({
        "query_id": pa.array(query_ids, pa.string()),
        "query_text": pa.array([by_id[q].text if q in by_id else None for q in query_ids], pa.string()),
        "query_prompt": pa.array([by_id[q].prompt if q in by_id else None for q in query_ids], pa.string()),
        "source_id": pa.array([sources.get(q) for q in query_ids], pa.string()),
        "score_bins": pa.array(bins.cpu().numpy().tolist(), pa.list_(pa.int64())),
    })
