"""Stage 2 from device-resident factors, optionally storing g'_t = V_rᵀ g_t for fast queries.

Same results as ``run_curvature`` (same random start, same passes, same file), organised for a GPU:

- each layer's columns are read from Parquet once and kept on the device (c(d1+d2) numbers per row),
  instead of once per power-iteration pass;
- every pass GᵀG Q is done chunk by chunk: a chunk's rows vec(u vᵀ) are formed (the Khatri–Rao
  product of its u and v rows; G is never materialized) and hit Q with two GEMMs, optionally in
  ``matmul_dtype`` (bf16 / tf32 on a GPU) with a float32/float64 accumulator;
- with ``store_coordinates`` the final pass's sketch Y = G Q is kept and g'_t = V_rᵀ g_t = (Qᵀ V_r)ᵀ y_t
  is written per layer (``<output_dir>/curvature_coordinates/<layer>.npy``, (N, r), index row order):
  no extra pass over G, and a query then costs O(c²(d1+d2) + r) per pair instead of recomputing g'_t.

Storage of g'_t: r numbers per Woodbury layer per example (``coordinate_bytes``), e.g. GPT-2 small at
r = 4096 over 48 layers is 192k numbers/example, 5.3× the f=4 c=1 factors; the report states it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.influence import LayerCurvature, dense_from_factors
from lorif_ray.stages.curvature import curvature_layers, layer_curvature, prepare_curvature, save_curvature
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.store import atomic_path, file_sha256, iter_batches, write_json

COORDINATES_DIR = "curvature_coordinates"
COORDINATE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 stored as raw bits


def coordinates_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / COORDINATES_DIR


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
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor | None, *, chunk_rows: int = 4096,
                 matmul_dtype: torch.dtype | None = None):
        self.u, self.v, self.chunk_rows, self.matmul_dtype = u, v, chunk_rows, matmul_dtype
        self.keep_sketch = False
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


def layer_coordinates(gram: ResidentGram, curvature: LayerCurvature) -> torch.Tensor:
    """g'_t = V_rᵀ g_t for every row (N, r): from the last pass's sketch when it spans V_r, else one pass."""
    vectors = curvature.vectors
    if gram.last_sketch is not None and gram.last_q is not None:
        rotation = gram.last_q.T.to(vectors.dtype) @ vectors  # (k, r); V_r = Q · rotation exactly
        if torch.allclose(gram.last_q.to(vectors.dtype) @ rotation, vectors, rtol=1e-4, atol=1e-5):
            return gram.last_sketch.to(vectors.dtype) @ rotation
    return gram.project(vectors)


def run_curvature_fast(cfg: Config, *, store_coordinates: bool = False, coordinates_dtype: str = "float32",
                       chunk_rows: int = 4096, matmul_dtype: torch.dtype | None = None, device=None) -> dict:
    """Stage 2 with each layer's rows resident on the device; writes the same ``curvature.safetensors`` as
    ``run_curvature`` and, with ``store_coordinates``, g'_t per Woodbury layer (see module docstring).

    Args:
        store_coordinates: also write g'_t (config key proposal: ``query.store_coordinates``).
        coordinates_dtype: float32 | float16 | bfloat16 for the stored g'_t.
        chunk_rows: rows formed densely per GEMM.
        matmul_dtype: e.g. torch.bfloat16 for the GEMMs on a GPU (None = the math dtype).
        device: default ``cfg.model.device``.

    Returns:
        The stage report (+ ``coordinates``: path, bytes per example, seconds).
    """
    if coordinates_dtype not in COORDINATE_DTYPES:
        raise ConfigError(f"coordinates_dtype={coordinates_dtype!r}: choose one of {list(COORDINATE_DTYPES)}")
    manifest, meta, reusable = prepare_curvature(cfg)
    kind, specs, device, dtype = curvature_layers(cfg, manifest, device)
    store_coordinates = store_coordinates and kind == "woodbury"
    if reusable and (not store_coordinates or coordinates_match(cfg, coordinates_dtype)):
        return {"reused": True, "path": str(cfg.curvature_path)}
    results, coords = {}, {}
    start = time.perf_counter()
    for spec in tqdm(specs, desc="stage 2: curvature (resident)", unit="layer", disable=not cfg.progress):
        u, v = load_layer_rows(cfg.index_path, manifest, spec, device=device, dtype=dtype)
        gram = ResidentGram(u, v, chunk_rows=chunk_rows, matmul_dtype=matmul_dtype)
        gram.keep_sketch = store_coordinates
        curvature = layer_curvature(cfg, kind, spec, gram, lambda gram=gram: gram.gram(), dtype, device)
        results[spec.name] = curvature
        if store_coordinates:
            coords[spec.name] = layer_coordinates(gram, curvature).cpu()
        del u, v, gram
    report = save_curvature(cfg, meta, kind, results, time.perf_counter() - start)
    if store_coordinates:
        report["coordinates"] = save_coordinates(cfg, coords, coordinates_dtype, manifest.num_rows)
    return report


def save_coordinates(cfg: Config, coords: dict[str, torch.Tensor], dtype: str, num_rows: int) -> dict:
    """Write g'_t per layer as .npy (N, r) next to the curvature; returns path and storage cost."""
    directory = coordinates_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    layers, total = {}, 0
    for name, values in coords.items():
        array = _to_numpy(values, dtype)
        with atomic_path(directory / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)
        layers[name] = {"file": f"{name}.npy", "rank": int(values.shape[1])}
        total += array.nbytes
    info = {"curvature_sha256": file_sha256(cfg.curvature_path), "dtype": dtype, "rows": num_rows,
            "layers": layers, "bytes_per_example": total / max(num_rows, 1)}
    write_json(directory / "_meta.json", info)
    return {"path": str(directory), "bytes_per_example": info["bytes_per_example"], "total_bytes": total}


def _to_numpy(values: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return values.to(torch.float32).numpy().astype(COORDINATE_DTYPES[dtype])


def coordinates_match(cfg: Config, dtype: str | None = None) -> bool:
    """Stored g'_t exist and belong to the current curvature file."""
    meta_path = coordinates_dir(cfg) / "_meta.json"
    if not meta_path.exists() or not cfg.curvature_path.exists():
        return False
    import json
    info = json.loads(meta_path.read_text())
    return info.get("curvature_sha256") == file_sha256(cfg.curvature_path) and (dtype is None or info["dtype"] == dtype)


def load_coordinates(cfg: Config, *, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Stored g'_t {layer: (N, r)} on ``device``.

    Raises:
        IndexMismatchError: they were computed for another curvature file (re-run stage 2).
    """
    import json
    meta_path = coordinates_dir(cfg) / "_meta.json"
    if not meta_path.exists():
        raise ConfigError(f"no stored g'_t at {meta_path.parent}; run stage 2 with store_coordinates=True")
    info = json.loads(meta_path.read_text())
    if info.get("curvature_sha256") != file_sha256(cfg.curvature_path):
        raise IndexMismatchError(f"{meta_path.parent} belongs to another curvature than {cfg.curvature_path}; "
                                 "re-run stage 2 with store_coordinates=True")
    out = {}
    for name, layer in info["layers"].items():
        tensor = torch.from_numpy(np.load(meta_path.parent / layer["file"]))
        if info["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.to(device=device, dtype=dtype)
    return out


def coordinate_bytes(ranks: list[int], dtype: str = "float32") -> int:
    """Bytes per example of stored g'_t for Woodbury layers of these ranks."""
    return sum(ranks) * (4 if dtype == "float32" else 2)

