"""Where the training rows come from: streamed from the Parquet shards, or held resident on a device.

Stages 2 and 3 are one piece of code each, and they read rows through one interface, a row source
(``lorif_ray.math.blocks.RowSource``: ``blocks()`` is one pass of ``TrainBlock``s with their global row
offsets and ids). What differs between a laptop, a GPU and a Ray actor is only where the rows live, and
that is decided here, by ``layer_rows``:

- ``ParquetRows`` streams the columns of the layers asked for, each shard read once per pass for all of
  them, every read checked (``lorif_ray.store``: page CRCs, footer, decoded row counts; stored g'_t by their
  block checksums);
- ``ResidentRows`` (``read_resident``) reads them once onto a device, in the index's storage dtype, and casts
  each block to the math dtype as it is handed out;
- ``layer_rows`` picks resident when asked, or (stage 2) when the rows fit a fraction of the device's memory.

Stage 2's Gram pass reads a group of layers (``RowLayout`` without a curvature), stage 3's scorer every
layer (``RowLayout`` with the curvature); either source can be limited to a run of shards (a Ray actor's
group) and keeps global row numbers.

Example:
    >>> rows = layer_rows(IndexFolder(cfg.index_path), manifest, specs, dtype=torch.float32)  # resident if they fit
    >>> for block in rows.blocks():            # TrainBlocks; block.offset, block.ids, len(block)
    ...     layers = rows.layout.layer_blocks(block)                        # {layer: GradientBlock} views
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch

from lorif_ray.math.blocks import ResidentRows, RowLayout, TrainBlock
from lorif_ray.stages.featurize import LayerSpec, blocks_from_columns
from lorif_ray.store import IndexFolder, Manifest
from lorif_ray.store.schema import HIDDEN_COLUMN, TORCH_STORAGE_DTYPES, layer_columns

RESIDENT_FRACTION = 0.25  # stage 2 holds a layer's rows resident when they take at most this share of memory
READ_ROWS = 8192  # rows per decoded batch while rows are read into memory

Coordinates = Callable[[int, int], dict[str, torch.Tensor]]
"""(start, stop) → {layer: g'_t (n, r)} of stored g'_t for those global rows (``StoredCoordinates.rows``)."""


class ParquetRows:
    """Some layers' rows, streamed from the shards on every pass: one read of each shard per pass for all of
    them (only their columns are decoded), as ``TrainBlock``s of at most ``batch_rows`` rows of one shard.

    Args:
        index, manifest: the index folder and its manifest.
        specs: the layers (ignored for a "hidden" store, whose blocks hold the hidden states as ``dense``).
        dtype: of the delivered rows (the policy's math dtype).
        device: where the rows are delivered.
        batch_rows: rows per decoded batch.
        shards: the run of shards to read (None = all).
        curvature: {layer: Curvature} to lay the blocks out for the scorer (``RowLayout.build``), or None.
        coordinates: stored g'_t to attach to each block, or None.

    Attributes:
        layout: how the blocks hold the layers (None for a "hidden" store).
    """

    def __init__(self, index: IndexFolder, manifest: Manifest, specs: list[LayerSpec], *, dtype: torch.dtype,
                 device="cpu", batch_rows: int = 2048, shards: list[int] | None = None, curvature: dict | None = None,
                 coordinates: Coordinates | None = None):
        self.index, self.manifest, self.shards = index, manifest, shards
        self.specs = [] if manifest.kind == "hidden" else list(specs)
        self.layout = None if manifest.kind == "hidden" else RowLayout.build(self.specs, manifest.kind, curvature)
        self.dtype, self.device, self.batch_rows = dtype, torch.device(device), batch_rows
        self.coordinates = coordinates
        self.offset = manifest.row_range(shards)[0] if shards is not None else 0
        self.passes = 0  # how often the shards were read (tests count them)

    def columns(self) -> list[str]:
        """The store columns the blocks are made of."""
        if self.layout is None:
            return [HIDDEN_COLUMN]
        return [c for name in self.layout.names for c in layer_columns(self.manifest.kind, name)]

    def num_rows(self) -> int:
        start, stop = self.manifest.row_range(self.shards) if self.shards is not None else (0, self.manifest.num_rows)
        return stop - start

    def blocks(self) -> Iterator[TrainBlock]:
        self.passes += 1
        return self.decoded(self.dtype, self.device, self.batch_rows)

    def decoded(self, dtype: torch.dtype, device, batch_rows: int) -> Iterator[TrainBlock]:
        """The blocks of one read of the shards, decoded to ``dtype`` on ``device``."""
        offset = self.offset
        for ids, columns in self.index.batches(self.columns(), batch_rows=batch_rows, out_dtype=dtype, device=device,
                                               manifest=self.manifest, shards=self.shards):
            if self.layout is None:
                block = TrainBlock(dense=columns[HIDDEN_COLUMN], offset=offset, ids=ids)
            else:
                stored = self.coordinates(offset, offset + len(ids)) if self.coordinates is not None else None
                block = self.layout.train_block(blocks_from_columns(self.specs, self.manifest.kind, columns), stored,
                                                offset=offset, ids=ids)
            yield block
            offset += len(ids)


def read_resident(source: ParquetRows, block_rows: int | None = None, *, pin: bool = True,
                  on_rows: Callable[[int], None] | None = None) -> ResidentRows:
    """Read ``source``'s rows once onto its device, in the index's storage dtype (stored g'_t in the source's
    dtype), as ``ResidentRows`` delivering ``source.dtype`` ``block_rows`` rows at a time (None: the Gram
    pass's ``dense_chunk_rows``).

    Batches are decoded on the CPU and staged in page-locked memory, so host→device copies run
    asynchronously on a GPU; ``on_rows`` gets each batch's row count (a progress bar's ``update``).
    """
    layout, device, n = source.layout, source.device, source.num_rows()
    stored = TORCH_STORAGE_DTYPES[source.manifest.dtype]
    factors, dense = None, None
    if layout is not None and layout.factor_groups:
        factors = [(torch.empty(len(g.names), n, g.c, g.d1, dtype=stored, device=device),
                    torch.empty(len(g.names), n, g.c, g.d2, dtype=stored, device=device))
                   for g in layout.factor_groups]
    else:
        width = source.manifest.columns[HIDDEN_COLUMN] if layout is None else sum(layout.dense_dims.values())
        dense = torch.empty(n, width, dtype=stored, device=device)
    coords = None
    if source.coordinates is not None:
        coords = torch.empty(n, layout.coordinate_width, dtype=source.dtype, device=device)
    ids: list[str] = []
    pinned = pin and device.type == "cuda"
    for part in source.decoded(stored, "cpu", READ_ROWS):
        at, take = part.offset - source.offset, len(part)
        if pinned:
            part = part.pin()
        if factors is not None:
            for (u, v), (pu, pv) in zip(factors, part.factors):
                u[:, at:at + take].copy_(pu, non_blocking=pinned)
                v[:, at:at + take].copy_(pv, non_blocking=pinned)
        else:
            dense[at:at + take].copy_(part.dense, non_blocking=pinned)
        if coords is not None:
            coords[at:at + take].copy_(part.coordinates, non_blocking=pinned)
        ids.extend(part.ids)
        if on_rows is not None:
            on_rows(take)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    block = TrainBlock(factors, dense, coords, source.offset, ids)
    return ResidentRows(layout, block, dtype=source.dtype, block_rows=block_rows)


def device_memory(device) -> int:
    """Bytes of memory of ``device`` (the GPU's, or this machine's RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def row_bytes(kind: str, specs: list[LayerSpec], rows: int, dtype: torch.dtype) -> int:
    """Memory of ``rows`` rows of these layers in ``dtype``: rows · Σ c(d1+d2) (factors) or rows · Σ D (dense)
    numbers (what the planner composes, and what ``layer_rows`` compares with the device's memory)."""
    width = sum(s.c * (s.d1 + s.d2) if kind == "factors" else s.dim for s in specs)
    return rows * width * torch.finfo(dtype).bits // 8


def rows_bytes(manifest: Manifest, specs: list[LayerSpec], dtype: torch.dtype, shards: list[int] | None = None) -> int:
    """``row_bytes`` of the index's rows (of ``shards``, a consecutive run; None = all)."""
    start, stop = manifest.row_range(shards) if shards is not None else (0, manifest.num_rows)
    return row_bytes(manifest.kind, specs, stop - start, dtype)


def layer_rows(index: IndexFolder, manifest: Manifest, specs: list[LayerSpec], *, dtype: torch.dtype, device="cpu",
               shards: list[int] | None = None, batch_rows: int = 2048, resident: bool | None = None,
               fraction: float = RESIDENT_FRACTION, curvature: dict | None = None,
               coordinates: Coordinates | None = None, block_rows: int | None = None,
               on_load: Callable[[int], None] | None = None) -> ParquetRows | ResidentRows:
    """The row source of some layers (the one place that chooses between streamed and resident rows).

    Resident when asked, or (``resident`` None) when their rows fit ``fraction`` of the device's memory
    (``rows_bytes`` in ``dtype``); else streamed once per pass.

    Args:
        specs: the layers (stage 3: every layer of the index; ignored for a "hidden" store).
        dtype: of the delivered rows (the policy's math dtype).
        shards: a run of consecutive shards (a Ray actor's group), None = all.
        batch_rows: rows per streamed block.
        curvature, coordinates: as ``ParquetRows``.
        block_rows: rows per resident block (None: ``dense_chunk_rows``, what the Gram pass forms dense at a time).
        on_load: gets each batch's row count while resident rows are read.
    """
    streamed = ParquetRows(index, manifest, specs, dtype=dtype, device=device, batch_rows=batch_rows,
                           shards=shards, curvature=curvature, coordinates=coordinates)
    if resident is None:
        resident = rows_bytes(manifest, specs, dtype, shards) <= fraction * device_memory(device)
    return read_resident(streamed, block_rows, on_rows=on_load) if resident else streamed
