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

Integrity (format 2): every block of ``block_rows`` rows (one index shard's rows, so a worker's rows are
whole blocks) has its CRC-32 in ``_meta.json``, computed by whoever writes the rows and checked by every
read of them (``lorif_ray.store.CheckedBlocks``); ``_meta.json`` carries the CRC-32 of its own content.
Format 1 (no checksums) is refused by name: stage 2 rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, CorruptArtifactError, IndexMismatchError
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import math_dtype
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.saved_curvature import curvature_exists, curvature_header, load_curvature, ranks
from lorif_ray.store import (CheckedBlocks, Manifest, block_checksums, contained, read_sealed_json,
                             remove_stale_temporaries, replace_durably, seal, temporary_path, write_json)
from lorif_ray.store.artifacts import preallocated_memmap
from lorif_ray.store.schema import layer_columns

COORDINATES_DIR = "curvature_coordinates"
COORDINATE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 as raw bits
META_NAME = "_meta.json"
FORMAT_VERSION = 2  # 1 had no checksums
REBUILD = "re-run stage 2 (jobs/curvature.py) with query.store_coordinates=true: it recomputes them"


def coordinates_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / COORDINATES_DIR


class CoordinateWriter:
    """Writes g'_t layer by layer into ``directory`` (removing a previous ``_meta.json`` first).

    Example:
        >>> writer = CoordinateWriter(coordinates_dir(cfg), num_rows=N, dtype="bfloat16", block_rows=shard_size)
        >>> path = writer.begin("transformer.h.0.mlp.c_fc", rank=r)
        >>> sums = write_rows(path, 0, coords, "bfloat16", shard_size)  # or: every worker its own rows
        >>> writer.commit("transformer.h.0.mlp.c_fc", sums)             # the blocks' checksums, all of them
        >>> writer.finish(cfg.curvature_path)           # after the curvature file is saved
    """

    def __init__(self, directory, num_rows: int, dtype: str, block_rows: int):
        if dtype not in COORDINATE_DTYPES:
            raise ConfigError(f"coordinates dtype {dtype!r}: choose one of {list(COORDINATE_DTYPES)}")
        self.directory, self.num_rows, self.dtype, self.block_rows = Path(directory), num_rows, dtype, block_rows
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_NAME).unlink(missing_ok=True)
        remove_stale_temporaries(self.directory)
        self.pending: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}
        self.checksums: dict[str, list[int]] = {}

    def begin(self, layer: str, rank: int) -> str:
        """Create the layer's (N, rank) file under a temporary name; returns that path for ``write_rows``.

        Raises:
            StorageFullError: the disk has no room for it (names the file and the bytes).
        """
        tmp = temporary_path(_layer_file(self.directory, layer))
        preallocated_memmap(tmp, COORDINATE_DTYPES[self.dtype], (self.num_rows, rank)).flush()
        self.pending[layer], self.ranks[layer] = tmp, rank
        return str(tmp)

    def commit(self, layer: str, checksums: dict[int, int]) -> None:
        """The layer's rows are all written, with these {block: CRC-32} (``write_rows``): give the file its name."""
        blocks = -(-self.num_rows // self.block_rows)
        if sorted(checksums) != list(range(blocks)):
            raise RuntimeError(f"{layer}: checksums of blocks {sorted(checksums)} written, of 0..{blocks - 1} expected")
        replace_durably(self.pending.pop(layer), _layer_file(self.directory, layer))
        self.checksums[layer] = [checksums[block] for block in range(blocks)]

    def finish(self, curvature_path) -> dict:
        """Record the committed layers with the curvature file they belong to; returns the storage cost."""
        if self.pending:
            raise RuntimeError(f"layers {sorted(self.pending)} were begun but not committed")
        width = sum(self.ranks.values())
        size = np.dtype(COORDINATE_DTYPES[self.dtype]).itemsize
        info = {"curvature_id": curvature_header(curvature_path)["curvature_id"], "dtype": self.dtype,
                "rows": self.num_rows, "block_rows": self.block_rows, "format_version": FORMAT_VERSION,
                "layers": {name: {"file": f"{name}.npy", "rank": rank, "crc32": self.checksums[name]}
                           for name, rank in self.ranks.items()},
                "bytes_per_example": width * size}
        write_json(self.directory / META_NAME, seal(info))
        return {"path": str(self.directory), "bytes_per_example": width * size,
                "total_bytes": width * size * self.num_rows}


def _layer_file(directory: Path, layer: str) -> Path:
    return contained(directory, f"{layer}.npy", source=f"layer {layer!r} of the stored g'_t in {directory}")


def write_rows(path, start: int, values: torch.Tensor, dtype: str, block_rows: int) -> dict[int, int]:
    """Write rows start … start + len(values) − 1 of a file made by ``CoordinateWriter.begin``; returns the
    {block: CRC-32} of the blocks of ``block_rows`` rows they fill (``start`` starts a block; the rows end one
    or end the file).

    Raises:
        ConfigError: the file is not there: this process runs on another node than the one that made
            it, and ``output_dir`` is not on storage that every node shares.
    """
    if not Path(path).exists():
        raise ConfigError(f"{path} is not visible here ({os.uname().nodename}): stage-2 workers write g'_t into "
                          "files the driver creates, so output_dir must be on storage shared by every node")
    values = _to_numpy(values, dtype)
    array = np.lib.format.open_memmap(path, mode="r+")
    array[start:start + values.shape[0]] = values
    array.flush()
    del array
    return block_checksums(values, start, block_rows)


def _to_numpy(values: torch.Tensor, dtype: str) -> np.ndarray:
    values = values.detach().cpu()
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return values.to(torch.float32).numpy().astype(COORDINATE_DTYPES[dtype])


def _meta(cfg: Config) -> dict | None:
    """The stored g'_t's ``_meta.json`` (None if there is none), its checksum and format checked.

    Raises:
        CorruptArtifactError: unreadable, or not what was written.
        IndexMismatchError: format 1 (no checksums) or another format.
    """
    path = contained(coordinates_dir(cfg), META_NAME, source=f"the stored g'_t of {cfg.output_dir}")
    if not path.exists():
        return None
    return read_sealed_json(path, FORMAT_VERSION, REBUILD, older=" (stored g'_t without checksums)")


def coordinates_match(cfg: Config, dtype: str | None = None) -> bool:
    """Stored g'_t exist (in ``dtype``, if given) and belong to the current curvature file.

    Raises:
        CorruptArtifactError / IndexMismatchError: their ``_meta.json`` is corrupt or of another format.
    """
    info = _meta(cfg)
    if info is None or not curvature_exists(cfg.curvature_path):
        return False
    return info.get("curvature_id") == _curvature_id(cfg) and dtype in (None, info["dtype"])


def _curvature_id(cfg: Config) -> str | None:
    return curvature_header(cfg.curvature_path).get("curvature_id")


class StoredCoordinates:
    """Stored g'_t of the current curvature, memory-mapped once; ``rows`` reads a range, each block of rows
    checked against its CRC-32 the first time it is read.

    Raises:
        ConfigError: stage 2 stored none (run it with ``query.store_coordinates=true``).
        IndexMismatchError: they were computed for another curvature file, or are of another format (re-run
            stage 2).
        CorruptArtifactError: a layer's file is missing or has the wrong shape or dtype; ``rows``: a block
            does not match its checksum.

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
        self.blocks: dict[str, CheckedBlocks] = {}
        for name, layer in info["layers"].items():
            path = contained(directory, layer["file"], source=f"layer {name!r} of {directory / META_NAME}")
            try:
                array = np.load(path, mmap_mode="r")
            except Exception as error:  # a damaged header: OSError, ValueError, SyntaxError, tokenize.TokenError ...
                raise CorruptArtifactError(f"cannot read stored g'_t {path} (corrupt): {error}; {REBUILD}") from error
            expected = ((info["rows"], layer["rank"]), np.dtype(COORDINATE_DTYPES[self.dtype]))
            if (array.shape, array.dtype) != expected:
                raise CorruptArtifactError(f"{path} holds {array.shape} {array.dtype}; {META_NAME} says "
                                           f"{expected[0]} {expected[1]} (corrupt); {REBUILD}")
            self.blocks[name] = CheckedBlocks(path, array, info["block_rows"], layer["crc32"], REBUILD)

    def rows(self, start: int = 0, stop: int | None = None, *, device="cpu", dtype=torch.float32
             ) -> dict[str, torch.Tensor]:
        """{layer: g'_t (n, r)} of rows [start, stop) (default: to the end), every block they touch checked."""
        stop = self.num_rows if stop is None else stop
        out = {}
        for name, blocks in self.blocks.items():
            tensor = torch.from_numpy(blocks.rows(start, stop))  # a copy: the map is read-only
            if self.dtype == "bfloat16":
                tensor = tensor.view(torch.bfloat16)
            out[name] = tensor.to(device=device, dtype=dtype)
        return out

    def verify(self) -> None:
        """Read and check every block of every layer (stage 2 does this before it reuses them)."""
        for blocks in self.blocks.values():
            for start in range(0, self.num_rows, blocks.block_rows):
                blocks.rows(start, min(start + blocks.block_rows, self.num_rows))


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
        columns = {c: query_columns[c].to(device=self.device, dtype=self.dtype)
                   for s in self.specs for c in layer_columns(self.kind, s.name)}
        blocks = blocks_from_columns(self.specs, self.kind, columns)
        return {name: blocks[name].dense() @ vectors for name, vectors in self.vectors.items()}

    def query_side_terms(self, coordinates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: g'_q (nq, r)} (from ``__call__``) → {layer: h_q = V_r (w ⊙ g'_q) (nq, D)}, the
        curvature term's query side (``StackedQuery(route="query", query_side_terms=...)``)."""
        return {name: (coordinates[name] * self.weights[name]) @ self.vectors[name].T for name in self.vectors}

