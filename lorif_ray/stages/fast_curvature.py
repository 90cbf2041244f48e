"""Stage 2 from device-resident factors, optionally storing g'_t = V_rᵀ g_t for fast queries.

Same results as ``run_curvature`` (same random start, same passes, same file), organised for a GPU:

- each layer's columns are read from Parquet once and kept on the device (c(d1+d2) numbers per row),
  instead of once per power-iteration pass;
- every pass GᵀG Q is done chunk by chunk: a chunk's rows vec(u vᵀ) are formed (the Khatri–Rao
  product of its u and v rows; G is never materialized) and hit Q with two GEMMs, optionally in
  ``matmul_dtype`` (bf16 / tf32 on a GPU) with a float32/float64 accumulator;
- with ``store_coordinates`` the final pass's sketch Y = G Q is kept and g'_t = V_rᵀ g_t = Y (Qᵀ V_r) is
  written per layer (``lorif_ray.stages.coordinates``): no extra pass over G, and a query then costs
  O(c²(d1+d2) + r) per pair instead of recomputing g'_t.

Storage of g'_t: r numbers per Woodbury layer per example, e.g. GPT-2 small at r = 4096 over 48 layers
is 192k numbers/example, 5.3× the f=4 c=1 factors; the report states it.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.math.influence import dense_from_factors
from lorif_ray.model.loading import resolve_device
from lorif_ray.stages.coordinates import (
    CoordinateWriter,
    coordinates_dir,
    coordinates_from_sketch,
    coordinates_match,
    write_rows,
)
from lorif_ray.stages.curvature import curvature_layers, layer_curvature, prepare_curvature, save_curvature
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.inputs import math_dtype
from lorif_ray.store import iter_batches, open_index


def load_layer_rows(index_path, manifest, spec: LayerSpec, *, device, dtype, batch_rows: int = 65536):
    """All rows of one layer, resident: (u (N, d1, c), v (N, d2, c)) for factors, (g (N, D), None) for dense."""
    kind = manifest.kind
    names = [f"{spec.name}.u", f"{spec.name}.v"] if kind == "factors" else [f"{spec.name}.g"]
    parts = [cols for _, cols in iter_batches(index_path, names, batch_rows=batch_rows, out_dtype=dtype,
                                              device=device, manifest=manifest)]
    full = {n: torch.cat([p[n] for p in parts]) for n in names}
    if kind == "factors":
        n = full[names[0]].shape[0]
        return full[names[0]].reshape(n, spec.d1, spec.c), full[names[1]].reshape(n, spec.d2, spec.c)
    return full[names[0]], None


class ResidentGram:
    """GᵀG Q from resident rows (factors or dense), chunk by chunk; optionally keeps the sketch G Q.

    Args:
        u, v: (N, d1, c), (N, d2, c) factors — or u = dense rows (N, D) and v = None.
        chunk_rows: rows formed densely at a time (memory: chunk_rows · D).
        matmul_dtype: dtype of the two GEMMs' inputs (None = Q's dtype); results accumulate in Q's dtype.
        keep_sketch: keep the last call's Q and G Q (for ``coordinates_from_sketch``).
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor | None, *, chunk_rows: int = 4096,
                 matmul_dtype: torch.dtype | None = None, keep_sketch: bool = False):
        self.u, self.v, self.chunk_rows, self.matmul_dtype = u, v, chunk_rows, matmul_dtype
        self.keep_sketch = keep_sketch
        self.last_q: torch.Tensor | None = None
        self.last_sketch: torch.Tensor | None = None  # (N, k) = G Q of the last call

    def __len__(self) -> int:
        return self.u.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.v is None:
            return self.u[start:stop]
        return dense_from_factors(self.u[start:stop], self.v[start:stop])  # Khatri–Rao rows (n, D)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        mm = self.matmul_dtype or q.dtype
        qm = q.to(mm)
        out = torch.zeros_like(q)
        sketch = torch.empty(len(self), q.shape[1], dtype=q.dtype, device=q.device) if self.keep_sketch else None
        for start in range(0, len(self), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(self))
            rows = self.rows(start, stop).to(mm)
            y = rows @ qm  # (n, k)
            if sketch is not None:
                sketch[start:stop] = y
            out += (rows.T @ y).to(q.dtype)
        if self.keep_sketch:
            self.last_q, self.last_sketch = q, sketch
        return out

    def gram(self, dtype=torch.float64) -> torch.Tensor:
        """GᵀG (D, D) in one pass."""
        dim = self.rows(0, 1).shape[1]
        out = torch.zeros(dim, dim, dtype=dtype, device=self.u.device)
        for start in range(0, len(self), self.chunk_rows):
            rows = self.rows(start, min(start + self.chunk_rows, len(self))).to(dtype)
            out += rows.T @ rows
        return out

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """G V (N, r) in one pass."""
        parts = [self.rows(s, min(s + self.chunk_rows, len(self))).to(vectors.dtype) @ vectors
                 for s in range(0, len(self), self.chunk_rows)]
        return torch.cat(parts)


CHUNK_BYTES = 512 * 2**20  # dense rows formed at a time per GEMM (chunk_rows · D numbers)


def resident_bytes(manifest, dtype: torch.dtype) -> int:
    """Memory of the largest layer's rows held resident (c(d1+d2) or D numbers per row)."""
    size = torch.finfo(dtype).bits // 8
    widths = {}
    for column, width in manifest.columns.items():
        layer = column.rsplit(".", 1)[0]
        widths[layer] = widths.get(layer, 0) + width
    return manifest.num_rows * max(widths.values(), default=0) * size


def fits_resident(cfg: Config, fraction: float = 0.25) -> bool:
    """Whether stage 2 may hold one layer's rows on the device: at most ``fraction`` of its memory
    (the GPU's, or this machine's RAM)."""
    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return resident_bytes(open_index(cfg.index_path), math_dtype(device)) <= fraction * total


def run_curvature_fast(cfg: Config, *, store_coordinates: bool = False, coordinates_dtype: str | None = None,
                       chunk_rows: int | None = None, matmul_dtype: torch.dtype | None = None, device=None) -> dict:
    """Stage 2 with each layer's rows resident on the device; writes the same ``curvature.safetensors`` as
    ``run_curvature`` and, with ``store_coordinates``, g'_t per Woodbury layer (see module docstring).

    Args:
        store_coordinates: also write g'_t (``query.store_coordinates``).
        coordinates_dtype: float32 | float16 | bfloat16 for the stored g'_t (None = the index's ``dtype``).
        chunk_rows: rows formed densely per GEMM (None = as many as fit ``CHUNK_BYTES``, 64 … 4096).
        matmul_dtype: e.g. torch.bfloat16 for the GEMMs on a GPU (None = the math dtype).
        device: default ``cfg.model.device``.

    Returns:
        The stage report (+ ``coordinates``: path, bytes per example, total bytes).
    """
    coordinates_dtype = coordinates_dtype or cfg.dtype
    manifest, meta, reusable = prepare_curvature(cfg)
    kind, specs, device, dtype = curvature_layers(cfg, manifest, device)
    store_coordinates = store_coordinates and kind == "woodbury"
    if reusable and (not store_coordinates or coordinates_match(cfg, coordinates_dtype)):
        return {"reused": True, "path": str(cfg.curvature_path)}
    writer = CoordinateWriter(coordinates_dir(cfg), manifest.num_rows, coordinates_dtype) if store_coordinates else None
    results = {}
    start = time.perf_counter()
    for spec in tqdm(specs, desc="stage 2: curvature (resident)", unit="layer", disable=not cfg.progress):
        u, v = load_layer_rows(cfg.index_path, manifest, spec, device=device, dtype=dtype)
        rows = chunk_rows or max(64, min(4096, CHUNK_BYTES // (spec.dim * u.element_size())))
        gram = ResidentGram(u, v, chunk_rows=rows, matmul_dtype=matmul_dtype, keep_sketch=store_coordinates)
        curvature = layer_curvature(cfg, kind, spec, gram, lambda gram=gram: gram.gram(), dtype, device)
        results[spec.name] = curvature
        if writer is not None:
            coords = coordinates_from_sketch(curvature.vectors, gram.last_q, gram.last_sketch)
            if coords is None:
                coords = gram.project(curvature.vectors)
            write_rows(writer.begin(spec.name, coords.shape[1]), 0, coords, coordinates_dtype)
            writer.commit(spec.name)
        del u, v, gram
    report = save_curvature(cfg, meta, kind, results, time.perf_counter() - start)
    if writer is not None:
        report["coordinates"] = writer.finish(cfg.curvature_path)
    return report
