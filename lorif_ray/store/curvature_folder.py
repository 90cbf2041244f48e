"""The curvature folder: stage 2's saved curvature and its stored g'_t, opened from the folder's path.

``CurvatureFolder`` alone names, writes and reads every file of it (kronfluence's way: ``writer`` /
``read_*`` / ``*exists`` beside the fit), and runs the checks of ``lorif_ray.store.integrity`` on each:

- ``<folder>/<layer>.safetensors``: a layer's ``Curvature`` tensors (``lorif_ray.math.curvature``), written
  as soon as the layer is solved, so no process ever holds the curvature of every layer (V_r is D·r numbers
  per layer: 253 GiB at 70B f=64 r=4096). Each carries the ``curvature_id`` and its info (kind, λ, r).
- ``<folder>/_curvature.json``: written last (sealed) and removed when stage 2 starts: the per-layer info,
  the ``method_meta`` that determines the curvature (method, fit settings, precision policy, index) and its
  digest ``curvature_id``. A stage 2 that stopped part-way keeps its finished layer files, and a re-run with
  the same settings fits only the others.
- ``<folder>/../curvature_coordinates/``: the stored g'_t = V_rᵀ g_t of every training row (optional,
  ``query.store_coordinates``): ``<layer>.npy`` (N, r) in index row order, float32, float16 or bfloat16 (as
  raw int16 bits), and ``_meta.json`` (dtype, rows, ranks, the ``curvature_id`` they belong to), removed
  when stage 2 starts and written last. A layer's file is filled in place through a memory map (by one
  process or by stage-2 workers each over its own rows, ``write_rows``) under a temporary name renamed once
  complete. (A sibling of the folder, where format 2 put it.)

Integrity (format 2 of both): every layer file records a CRC-32 per tensor and of its meta (``save_tensors``),
checked whenever it is read; each header carries the CRC-32 of its own content (``seal``); the per-layer info
used to score is the layer file's own, checked against the header's; every block of ``block_rows`` g'_t rows
(one index shard's rows) has its CRC-32 in ``_meta.json``, checked by every read (``CheckedBlocks``).
Format 1 (no checksums) is refused by name: stage 2 rebuilds it.

Which config a curvature fits (its ``method_meta`` against a config's) is stage 2's question
(``lorif_ray.stages.curvature.check_curvature``); this module stores what it is given.

Example:
    >>> folder = CurvatureFolder(cfg.curvature_path)
    >>> with folder.lock():
    ...     writer = folder.writer(meta)
    ...     writer.write("transformer.h.0.mlp.c_fc", curvature); writer.finish()
    >>> CurvatureFolder.open(cfg.curvature_path).header()["layers"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorif_ray.errors import ConfigError, CorruptArtifactError, IndexMismatchError
from lorif_ray.store.artifacts import (load_tensors, preallocated_memmap, remove_stale_temporaries, replace_durably,
                                       save_tensors, temporary_path, write_json)
from lorif_ray.store.folder import ArtifactFolder
from lorif_ray.store.integrity import CheckedBlocks, block_checksums, contained, read_sealed_json, seal
from lorif_ray.store.locks import writer_lock

log = logging.getLogger(__name__)

HEADER_NAME = "_curvature.json"
FORMAT_VERSION = 2  # of the header and layer files: 1 had no checksums
REBUILD = "re-run stage 2 (jobs/curvature.py) with the same config: it checks every layer file and refits corrupt ones"
CURVATURE_WRITER = ("curvature", "stage 2 (jobs/curvature.py)")  # the folder's writer lock (``CurvatureFolder.lock``)

COORDINATES_DIR = "curvature_coordinates"
COORDINATE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 as raw bits
META_NAME = "_meta.json"
COORDINATES_FORMAT_VERSION = 2  # 1 had no checksums
COORDINATES_REBUILD = "re-run stage 2 (jobs/curvature.py) with query.store_coordinates=true: it recomputes them"


def curvature_id(meta: dict) -> str:
    """The digest of what determines a curvature (its ``method_meta``)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def ranks(header: dict) -> dict[str, int]:
    """{layer: r} of the layers with a low-rank term, from a curvature header."""
    return {name: info["rank"] for name, info in header.get("layers", {}).items() if info.get("rank")}


class CurvatureFolder(ArtifactFolder):
    """A curvature folder (``<output_dir>/curvature``) and its stored g'_t (``coordinates_path``).

    ``CurvatureFolder(path)`` names the folder (it need not exist yet: stage 2 writes it);
    ``CurvatureFolder.open(path)`` is a folder that holds a complete curvature (its header is there).
    Holds nothing but its path: it pickles to Ray actors as that, and every read reads the files as they
    are now.
    """

    def __init__(self, path):
        super().__init__(path)
        self.coordinates_path = self.path.parent / COORDINATES_DIR

    def missing(self) -> Exception:
        """``open``'s error: no curvature header there (run stage 2 first)."""
        return ConfigError(f"no curvature at {self.path}; run stage 2 (jobs/curvature.py) first")

    # naming

    @property
    def header_path(self) -> Path:
        return self.path / HEADER_NAME

    def layer_path(self, name: str) -> Path:
        """``<folder>/<layer>.safetensors``, checked to stay inside the folder (layer names come from the
        manifest)."""
        return contained(self.path, f"{name}.safetensors", source=f"layer {name!r} of the curvature in {self.path}")

    @property
    def coordinates_meta_path(self) -> Path:
        return self.coordinates_path / META_NAME

    def coordinates_layer_path(self, name: str) -> Path:
        """``<coordinates>/<layer>.npy``, checked to stay inside the g'_t folder."""
        return contained(self.coordinates_path, f"{name}.npy",
                         source=f"layer {name!r} of the stored g'_t in {self.coordinates_path}")

    # the curvature

    def exists(self) -> bool:
        """Whether a complete curvature is here (its header, written last, is)."""
        return self.header_path.exists()

    def lock(self):
        """The folder's one-writer lock (``writer_lock``): held by stage 2 while it writes."""
        return writer_lock(self.path, *CURVATURE_WRITER)

    def writer(self, meta: dict) -> "CurvatureWriter":
        """A ``CurvatureWriter`` of the curvature ``meta`` determines (the previous header removed)."""
        return CurvatureWriter(self, meta)

    def header(self) -> dict:
        """The header (kind, per-layer info, ``method_meta``, ``curvature_id``, ...), its checksum and format checked.

        Raises:
            ConfigError: there is no curvature here.
            CorruptArtifactError / IndexMismatchError: the header is corrupt, or of another format.
        """
        header = contained(self.path, HEADER_NAME, source=f"the curvature folder {self.path}")
        if not header.exists():
            raise ConfigError(f"no curvature at {self.path}; run stage 2 (jobs/curvature.py) first")
        return read_sealed_json(header, FORMAT_VERSION, REBUILD, older=" (before checksums)")

    def layer_info(self, name: str, curvature: str) -> dict | None:
        """The info of layer ``name``'s file if it belongs to curvature ``curvature`` (an id) and every tensor matches
        its checksum; None (logged) if the file is missing, of another curvature or format, or corrupt."""
        path = self.layer_path(name)
        if not path.exists():
            return None
        try:
            meta = load_tensors(path, rebuild=REBUILD)[1]
        except (CorruptArtifactError, IndexMismatchError) as error:
            log.warning("%s", error)
            return None
        if meta.get("curvature_id") != curvature or meta.get("format_version") != FORMAT_VERSION:
            return None
        return meta["info"]

    def corrupt_layers(self, header: dict) -> list[str]:
        """The layers of ``header`` whose files are missing, of another curvature or not intact (each file read
        whole and checked: stage 2 does this before it reuses a curvature)."""
        return [name for name in header["layers"] if self.layer_info(name, header["curvature_id"]) is None]

    def read_layer(self, name: str, header: dict, device="cpu", names: Callable[[str], bool] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
        """Layer ``name``'s tensors (those ``names`` accepts: the others are never read) on ``device`` and its
        info, checked against ``header`` (this folder's).

        Raises:
            CorruptArtifactError: the file is missing, corrupt, or its info differs from the header's.
            IndexMismatchError: it belongs to another curvature.
        """
        path = self.layer_path(name)
        if name not in header["layers"] or not path.exists():
            raise CorruptArtifactError(f"the curvature at {self.path} has no layer {name!r} ({path}); {REBUILD}")
        tensors, meta = load_tensors(path, device=device, names=names, rebuild=REBUILD)
        if meta.get("curvature_id") != header["curvature_id"]:
            raise IndexMismatchError(f"{path} belongs to another curvature than {self.path}; re-run stage 2")
        if meta.get("info") != header["layers"][name]:
            raise CorruptArtifactError(f"{path} says {meta.get('info')}, the header {header['layers'][name]} "
                                       f"(one of them is corrupt); {REBUILD}")
        return tensors, meta["info"]

    def read_all(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every tensor as {"<layer>.<field>": tensor}, and the header (tools and tests)."""
        header, tensors = self.header(), {}
        for name in header["layers"]:
            path = self.layer_path(name)
            if path.exists():
                tensors.update({f"{name}.{field}": t for field, t in load_tensors(path, rebuild=REBUILD)[0].items()})
        return tensors, header

    def layer_bytes(self) -> int:
        """Bytes of the layer files on disk."""
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))

    # the stored g'_t

    def coordinate_writer(self, num_rows: int, dtype: str, block_rows: int) -> "CoordinateWriter":
        """A ``CoordinateWriter`` of (N, r) g'_t per layer (the previous ``_meta.json`` removed)."""
        return CoordinateWriter(self, num_rows, dtype, block_rows)

    def coordinates_meta(self) -> dict | None:
        """The stored g'_t's ``_meta.json`` (None if there is none), its checksum and format checked.

        Raises:
            CorruptArtifactError: unreadable, or not what was written.
            IndexMismatchError: format 1 (no checksums) or another format.
        """
        path = contained(self.coordinates_path, META_NAME, source=f"the stored g'_t of {self.path.parent}")
        if not path.exists():
            return None
        return read_sealed_json(path, COORDINATES_FORMAT_VERSION, COORDINATES_REBUILD,
                                older=" (stored g'_t without checksums)")

    def coordinates_match(self, dtype: str | None = None) -> bool:
        """Stored g'_t exist (in ``dtype``, if given) and belong to the curvature here.

        Raises:
            CorruptArtifactError / IndexMismatchError: their ``_meta.json`` is corrupt or of another format.
        """
        info = self.coordinates_meta()
        if info is None or not self.exists():
            return False
        return info.get("curvature_id") == self.header().get("curvature_id") and dtype in (None, info["dtype"])

    def stored_coordinates(self) -> "StoredCoordinates":
        """The stored g'_t of the curvature here, memory-mapped (``StoredCoordinates``)."""
        return StoredCoordinates(self)


class CurvatureWriter:
    """Writes a curvature layer by layer into its folder (removing a previous header and stale temporaries
    first). Call under the folder's writer lock (``CurvatureFolder.lock``).

    Example:
        >>> writer = CurvatureFolder(cfg.curvature_path).writer(meta)
        >>> if not writer.done("transformer.h.0.mlp.c_fc"):
        ...     writer.write("transformer.h.0.mlp.c_fc", curvature)
        >>> writer.finish({"precision": ...})        # after every layer
    """

    def __init__(self, folder: CurvatureFolder, meta: dict):
        self.folder, self.meta, self.id = folder, meta, curvature_id(meta)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.header_path.unlink(missing_ok=True)
        remove_stale_temporaries(folder.path)
        self.layers: dict[str, dict] = {}

    def done(self, name: str) -> bool:
        """Whether a previous run already wrote this layer for the same curvature, intact (every tensor checked
        against its checksum); it is then adopted. A corrupt file is logged and refitted."""
        info = self.folder.layer_info(name, self.id)
        if info is None:
            return False
        self.layers[name] = info
        return True

    def write(self, name: str, curvature) -> None:
        """The layer's file (a ``Curvature``'s ``tensors()`` and ``info()``), atomically, tied to this curvature."""
        self.layers[name] = curvature.info()
        tensors = {field: t for field, t in curvature.tensors().items() if t is not None}
        save_tensors(self.folder.layer_path(name), tensors,
                     {"curvature_id": self.id, "info": self.layers[name], "format_version": FORMAT_VERSION})

    def finish(self, extra: dict | None = None) -> dict[str, dict]:
        """Write the header (last, sealed): the curvature is complete. Returns the per-layer info."""
        write_json(self.folder.header_path, seal({"method_meta": self.meta, "kind": self.meta["curvature"],
                                                  "layers": self.layers, "curvature_id": self.id,
                                                  "format_version": FORMAT_VERSION, **(extra or {})}))
        return self.layers


class CoordinateWriter:
    """Writes g'_t layer by layer into the folder's ``coordinates_path`` (removing a previous ``_meta.json`` first).

    Example:
        >>> writer = folder.coordinate_writer(num_rows=N, dtype="bfloat16", block_rows=shard_size)
        >>> path = writer.begin("transformer.h.0.mlp.c_fc", rank=r)
        >>> sums = write_rows(path, 0, coords, "bfloat16", shard_size)  # or: every worker its own rows
        >>> writer.commit("transformer.h.0.mlp.c_fc", sums)             # the blocks' checksums, all of them
        >>> writer.finish()                             # after the curvature's header is written
    """

    def __init__(self, folder: CurvatureFolder, num_rows: int, dtype: str, block_rows: int):
        if dtype not in COORDINATE_DTYPES:
            raise ConfigError(f"coordinates dtype {dtype!r}: choose one of {list(COORDINATE_DTYPES)}")
        self.folder, self.num_rows, self.dtype, self.block_rows = folder, num_rows, dtype, block_rows
        self.directory = folder.coordinates_path
        self.directory.mkdir(parents=True, exist_ok=True)
        folder.coordinates_meta_path.unlink(missing_ok=True)
        remove_stale_temporaries(self.directory)
        self.pending: dict[str, Path] = {}
        self.ranks: dict[str, int] = {}
        self.checksums: dict[str, list[int]] = {}

    def begin(self, layer: str, rank: int) -> str:
        """Create the layer's (N, rank) file under a temporary name; returns that path for ``write_rows``.

        Raises:
            StorageFullError: the disk has no room for it (names the file and the bytes).
        """
        tmp = temporary_path(self.folder.coordinates_layer_path(layer))
        preallocated_memmap(tmp, COORDINATE_DTYPES[self.dtype], (self.num_rows, rank)).flush()
        self.pending[layer], self.ranks[layer] = tmp, rank
        return str(tmp)

    def commit(self, layer: str, checksums: dict[int, int]) -> None:
        """The layer's rows are all written, with these {block: CRC-32} (``write_rows``): give the file its name."""
        blocks = -(-self.num_rows // self.block_rows)
        if sorted(checksums) != list(range(blocks)):
            raise RuntimeError(f"{layer}: checksums of blocks {sorted(checksums)} written, of 0..{blocks - 1} expected")
        replace_durably(self.pending.pop(layer), self.folder.coordinates_layer_path(layer))
        self.checksums[layer] = [checksums[block] for block in range(blocks)]

    def finish(self) -> dict:
        """Record the committed layers with the curvature they belong to (the folder's header, written first);
        returns the storage cost."""
        if self.pending:
            raise RuntimeError(f"layers {sorted(self.pending)} were begun but not committed")
        width = sum(self.ranks.values())
        size = np.dtype(COORDINATE_DTYPES[self.dtype]).itemsize
        info = {"curvature_id": self.folder.header()["curvature_id"], "dtype": self.dtype,
                "rows": self.num_rows, "block_rows": self.block_rows, "format_version": COORDINATES_FORMAT_VERSION,
                "layers": {name: {"file": f"{name}.npy", "rank": rank, "crc32": self.checksums[name]}
                           for name, rank in self.ranks.items()},
                "bytes_per_example": width * size}
        write_json(self.folder.coordinates_meta_path, seal(info))
        return {"path": str(self.directory), "bytes_per_example": width * size,
                "total_bytes": width * size * self.num_rows}


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


class StoredCoordinates:
    """The stored g'_t of a folder's curvature, memory-mapped once; ``rows`` reads a range, each block of rows
    checked against its CRC-32 the first time it is read.

    Raises:
        ConfigError: stage 2 stored none (run it with ``query.store_coordinates=true``).
        IndexMismatchError: they were computed for another curvature, or are of another format (re-run stage 2).
        CorruptArtifactError: a layer's file is missing or has the wrong shape or dtype; ``rows``: a block
            does not match its checksum.

    Example:
        >>> stored = CurvatureFolder(cfg.curvature_path).stored_coordinates()
        >>> stored.rows(0, 100, dtype=torch.float64)["transformer.h.0.mlp.c_fc"].shape   # (100, r)
    """

    def __init__(self, folder: CurvatureFolder):
        directory = folder.coordinates_path
        info = folder.coordinates_meta()
        if info is None:
            raise ConfigError(f"no stored g'_t at {directory}; run stage 2 with query.store_coordinates=true")
        if info.get("curvature_id") != folder.header().get("curvature_id"):
            raise IndexMismatchError(f"{directory} belongs to another curvature than {folder.path}; "
                                     "re-run stage 2 with query.store_coordinates=true")
        self.dtype, self.num_rows = info["dtype"], info["rows"]
        self.blocks: dict[str, CheckedBlocks] = {}
        for name, layer in info["layers"].items():
            path = contained(directory, layer["file"], source=f"layer {name!r} of {directory / META_NAME}")
            try:
                array = np.load(path, mmap_mode="r")
            except Exception as error:  # a damaged header: OSError, ValueError, SyntaxError, tokenize.TokenError ...
                raise CorruptArtifactError(f"cannot read stored g'_t {path} (corrupt): {error}; "
                                           f"{COORDINATES_REBUILD}") from error
            expected = ((info["rows"], layer["rank"]), np.dtype(COORDINATE_DTYPES[self.dtype]))
            if (array.shape, array.dtype) != expected:
                raise CorruptArtifactError(f"{path} holds {array.shape} {array.dtype}; {META_NAME} says "
                                           f"{expected[0]} {expected[1]} (corrupt); {COORDINATES_REBUILD}")
            self.blocks[name] = CheckedBlocks(path, array, info["block_rows"], layer["crc32"], COORDINATES_REBUILD)

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
