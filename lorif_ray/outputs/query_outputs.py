"""What stage 3 hands back, as it is scored and then written: the running two ends of every query row
(``TopK``: proponents, opponents and the score distribution; parts over disjoint rows merge exactly), the
preallocated full-score files whoever scores a block writes its columns of (``OutputFiles``, ``BlockOutputs``),
and the query run's tables (``write_query_outputs``: ``topk``, ``opponents``, ``queries``, the token tables and the
sidecars; ``write_self_influence``). Names, formats and the run record are ``lorif_ray.store.query_run.QueryRun``'s.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from lorif_ray.config import Config
from lorif_ray.data import TrainTexts
from lorif_ray.math.blocks import TrainBlock
from lorif_ray.math.scoring import RepSimQuery, StackedQuery
from lorif_ray.store import IndexFolder
from lorif_ray.store.query_run import BINS_PER_OCTAVE, HALF, NUM_SCORE_BINS, SCORE_OCTAVES, QueryRun

if TYPE_CHECKING:
    from lorif_ray.stages.queries import QueryRows


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


class IndexRowIds:
    """The example ids of training rows, read from the index's shards (``of_rows``: some rows; ``all``: every row)."""

    def __init__(self, index_path, manifest):
        self.index, self.manifest = IndexFolder(index_path), manifest

    def of_rows(self, rows: list[int]) -> dict[int, str]:
        return self.index.ids_of_rows(self.manifest, rows)

    def all(self) -> list[str]:
        return self.index.ids(self.manifest)


class TableRowIds:
    """The example ids of training rows, read from a row table (``TrainTexts``): rows that no index holds (live
    rows, ``lorif_ray.stages.score``)."""

    def __init__(self, texts: TrainTexts):
        self.texts = texts

    def of_rows(self, rows: list[int]) -> dict[int, str]:
        return self.texts.ids(rows)

    def all(self) -> list[str]:
        return self.texts.all_ids()


def write_query_outputs(run: QueryRun, cfg: Config, manifest, queries: QueryRows, examples: list,
                        sources: dict[str, str], ends: TopK, texts: TrainTexts | None,
                        ids: IndexRowIds | TableRowIds | None = None) -> dict:
    """The run's tables from the two ends of every row: ``topk``, ``opponents`` and ``queries`` (with each query's
    score bins) of the queries; ``tokens`` and ``token_topk`` of the token rows; the JSON sidecars of the
    ``.npy`` files. Reads the ids and texts of the ends' rows only (all N ids only for the sidecars of the
    full-score files, which are O(N) themselves); ``ids``: where the training ids come from (None: the index's)."""
    ids = ids or IndexRowIds(cfg.index_path, manifest)
    nq = len(queries.ids)
    rows = ends.index.reshape(-1).tolist() + ends.low_index[:nq].reshape(-1).tolist()
    named = {"train_ids": ids.of_rows(rows),
             "train_texts": texts.texts(rows) if texts is not None else {},
             "query_texts": {e.id: e.text for e in examples}}
    run.write_table("topk", topk_table(queries.ids, ends.scores[:nq], ends.index[:nq], **named))
    run.write_table("opponents", topk_table(queries.ids, ends.low_scores[:nq], ends.low_index[:nq], **named),
                    {"ranks": "rank 1 = the most negative score (the strongest opponent)"})
    run.write_table("queries", queries_table(queries.ids, examples, sources, ends.bins[:nq]))
    report = {"topk_path": str(run.path("topk")), "opponents_path": str(run.path("opponents")), "scores_path": None,
              "queries": nq, "train": manifest.num_rows}
    if run.has("scores") or run.has("layer_scores"):
        train_ids = ids.all()
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
            ids = IndexFolder(cfg.index_path).ids(manifest, shards=[record.index])
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
