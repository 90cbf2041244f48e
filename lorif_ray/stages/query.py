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
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.data import IGNORE_INDEX, TokenizedExample
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
from lorif_ray.store import (atomic_path, ids_of_rows, open_index, read_ids, write_json, write_table, write_tables,
                             writer_lock)
from lorif_ray.store.artifacts import preallocated_memmap, temporary_path

log = logging.getLogger(__name__)

QUERY_WRITER = ("query", "stage 3 (jobs/query.py)")  # ``writer_lock(cfg.output_dir, *QUERY_WRITER)``


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


@dataclass(frozen=True)
class OutputFiles:
    """Preallocated ``.npy`` files (``output_files``) that whoever scores a training row writes its part of:
    ``scores`` (nq, N) float32, ``layer_scores`` (L, nq, N) float32 in ``layout.names`` order, ``self_influence``
    (N,) float64; None = not asked for. Any process that sees the files may write its own rows."""

    scores: str | None = None
    layer_scores: str | None = None
    self_influence: str | None = None


class BlockOutputs:
    """Scores one block of training rows and writes its columns of the ``OutputFiles``."""

    def __init__(self, files: OutputFiles | None):
        self.arrays = {name: np.load(path, mmap_mode="r+")
                       for name, path in asdict(files or OutputFiles()).items() if path is not None}

    def __call__(self, query: StackedQuery | RepSimQuery, block: TrainBlock, offset: int) -> torch.Tensor:
        """The block's scores (nq, nt); its parts of the files at columns offset … offset + nt − 1."""
        if "layer_scores" in self.arrays:
            layers = query.scores(block, per_layer=True)
            self.arrays["layer_scores"][:, :, offset:offset + len(block)] = layers.float().cpu().numpy()
            scores = layers.sum(dim=0)
        else:
            scores = query.scores(block)
        if "scores" in self.arrays:
            self.arrays["scores"][:, offset:offset + len(block)] = scores.float().cpu().numpy()
        if "self_influence" in self.arrays:
            self_influence = query.train_self_influence(block).double().cpu().numpy()
            self.arrays["self_influence"][offset:offset + len(block)] = self_influence
        return scores

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays = {}


def score_blocks(query: StackedQuery | RepSimQuery, blocks: Iterable[tuple[int, list[str], TrainBlock]], topk: TopK,
                 files: OutputFiles | None = None, on_block=None) -> None:
    """Score (global offset, ids, block) triples into ``topk`` (and the asked-for ``files``)."""
    outputs = BlockOutputs(files)
    try:
        for offset, ids, block in blocks:
            topk.update(outputs(query, block, offset), offset)
            if on_block is not None:
                on_block(len(ids))
    finally:
        outputs.close()


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


def query_examples(path: Path, tokenizer, max_length: int, per_token: bool
                   ) -> tuple[list[TokenizedExample], list[tuple[str, int, str]]]:
    """The tokenized queries of a file and, with ``per_token``, after them one copy of each query per target
    token whose labels keep that token only (its loss alone), with (query id, position, token text) each.

    Raises:
        ConfigError: the file holds no queries.
    """
    queries = tokenized(Path(path), tokenizer, max_length)
    if not queries:
        raise ConfigError(f"{path} holds no queries")
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
        self.per_token = cfg.query.per_token

    def __call__(self, queries_path: Path) -> QueryRows:
        """The featurized queries of a file (``query.per_token``: and their tokens)."""
        queries, tokens = query_examples(queries_path, self.tokenizer, self.max_length, self.per_token)
        start = time.perf_counter()
        parts = [self.featurizer(ids, batch)
                 for ids, batch in token_batches(queries, self.batch_size, self.tokenizer.pad_token_id)]
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

    def score(self, query_columns: dict[str, torch.Tensor], route: str, k: int, files: OutputFiles | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores (nq, k), global row indices (nq, k)) of one query batch; the asked-for ``files`` written."""
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
        with tqdm(total=num_train, unit="ex", desc="stage 3: score", disable=not self.cfg.progress) as bar:
            score_blocks(query, blocks, topk, files, bar.update)
        return topk.scores, topk.index

    def close(self) -> None:
        pass


class QueryBackend:
    """What ``run_query`` drives: a featurizer (query file → ids, columns, seconds) and a scorer
    (``score(columns, route, k, files)``, ``info``); closing it releases both."""

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
) -> dict:
    """One query file through ``backend``: featurize, choose the route, score, write the outputs (holding the
    output folder's writer lock, ``QUERY_WRITER``: one run writes a folder's query outputs at a time)."""
    check_outputs(cfg, manifest)
    with writer_lock(cfg.output_dir, *QUERY_WRITER):
        return _answer(cfg, manifest, header, backend, queries_path, stored)


def _answer(cfg: Config, manifest, header: dict, backend, queries_path: Path, stored: bool) -> dict:
    queries = backend.featurize(queries_path)
    row_ids = queries.row_ids
    route = choose_route(len(row_ids), list(ranks(header).values()), stored=stored,
                         train_self=cfg.query.normalize or cfg.query.self_influence)
    start = time.perf_counter()
    layers = [layer["name"] for layer in manifest.meta["layers"]]
    with output_files(cfg, manifest, len(row_ids)) as files:
        scores, index = backend.score(queries.columns, route, min(cfg.query.top_k, manifest.num_rows), files)
        precision = Precision.of(cfg, resolve_device(cfg.model.device)).describe()
        facts = {"route": route, "precision": precision}
        report = write_query_outputs(cfg, manifest, header, queries, scores, index, layers, files, **facts)
    return {**report, **backend.info, **facts, "query_gradient_seconds": queries.seconds,
            "score_seconds": time.perf_counter() - start}


def check_outputs(cfg: Config, manifest) -> None:
    """Refuse, before any work, outputs that a RepSim index cannot give (it has no gradients)."""
    asked = [key for key in ("self_influence", "per_layer", "per_token") if getattr(cfg.query, key)]
    if manifest.kind == "hidden" and asked:
        raise ConfigError(f"query.{asked[0]}: a RepSim index holds hidden states, not gradients")


def write_query_outputs(cfg: Config, manifest, header: dict, queries: QueryRows, scores: torch.Tensor,
                        index: torch.Tensor, layers: list[str], files: OutputFiles, **facts) -> dict:
    """``topk.parquet`` from the queries' rows of (n, k) scores and row indices (``topk_per_token.parquet`` from
    the token rows), ``self_influence.parquet``, and JSON sidecars of the ``.npy`` outputs; each records the
    config used and ``facts`` (route, precision). Reads the ids of the top-k rows only (all N ids only for the
    sidecars of the full-score files, which are O(N) themselves)."""
    output_dir = Path(cfg.output_dir)
    meaning = NORMALIZED_MEANING if cfg.query.normalize else SCORE_MEANING[header.get("kind", "none")]
    meta = {"config": cfg.to_dict(), "index": str(cfg.index_path), "score": meaning, **facts}
    nq = len(queries.ids)
    train_ids = ids_of_rows(cfg.index_path, manifest, index.reshape(-1).tolist())
    write_table(output_dir / "topk.parquet", topk_table(queries.ids, train_ids, scores[:nq], index[:nq]), meta)
    report = {"topk_path": str(output_dir / "topk.parquet"), "scores_path": None, "queries": nq,
              "train": manifest.num_rows}
    if queries.tokens:
        table = token_topk_table(queries.tokens, train_ids, scores[nq:], index[nq:])
        write_table(output_dir / "topk_per_token.parquet", table, meta)
        report.update(topk_per_token_path=str(output_dir / "topk_per_token.parquet"), tokens=len(queries.tokens))
    sidecars = {"scores": files.scores, "layer_scores": files.layer_scores}
    if any(sidecars.values()):
        ids = {"query_ids": queries.row_ids, "train_ids": read_ids(cfg.index_path, manifest)}
    if files.scores is not None:
        write_json(output_dir / "scores.json", {**meta, **ids})
        report["scores_path"] = str(output_dir / "scores.npy")
    if files.layer_scores is not None:
        write_json(output_dir / "layer_scores.json", {**meta, "layers": layers, **ids})
        report["layer_scores_path"] = str(output_dir / "layer_scores.npy")
    if files.self_influence is not None:
        write_self_influence(cfg, manifest, np.load(files.self_influence, mmap_mode="r"),
                             {**meta, "score": SELF_INFLUENCE_MEANING})
        report["self_influence_path"] = str(output_dir / "self_influence.parquet")
    return report


def write_self_influence(cfg: Config, manifest, values: np.ndarray, meta: dict) -> None:
    """``self_influence.parquet`` (train_id, self_influence) from the (N,) values, one shard's ids at a time."""
    schema = pa.schema([("train_id", pa.string()), ("self_influence", pa.float64())])

    def tables():
        for record in manifest.shards:
            start = record.index * manifest.shard_size
            ids = read_ids(cfg.index_path, manifest, shards=[record.index])
            yield pa.table([pa.array(ids, pa.string()), pa.array(values[start:start + len(ids)])], schema=schema)

    write_tables(Path(cfg.output_dir) / "self_influence.parquet", schema, tables(), meta)


SCORE_MEANING = {  # by curvature
    "woodbury": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (truncated SVD + Woodbury); > 0: proponent (training on t "
                "lowers the query loss); ~ rise of the query loss (nats) if t were left out",
    "exact": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (exact per-layer inverse); > 0: proponent; ~ rise of the "
             "query loss (nats) if t were left out",
    "kfac": "I(t,q) = g_q^T (H_KFAC + lambda I)^-1 g_t, H_KFAC = (A (x) S) / tokens in the projected space; > 0: "
            "proponent; ~ rise of the query loss (nats) if t were left out",
    "ekfac": "I(t,q) = g_q^T (H_EKFAC + lambda I)^-1 g_t, K-FAC's eigenbasis with the stored gradients' eigenvalues; "
             "> 0: proponent; ~ rise of the query loss (nats) if t were left out",
    "identity": "g_q^T g_t (no curvature); > 0: proponent; unscaled",
    "none": "cosine of last-layer last-token hidden states in [-1, 1]; similarity, not influence",
}
NORMALIZED_MEANING = "I(t,q) / sqrt(I(t,t) I(q,q)) in [-1, 1]; > 0: proponent"
SELF_INFLUENCE_MEANING = ("I(t,t) = g_t^T H^-1 g_t, the example's influence on its own loss; large: the model fits t "
                          "unlike the rest (outlier, mislabel or memorized)")


def topk_table(query_ids: list[str], train_ids, scores: torch.Tensor, index: torch.Tensor) -> pa.Table:
    """One row per (query, rank) from (nq, k) scores and training row indices (``train_ids[row]``: an id)."""
    scores, index = scores.float().cpu().numpy(), index.cpu().numpy()
    k = scores.shape[1]
    return pa.table({
        "query_id": pa.array(np.repeat(query_ids, k).tolist(), pa.string()),
        "rank": pa.array(np.tile(np.arange(1, k + 1), len(query_ids)), pa.int32()),
        "train_id": pa.array([train_ids[i] for i in index.reshape(-1)], pa.string()),
        "score": pa.array(scores.reshape(-1), pa.float32()),
    })


def token_topk_table(tokens: list[tuple[str, int, str]], train_ids, scores: torch.Tensor,
                     index: torch.Tensor) -> pa.Table:
    """``topk_table`` of the token rows, with each row's query id, token position and token text."""
    k = scores.shape[1]
    table = topk_table([f"{query}@{position}" for query, position, _ in tokens], train_ids, scores, index)
    repeat = lambda values, kind: pa.array(np.repeat(np.array(values, dtype=object), k).tolist(), kind)  # noqa: E731
    return pa.table({"query_id": repeat([t[0] for t in tokens], pa.string()),
                     "position": repeat([t[1] for t in tokens], pa.int32()),
                     "token": repeat([t[2] for t in tokens], pa.string()),
                     **{name: table[name] for name in ("rank", "train_id", "score")}})


@contextmanager
def output_files(cfg: Config, manifest, num_rows: int):
    """The ``OutputFiles`` of a batch of ``num_rows`` query rows: each asked-for ``.npy`` preallocated (a full disk fails here, before
    any work) under a temporary name that replaces ``<output_dir>/<name>.npy`` only on success; the
    self-influence values live in a temporary file that ``write_query_outputs`` turns into Parquet."""
    num_train, num_layers = manifest.num_rows, len(manifest.meta["layers"])
    shapes = {"scores": ((num_rows, num_train), np.float32, cfg.query.full_scores),
              "layer_scores": ((num_layers, num_rows, num_train), np.float32, cfg.query.per_layer),
              "self_influence": ((num_train,), np.float64, cfg.query.self_influence)}
    paths = {}
    with ExitStack() as stack:
        for name, (shape, dtype, asked) in shapes.items():
            if not asked:
                continue
            path = Path(cfg.output_dir) / f"{name}.npy"
            if name == "self_influence":  # in self_influence.parquet by the end: the values' file always goes
                tmp = temporary_path(path)
                stack.callback(tmp.unlink, missing_ok=True)
            else:
                tmp = stack.enter_context(atomic_path(path))
            array = preallocated_memmap(tmp, dtype, shape)
            array.flush()
            del array
            paths[name] = str(tmp)
        yield OutputFiles(**paths)
