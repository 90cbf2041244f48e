"""Curvature coordinates: stored g'_t = V_rᵀ g_t of the training rows (an optional output of stage 2)
and g'_q of the queries.

LoRIF's curvature term Σ_j w_j g'_{q,j} g'_{t,j} needs g'_t of every training row. Recomputing it costs
r·D per row per layer at every query batch; storing it costs r numbers per Woodbury layer per example,
once (``query.store_coordinates``). With g'_t stored, a scorer needs no V_r at all: g'_q is made by a
``QueryProjector`` that holds V_r of some layers (on Ray, each query actor projects a share of them).

On disk: ``<output_dir>/curvature_coordinates/<layer>.npy`` (N, r) in index row order, float32, float16
or bfloat16 (as raw int16 bits), and ``_meta.json`` (dtype, rows, ranks, the ``curvature_id`` of the curvature
file they belong to, read from its header). A layer's file is filled in place through a memory map, by one process or by
stage-2 workers each over its own rows, under a temporary name that is renamed once it is complete;
``_meta.json`` is removed when stage 2 starts and written last, so an interrupted stage 2 leaves
nothing that a query would use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, CorruptShardError, IndexMismatchError
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import math_dtype
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.saved_curvature import curvature_exists, curvature_header, load_curvature, ranks
from lorif_ray.store import Manifest, replace_durably, temporary_path, write_json
from lorif_ray.store.artifacts import preallocated_memmap

COORDINATES_DIR = "curvature_coordinates"
COORDINATE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 as raw bits
META_NAME = "_meta.json"


def coordinates_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / COORDINATES_DIR


class CoordinateWriter:
    """Writes g'_t layer by layer into ``directory`` (removing a previous ``_meta.json`` first).

    Example:
        >>> writer = CoordinateWriter(coordinates_dir(cfg), num_rows=N, dtype="bfloat16")
        >>> path = writer.begin("transformer.h.0.mlp.c_fc", rank=r)
        >>> write_rows(path, 0, coords, "bfloat16")    # or: every worker its own rows, any process
        >>> writer.commit("transformer.h.0.mlp.c_fc")
        >>> writer.finish(cfg.curvature_path)           # after the curvature file is saved
    """

    def __init__(self, directory, num_rows: int, dtype: str):
        if dtype not in COORDINATE_DTYPES:
            raise ConfigError(f"coordinates dtype {dtype!r}: choose one of {list(COORDINATE_DTYPES)}")
        self.directory, self.num_rows, self.dtype = Path(directory), num_rows, dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_NAME).unlink(missing_ok=True)
        self.pending: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}

    def begin(self, layer: str, rank: int) -> str:
        """Create the layer's (N, rank) file under a temporary name; returns that path for ``write_rows``."""
        tmp = temporary_path(self.directory / f"{layer}.npy")
        preallocated_memmap(tmp, COORDINATE_DTYPES[self.dtype], (self.num_rows, rank)).flush()  # OSError if the disk is full
        self.pending[layer], self.ranks[layer] = tmp, rank
        return str(tmp)

    def commit(self, layer: str) -> None:
        """The layer's rows are all written: give the file its name."""
        replace_durably(self.pending.pop(layer), self.directory / f"{layer}.npy")

    def finish(self, curvature_path) -> dict:
        """Record the committed layers with the curvature file they belong to; returns the storage cost."""
        if self.pending:
            raise RuntimeError(f"layers {sorted(self.pending)} were begun but not committed")
        width = sum(self.ranks.values())
        size = np.dtype(COORDINATE_DTYPES[self.dtype]).itemsize
        info = {"curvature_id": curvature_header(curvature_path)["curvature_id"], "dtype": self.dtype,
                "rows": self.num_rows,
                "layers": {name: {"file": f"{name}.npy", "rank": rank} for name, rank in self.ranks.items()},
                "bytes_per_example": width * size}
        write_json(self.directory / META_NAME, info)
        return {"path": str(self.directory), "bytes_per_example": width * size,
                "total_bytes": width * size * self.num_rows}


def write_rows(path, start: int, values: torch.Tensor, dtype: str) -> None:
    """Write rows start … start + len(values) − 1 of a file made by ``CoordinateWriter.begin``.

    Raises:
        ConfigError: the file is not there: this process runs on another node than the one that made
            it, and ``output_dir`` is not on storage that every node shares.
    """
    if not Path(path).exists():
        raise ConfigError(f"{path} is not visible here ({os.uname().nodename}): stage-2 workers write g'_t into "
                          "files the driver creates, so output_dir must be on storage shared by every node")
    array = np.lib.format.open_memmap(path, mode="r+")
    array[start:start + values.shape[0]] = _to_numpy(values, dtype)
    array.flush()
    del array


def _to_numpy(values: torch.Tensor, dtype: str) -> np.ndarray:
    values = values.detach().cpu()
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return values.to(torch.float32).numpy().astype(COORDINATE_DTYPES[dtype])


def _meta(cfg: Config) -> dict | None:
    path = coordinates_dir(cfg) / META_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CorruptShardError(f"unreadable {path}: {error}") from error


def coordinates_match(cfg: Config, dtype: str | None = None) -> bool:
    """Stored g'_t exist (in ``dtype``, if given) and belong to the current curvature file."""
    info = _meta(cfg)
    if info is None or not curvature_exists(cfg.curvature_path):
        return False
    return info.get("curvature_id") == _curvature_id(cfg) and dtype in (None, info["dtype"])


def _curvature_id(cfg: Config) -> str | None:
    return curvature_header(cfg.curvature_path).get("curvature_id")


class StoredCoordinates:
    """Stored g'_t of the current curvature, checked once and memory-mapped once; ``rows`` reads a range.

    Raises:
        ConfigError: stage 2 stored none (run it with ``query.store_coordinates=true``).
        IndexMismatchError: they were computed for another curvature file (re-run stage 2).
        CorruptShardError: a layer's file is missing or has the wrong shape.

    Example:
        >>> stored = StoredCoordinates(cfg)
        >>> stored.rows(0, 100, dtype=torch.float64)["transformer.h.0.mlp.c_fc"].shape   # (100, r)
    """

    def __init__(self, cfg: Config):
        directory = coordinates_dir(cfg)
        info = _meta(cfg)
        if info is None:
            raise ConfigError(f"no stored g'_t at {directory}; run stage 2 with query.store_coordinates=true")
        if info.get("curvature_id") != _curvature_id(cfg):
            raise IndexMismatchError(f"{directory} belongs to another curvature than {cfg.curvature_path}; "
                                     "re-run stage 2 with query.store_coordinates=true")
        self.dtype, self.num_rows = info["dtype"], info["rows"]
        self.arrays = {}
        for name, layer in info["layers"].items():
            path = directory / layer["file"]
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise CorruptShardError(f"cannot read stored g'_t {path}: {error}") from error
            if array.shape != (info["rows"], layer["rank"]):
                raise CorruptShardError(f"{path} holds {array.shape}; {META_NAME} says "
                                        f"{(info['rows'], layer['rank'])}")
            self.arrays[name] = array

    def rows(self, start: int = 0, stop: int | None = None, *, device="cpu", dtype=torch.float32
             ) -> dict[str, torch.Tensor]:
        """{layer: g'_t (n, r)} of rows [start, stop) (default: to the end)."""
        out = {}
        for name, array in self.arrays.items():
            tensor = torch.from_numpy(np.array(array[start:stop]))  # a copy: the map is read-only
            if self.dtype == "bfloat16":
                tensor = tensor.view(torch.bfloat16)
            out[name] = tensor.to(device=device, dtype=dtype)
        return out


class QueryProjector:
    """g'_q = V_rᵀ g_q of query rows at some Woodbury layers; holds only those layers' V_r.

    Args:
        cfg: the run config (curvature path, device).
        manifest: the index's manifest (layer shapes, store kind).
        layers: the layers to project (None = every Woodbury layer).

    Example:
        >>> projector = QueryProjector(cfg, manifest, layers=["transformer.h.0.mlp.c_fc"])
        >>> projector(query_columns)["transformer.h.0.mlp.c_fc"].shape   # (nq, r)
    """

    def __init__(self, cfg: Config, manifest: Manifest, layers: Iterable[str] | None = None, device=None):
        self.device = resolve_device(device or cfg.model.device)
        self.dtype = math_dtype(self.device, cfg.precision.math)
        names = set(ranks(curvature_header(cfg.curvature_path)) if layers is None else layers)
        curvature = load_curvature(cfg, manifest, self.device, self.dtype, vectors=names)
        self.kind = manifest.kind
        self.specs = [s for s in layer_specs(manifest) if s.name in names]
        self.vectors = {s.name: curvature[s.name].low_rank[0] for s in self.specs}
        self.weights = {s.name: curvature[s.name].low_rank[1] for s in self.specs}

    def __call__(self, query_columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Query store columns {column: (nq, width)} → {layer: g'_q (nq, r)} on this projector's device."""
        prefixes = {s.name for s in self.specs}
        columns = {k: v.to(device=self.device, dtype=self.dtype) for k, v in query_columns.items()
                   if k.rsplit(".", 1)[0] in prefixes}
        blocks = blocks_from_columns(self.specs, self.kind, columns)
        return {name: blocks[name].dense() @ vectors for name, vectors in self.vectors.items()}

    def query_side_terms(self, coordinates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: g'_q (nq, r)} (from ``__call__``) → {layer: h_q = V_r (w ⊙ g'_q) (nq, D)}, the
        curvature term's query side (``StackedQuery(route="query", query_side_terms=...)``)."""
        return {name: (coordinates[name] * self.weights[name]) @ self.vectors[name].T for name in self.vectors}

