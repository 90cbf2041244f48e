"""Curvature coordinates of the queries: g'_q = V_rᵀ g_q (the stored g'_t of the training rows are the curvature
folder's, ``lorif_ray.store.CurvatureFolder.stored_coordinates``).

LoRIF's curvature term Σ_j w_j g'_{q,j} g'_{t,j} needs g'_t of every training row. Recomputing it costs
r·D per row per layer at every query batch; storing it costs r numbers per Woodbury layer per example,
once (``query.store_coordinates``). With g'_t stored, a scorer needs no V_r at all: g'_q is made by a
``QueryProjector`` that holds V_r of some layers (on Ray, each query actor projects a share of them).
"""

from __future__ import annotations

from typing import Iterable

import torch

from lorif_ray.config import Config
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import math_dtype
from lorif_ray.stages.curvature import load_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.store import CurvatureFolder, Manifest
from lorif_ray.store.curvature_folder import ranks
from lorif_ray.store.schema import layer_columns


class QueryProjector:
    """g'_q = V_rᵀ g_q of query rows at some Woodbury layers; holds only those layers' V_r.

    Args:
        folder: the curvature folder (V_r of ``layers`` read from it, checked against ``cfg``).
        cfg: the run config (fit settings, device).
        manifest: the index's manifest (layer shapes, store kind).
        layers: the layers to project (None = every Woodbury layer).

    Example:
        >>> projector = QueryProjector(folder, cfg, manifest, layers=["transformer.h.0.mlp.c_fc"])
        >>> projector(query_columns)["transformer.h.0.mlp.c_fc"].shape   # (nq, r)
    """

    def __init__(self, folder: CurvatureFolder, cfg: Config, manifest: Manifest, layers: Iterable[str] | None = None,
                 device=None):
        self.device = resolve_device(device or cfg.model.device)
        self.dtype = math_dtype(self.device, cfg.precision.math)
        names = set(ranks(folder.header()) if layers is None else layers)
        curvature = load_curvature(folder, cfg, manifest, self.device, self.dtype, vectors=names)
        self.kind = manifest.kind
        self.specs = [s for s in layer_specs(manifest) if s.name in names]
        self.vectors = {s.name: curvature[s.name].low_rank[0] for s in self.specs}
        self.weights = {s.name: curvature[s.name].low_rank[1] for s in self.specs}

    def __call__(self, query_columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Query store columns {column: (nq, width)} → {layer: g'_q (nq, r)} on this projector's device."""
        columns = {c: query_columns[c].to(device=self.device, dtype=self.dtype)
                   for s in self.specs for c in layer_columns(self.kind, s.name)}
        blocks = blocks_from_columns(self.specs, self.kind, columns)
        return {name: blocks[name].dense() @ vectors for name, vectors in self.vectors.items()}

    def query_side_terms(self, coordinates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: g'_q (nq, r)} (from ``__call__``) → {layer: h_q = V_r (w ⊙ g'_q) (nq, D)}, the
        curvature term's query side (``StackedQuery(route="query", query_side_terms=...)``)."""
        return {name: (coordinates[name] * self.weights[name]) @ self.vectors[name].T for name in self.vectors}
