"""Stage 3: score queries against every indexed training example; write top-k (and full scores).

Query gradients are made by the same featurizer (same layers, projections, seed and factor rank)
as the index; the query-side terms are computed once (``prepare_query``: the batched scorer of
``lorif_ray.math.scoring``); training rows stream shard by shard and a running top-k is kept, so
memory does not grow with N (``scores.npy`` is written through a memory map).

Outputs in ``output_dir``: ``topk.parquet`` (query_id, rank, train_id, score) and, with
``query.full_scores``, ``scores.npy`` (float32, queries × train, input order) + ``scores.json``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.influence import PreparedQuery, repsim_scores, self_influence
from lorif_ray.math.scoring import RepSimQuery, ScoreLayout, StackedQuery, TrainBlock
from lorif_ray.model.loading import check_same_model, load_model, model_identity, resolve_device
from lorif_ray.stages.curvature import check_method_matches_index, layer_specs, load_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.index import build_featurizer
from lorif_ray.stages.inputs import math_dtype, require, resolve_inputs, tokenized
from lorif_ray.store import atomic_path, iter_batches, open_index, write_json, write_table


class TopK:
    """Running top-k per query over streamed blocks of scores."""

    def __init__(self, num_queries: int, k: int, device):
        self.k = k
        self.scores = torch.full((num_queries, 0), float("-inf"), device=device)
        self.index = torch.zeros((num_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge (nq, nb) scores of training rows offset … offset + nb − 1."""
        columns = torch.arange(offset, offset + scores.shape[1], device=scores.device).expand_as(scores)
        merged = torch.cat([self.scores, scores], dim=1)
        merged_index = torch.cat([self.index, columns], dim=1)
        best = torch.topk(merged, min(self.k, merged.shape[1]), dim=1)
        self.scores, self.index = best.values, torch.gather(merged_index, 1, best.indices)


class Scorer:
    """Scores of prepared queries against blocks of stored rows, layer by layer (``PreparedQuery``): the
    reference that the batched scorer (``prepare_query``) is checked against in float64."""

    def __init__(self, cfg: Config, manifest, query_columns: dict[str, torch.Tensor], device, dtype,
                 curvature: dict | None = None):
        self.kind, self.normalize = manifest.kind, cfg.query.normalize
        self.specs = layer_specs(manifest)
        if self.kind == "hidden":
            self.query_hidden = query_columns["hidden"]
            return
        self.curvature = curvature or load_curvature(cfg, manifest, device, dtype)  # pass it to reuse it
        blocks = blocks_from_columns(self.specs, self.kind, query_columns)
        self.prepared = {name: PreparedQuery(block, self.curvature[name]) for name, block in blocks.items()}
        if self.normalize:
            self.query_self = sum(self_influence(b, self.curvature[n]) for n, b in blocks.items())

    def __call__(self, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """(nq, nb) scores of one block of training rows."""
        if self.kind == "hidden":
            return repsim_scores(self.query_hidden, columns["hidden"])
        blocks = blocks_from_columns(self.specs, self.kind, columns)
        scores = sum(self.prepared[name].scores(block) for name, block in blocks.items())
        if self.normalize:
            train_self = sum(self_influence(b, self.curvature[n]) for n, b in blocks.items())
            scores = scores / (self.query_self[:, None] * train_self[None, :]).clamp_min(1e-30).sqrt()
        return scores


class QueryFeaturizer:
    """Loads the model once and featurizes query files exactly like the index (a query service keeps one).

    Raises:
        ModelMismatchError / IndexMismatchError: the model or f/c/seed differ from the index's.
    """

    def __init__(self, cfg: Config, manifest):
        model, self.tokenizer = load_model(resolve_inputs(cfg).model_path, dtype=cfg.model.dtype,
                                           device=cfg.model.device, adapter=cfg.model.adapter)
        check_same_model(manifest.meta["model"], model_identity(model), f"index {cfg.index_path}")
        check_index_config(cfg, manifest)
        self.featurizer = build_featurizer(cfg, model, kind=manifest.kind,
                                           layer_names=[s.name for s in layer_specs(manifest)],
                                           factor_iters=manifest.meta["config"]["factor_iters"])
        self.max_length, self.batch_size = manifest.meta["config"]["max_length"], cfg.data.batch_size

    def __call__(self, queries_path: Path) -> tuple[list[str], dict[str, torch.Tensor], float]:
        """Query ids, query columns {column: (nq, width)} in the math dtype, and seconds."""
        queries = tokenized(Path(queries_path), self.tokenizer, self.max_length)
        if not queries:
            raise ConfigError(f"{queries_path} holds no queries")
        start = time.perf_counter()
        parts = [self.featurizer(ids, batch)
                 for ids, batch in token_batches(queries, self.batch_size, self.tokenizer.pad_token_id)]
        columns = {k: torch.cat([p[k] for p in parts]).to(math_dtype(self.featurizer.device)) for k in parts[0]}
        return [q.id for q in queries], columns, time.perf_counter() - start


def featurize_queries(cfg: Config, manifest) -> tuple[list[str], dict[str, torch.Tensor], float]:
    """Query ids, query columns (in the math dtype) and seconds of ``data.queries``."""
    return QueryFeaturizer(cfg, manifest)(require(resolve_inputs(cfg).queries_path, "data.queries"))


def prepare_query(manifest, query_columns: dict[str, torch.Tensor], curvature: dict | None, *, normalize: bool,
                  **options) -> tuple[StackedQuery | RepSimQuery, ScoreLayout | None]:
    """The batched scorer of one query batch and the layout its training blocks take (None: RepSim,
    whose blocks are ``TrainBlock(dense=hidden)``); ``options`` go to ``StackedQuery``."""
    if manifest.kind == "hidden":
        return RepSimQuery(query_columns["hidden"]), None
    specs = layer_specs(manifest)
    layout = ScoreLayout.build(specs, manifest.kind, curvature)
    blocks = blocks_from_columns(specs, manifest.kind, query_columns)
    return StackedQuery(layout, blocks, curvature, normalize=normalize, **options), layout


def run_query(cfg: Config) -> dict:
    """Score ``data.queries`` against the index, streaming its shards; returns a report with the output paths."""
    manifest = open_index(cfg.index_path)
    check_method_matches_index(cfg.method.name, manifest, cfg.index_path)
    query_ids, query_columns, query_seconds = featurize_queries(cfg, manifest)
    device = resolve_device(cfg.model.device)
    dtype = math_dtype(device)
    curvature = None if manifest.kind == "hidden" else load_curvature(cfg, manifest, device, dtype)
    query, layout = prepare_query(manifest, {k: v.to(device=device, dtype=dtype) for k, v in query_columns.items()},
                                  curvature, normalize=cfg.query.normalize)
    num_queries, num_train = len(query_ids), manifest.num_rows
    topk = TopK(num_queries, min(cfg.query.top_k, num_train), device)
    train_ids: list[str] = []
    start = time.perf_counter()
    with full_scores_file(cfg, (num_queries, num_train)) as full, \
            tqdm(total=num_train, unit="ex", desc="stage 3: score", disable=not cfg.progress) as bar:
        for ids, columns in iter_batches(cfg.index_path, batch_rows=cfg.query.train_batch_rows, out_dtype=dtype,
                                         device=device, manifest=manifest):
            block = TrainBlock(dense=columns["hidden"]) if layout is None else layout.train_block(columns)
            scores = query.scores(block)
            topk.update(scores, len(train_ids))
            if full is not None:
                full[:, len(train_ids):len(train_ids) + len(ids)] = scores.float().cpu().numpy()
            train_ids.extend(ids)
            bar.update(len(ids))
    report = write_query_outputs(cfg, query_ids, train_ids, topk.scores, topk.index)
    return {**report, "query_gradient_seconds": query_seconds, "score_seconds": time.perf_counter() - start}


def write_query_outputs(cfg: Config, query_ids: list[str], train_ids: list[str], scores: torch.Tensor,
                        index: torch.Tensor) -> dict:
    """``topk.parquet`` from (nq, k) scores and row indices, and ``scores.json`` next to ``scores.npy``."""
    output_dir = Path(cfg.output_dir)
    meta = {"config": cfg.to_dict(), "index": str(cfg.index_path),
            "score": NORMALIZED_MEANING if cfg.query.normalize else SCORE_MEANING[cfg.method.name]}
    write_table(output_dir / "topk.parquet", topk_table(query_ids, train_ids, scores, index), meta)
    if cfg.query.full_scores:
        write_json(output_dir / "scores.json", {**meta, "query_ids": query_ids, "train_ids": train_ids})
    return {"topk_path": str(output_dir / "topk.parquet"),
            "scores_path": str(output_dir / "scores.npy") if cfg.query.full_scores else None,
            "queries": len(query_ids), "train": len(train_ids)}


SCORE_MEANING = {
    "lorif": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (truncated SVD + Woodbury); > 0: proponent (training on t "
             "lowers the query loss); ~ rise of the query loss (nats) if t were left out",
    "logra": "I(t,q) = g_q^T (G^T G + lambda I)^-1 g_t (exact per-layer inverse); > 0: proponent; ~ rise of the "
             "query loss (nats) if t were left out",
    "graddot": "g_q^T g_t (no curvature); > 0: proponent; unscaled",
    "repsim": "cosine of last-layer last-token hidden states in [-1, 1]; similarity, not influence",
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
    """A float32 .npy memory map that replaces ``<output_dir>/scores.npy`` only on success (None unless
    ``query.full_scores``)."""
    if not cfg.query.full_scores:
        yield None
        return
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(cfg.output_dir) / "scores.npy") as tmp:
        scores = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        yield scores
        scores.flush()
        del scores


def check_index_config(cfg: Config, manifest) -> None:
    """The query must be featurized exactly like the index."""
    stored = manifest.meta["config"]
    wanted = {"f": cfg.f, "seed": cfg.seed}
    if manifest.kind == "factors":
        wanted["c"] = cfg.c
    diff = {k: (stored[k], v) for k, v in wanted.items() if stored[k] != v}
    if diff:
        details = ", ".join(f"{k}: index {a} vs config {b}" for k, (a, b) in diff.items())
        raise IndexMismatchError(f"index {cfg.index_path} was built with other settings ({details})")
