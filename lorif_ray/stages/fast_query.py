"""Stage 3, fast path: the whole index resident on the device, every layer scored by batched products.

``ResidentIndex`` reads the shards once into the stacked layout of ``lorif_ray.math.scoring``
(layers of equal shape side by side, (L, N, c, d) per group; optional stored g'_t as one (N, Σr)
matrix); ``run_query_fast`` featurizes the queries, prepares a ``StackedQuery`` and scores the resident
rows ``chunk_rows`` at a time into an on-device top-k. Outputs are those of ``run_query``.

A resident index can be saved as one safetensors file (``save``/``load``) so a later process loads
it with a plain file read + one host→device copy instead of decoding Parquet.
"""

from __future__ import annotations

import time

import torch

from lorif_ray.config import Config
from lorif_ray.math.scoring import ScoreLayout, StackedQuery, TrainBlock, score_in_chunks
from lorif_ray.model.loading import resolve_device
from lorif_ray.stages.curvature import check_method_matches_index, layer_specs, load_curvature
from lorif_ray.stages.coordinates import coordinates_match, load_coordinates
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import math_dtype
from lorif_ray.stages.query import TopK, featurize_queries, full_scores_file, write_query_outputs
from lorif_ray.store import iter_batches, load_tensors, open_index, save_tensors


class ResidentIndex:
    """Every training row of an index in the stacked scoring layout, on one device.

    Attributes:
        ids: example ids in index order.
        block: the rows as a ``TrainBlock``.
    """

    def __init__(self, ids: list[str], block: TrainBlock):
        self.ids, self.block = ids, block

    @classmethod
    def from_index(cls, index_path, manifest, layout: ScoreLayout | None, *, device, dtype,
                   coordinates: dict[str, torch.Tensor] | None = None, batch_rows: int = 8192,
                   shards: list[int] | None = None, pin: bool = True) -> "ResidentIndex":
        """Read the shards (all, or a consecutive run ``shards``) into the stacked layout on ``device``.

        ``layout`` None reads a "hidden" store (RepSim) as ``block.dense``; ``coordinates`` are the
        stored g'_t of exactly these rows.
        """
        start, stop = manifest.row_range(shards) if shards is not None else (0, manifest.num_rows)
        n = stop - start
        device = torch.device(device)
        factors, dense = None, None
        if layout is not None and layout.kind == "factors":
            factors = [(torch.empty(len(g.names), n, g.c, g.d1, dtype=dtype, device=device),
                        torch.empty(len(g.names), n, g.c, g.d2, dtype=dtype, device=device))
                       for g in layout.factor_groups]
        else:
            width = manifest.columns["hidden"] if layout is None else sum(layout.dense_dims.values())
            dense = torch.empty(n, width, dtype=dtype, device=device)
        ids: list[str] = []
        pinned = pin and device.type == "cuda"
        for batch_ids, columns in iter_batches(index_path, batch_rows=batch_rows, out_dtype=dtype, device="cpu",
                                               manifest=manifest, shards=shards):
            at, take = len(ids), len(batch_ids)
            part = TrainBlock(dense=columns["hidden"]) if layout is None else layout.train_block(columns)
            if pinned:  # page-locked staging, so the host→device copies run asynchronously
                part = TrainBlock(None if part.factors is None else [(u.pin_memory(), v.pin_memory())
                                                                     for u, v in part.factors],
                                  None if part.dense is None else part.dense.pin_memory())
            if factors is not None:
                for (u, v), (pu, pv) in zip(factors, part.factors):
                    u[:, at:at + take].copy_(pu, non_blocking=pinned)
                    v[:, at:at + take].copy_(pv, non_blocking=pinned)
            else:
                dense[at:at + take].copy_(part.dense, non_blocking=pinned)
            ids.extend(batch_ids)
        coords = None
        if coordinates is not None:
            coords = torch.cat([coordinates[name] for name in layout.coordinate_names], dim=1)
            if coords.shape[0] != n:
                raise ValueError(f"{coords.shape[0]} rows of stored g'_t for {n} index rows")
            coords = coords.to(device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return cls(ids, TrainBlock(factors, dense, coords))

    def nbytes(self) -> int:
        return self.block.nbytes()

    def save(self, path) -> None:
        """One safetensors file of the resident tensors (+ ids in the metadata)."""
        tensors = {}
        for i, (u, v) in enumerate(self.block.factors or []):
            tensors[f"factors.{i}.u"], tensors[f"factors.{i}.v"] = u, v
        if self.block.dense is not None:
            tensors["dense"] = self.block.dense
        if self.block.coordinates is not None:
            tensors["coordinates"] = self.block.coordinates
        save_tensors(path, tensors, {"ids": self.ids})

    @classmethod
    def load(cls, path, device="cpu") -> "ResidentIndex":
        tensors, meta = load_tensors(path, device=device)
        count = len([k for k in tensors if k.startswith("factors.") and k.endswith(".u")])
        factors = [(tensors[f"factors.{i}.u"], tensors[f"factors.{i}.v"]) for i in range(count)] or None
        return cls(meta["ids"], TrainBlock(factors, tensors.get("dense"), tensors.get("coordinates")))


def run_query_fast(cfg: Config, *, use_coordinates: bool | None = None, resident_dtype: torch.dtype | None = None,
                   matmul_dtype: torch.dtype | None = None, chunk_rows: int = 16384, device=None,
                   query_side: bool | None = None) -> dict:
    """Score ``data.queries`` against the resident index; the outputs and report of ``run_query``.

    Args:
        use_coordinates: use stored g'_t (``run_curvature_fast(store_coordinates=True)``); None = when they
            exist and match the curvature.
        resident_dtype: dtype of the resident rows (None = the math dtype; bfloat16 halves GPU memory).
        matmul_dtype: dtype of the big products' inputs (None = the math dtype).
        chunk_rows: training rows per scoring step (memory ≈ L·nq·chunk_rows per factor group).
        query_side: without stored g'_t, the curvature term's route (``StackedQuery``; None = the cheaper).
    """
    manifest = open_index(cfg.index_path)
    check_method_matches_index(cfg.method.name, manifest, cfg.index_path)
    query_ids, query_columns, query_seconds = featurize_queries(cfg, manifest)
    device = resolve_device(device or cfg.model.device)
    dtype = math_dtype(device)
    specs = layer_specs(manifest)
    curvature = load_curvature(cfg, manifest, device, dtype)
    layout = ScoreLayout.build(specs, manifest.kind, curvature)
    if use_coordinates is None:
        use_coordinates = bool(layout.coordinate_groups) and coordinates_match(cfg)
    start = time.perf_counter()
    coords = load_coordinates(cfg, dtype=resident_dtype or dtype) if use_coordinates else None
    resident = ResidentIndex.from_index(cfg.index_path, manifest, layout, device=device,
                                        dtype=resident_dtype or dtype, coordinates=coords)
    load_seconds = time.perf_counter() - start
    blocks = blocks_from_columns(specs, manifest.kind, {k: v.to(device=device, dtype=dtype)
                                                        for k, v in query_columns.items()})
    stacked = StackedQuery(layout, blocks, curvature, normalize=cfg.query.normalize, matmul_dtype=matmul_dtype,
                           keep_vectors=not use_coordinates, query_side=query_side)
    num_queries, num_train = len(query_ids), len(resident.ids)
    topk = TopK(num_queries, min(cfg.query.top_k, num_train), device)
    start = time.perf_counter()
    with full_scores_file(cfg, (num_queries, num_train)) as full:
        def sink(scores, offset):
            full[:, offset:offset + scores.shape[1]] = scores.float().cpu().numpy()

        score_in_chunks(stacked, resident.block, topk, chunk_rows=chunk_rows, sink=sink if full is not None else None)
    report = write_query_outputs(cfg, query_ids, resident.ids, topk.scores, topk.index)
    return {**report, "query_gradient_seconds": query_seconds, "load_seconds": load_seconds,
            "score_seconds": time.perf_counter() - start, "resident_bytes": resident.nbytes(),
            "used_coordinates": bool(use_coordinates)}
