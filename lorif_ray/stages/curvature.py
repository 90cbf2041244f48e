"""Stage 2: the curvature of every layer from the index, and optionally the stored g'_t of every row.

One driver, ``run_curvature``, for every placement of the rows: layer by layer it asks a *Gram backend*
for the layer's Gram operator (GᵀG Q by one pass over the rows, or the D×D GᵀG) and fits the method's
``Curvature`` (``lorif_ray.math.curvature``) from it. In this process the backend is ``LocalGram``
(each layer's rows resident on the device when they fit, else streamed from Parquet once per pass); on
Ray it is ``lorif_ray.distributed.curvature.RayGram``, whose actors each sum the same operator over their
shard group. Where the rows live changes the speed, never the numbers (tests/stages/test_paths.py).

With ``query.store_coordinates`` every low-rank layer's g'_t = V_rᵀ g_t is written for every row
(``lorif_ray.stages.coordinates``), in ``precision.coordinates``, by one more pass over the rows.
A curvature file made with the same settings from the same index is reused.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.math.curvature import Curvature, FitSettings, curvature_class
from lorif_ray.math.rsvd import GramOperator, RowSource
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.stages.coordinates import CoordinateWriter, coordinates_dir, coordinates_match, write_rows
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.inputs import check_method_matches_index, layer_specs
from lorif_ray.stages.rows import layer_rows
from lorif_ray.stages.saved_curvature import curvature_header, curvature_meta, save_curvature
from lorif_ray.store import Manifest, open_index

log = logging.getLogger(__name__)


class LayerGram(GramOperator):
    """A layer's Gram operator over rows in this process (all rows, or a Ray actor's shard group starting
    at global row ``first_row``), which can also write those rows' g'_t."""

    def __init__(self, rows: RowSource, matmul_dtype: torch.dtype | None = None, first_row: int = 0):
        super().__init__(rows, matmul_dtype)
        self.first_row = first_row

    def write_coordinates(self, vectors: torch.Tensor, path: str, dtype: str) -> int:
        """g'_t = V_rᵀ g_t of these rows into their rows of ``path`` (one pass); returns the row count."""
        coordinates = self.project(vectors)
        write_rows(path, self.first_row, coordinates, dtype)
        return coordinates.shape[0]


class LocalGram:
    """The Gram backend of one process: each layer's rows resident on ``device`` when they fit, else streamed.

    Args:
        resident: force (True) or forbid (False) resident rows; None = when they fit.
    """

    def __init__(self, cfg: Config, manifest: Manifest, precision: Precision, device, resident: bool | None = None):
        self.cfg, self.manifest, self.precision, self.device = cfg, manifest, precision, device
        self.resident = resident

    def layer(self, spec: LayerSpec) -> LayerGram:
        rows = layer_rows(self.cfg.index_path, self.manifest, spec, dtype=self.precision.math, device=self.device,
                          batch_rows=self.cfg.query.train_batch_rows, resident=self.resident)
        return LayerGram(rows, self.precision.matmul)

    def close(self) -> None:
        pass


def fit_settings(cfg: Config, dtype: torch.dtype) -> FitSettings:
    return FitSettings(rank=cfg.r, damping=cfg.damping, damping_scale=cfg.damping_scale, oversample=cfg.oversample,
                       power_iters=cfg.svd_power_iters, seed=cfg.seed, dtype=dtype)


def prepare_curvature(cfg: Config) -> tuple[Manifest, dict, bool]:
    """Open the index (its files' sizes checked; their contents as they are read); the curvature's
    metadata; whether a saved curvature (and, if asked, stored g'_t) already matches it."""
    manifest = open_index(cfg.index_path)
    check_method_matches_index(cfg, manifest)
    meta = curvature_meta(cfg, manifest)
    reusable = cfg.curvature_path.exists() and curvature_header(cfg.curvature_path).get("method_meta") == meta
    if reusable and stores_coordinates(cfg):
        reusable = coordinates_match(cfg, cfg.precision.coordinates)
    return manifest, meta, reusable


def stores_coordinates(cfg: Config) -> bool:
    """Whether stage 2 writes g'_t: asked for, and the curvature has a low-rank term."""
    return cfg.query.store_coordinates and cfg.method.curvature == "woodbury"


def run_curvature(cfg: Config, backend_class=LocalGram) -> dict:
    """Fit and save the curvature of every layer at ``cfg.curvature_path``; returns the stage report.

    Args:
        backend_class: ``(cfg, manifest, precision, device) →`` where the rows are: ``layer(spec)`` gives
            a ``LayerGram``-like operator, ``close()`` releases it; default ``LocalGram`` (this process).
    """
    manifest, meta, reusable = prepare_curvature(cfg)
    if reusable:
        log.info("stage 2: reusing %s (same settings, same index)", cfg.curvature_path)
        return {"reused": True, "path": str(cfg.curvature_path)}
    warn_if_unsafe(cfg)
    device = resolve_device(cfg.model.device)
    precision = Precision.of(cfg, device)
    kind = cfg.method.curvature
    specs = layer_specs(manifest) if kind != "none" else []
    fit = curvature_class(kind).fit if specs else None
    backend = backend_class(cfg, manifest, precision, device) if specs and curvature_class(kind).reads_rows else None
    writer = CoordinateWriter(coordinates_dir(cfg), manifest.num_rows, cfg.precision.coordinates) \
        if stores_coordinates(cfg) else None
    settings = fit_settings(cfg, precision.math)
    results: dict[str, Curvature] = {}
    start = time.perf_counter()
    try:
        for spec in tqdm(specs, desc="stage 2: curvature", unit="layer", disable=not cfg.progress):
            gram = backend.layer(spec) if backend is not None else None
            results[spec.name] = curvature = fit(gram, spec.dim, spec.name, settings)
            if writer is not None:
                path = writer.begin(spec.name, curvature.rank)
                gram.write_coordinates(curvature.low_rank[0], path, cfg.precision.coordinates)
                writer.commit(spec.name)
            del gram
    finally:
        if backend is not None:
            backend.close()
    seconds = time.perf_counter() - start
    layers = save_curvature(cfg.curvature_path, meta, results, {"precision": precision.describe()})
    report = {"reused": False, "path": str(cfg.curvature_path), "seconds": seconds, "layers": layers,
              "precision": precision.describe()}
    if writer is not None:
        report["coordinates"] = writer.finish(cfg.curvature_path)
    return report
