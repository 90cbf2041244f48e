"""Where the training rows come from: streamed from the Parquet shards, or held resident on a device.

Stages 2 and 3 are one piece of code each; what differs between a laptop, a GPU and a Ray actor is only
where their rows live, and that is decided here:

- stage 2 reads a group of layers' rows as a ``RowSource`` (``lorif_ray.math.rsvd``): ``ParquetRows``
  streams their columns, each shard once per pass for all of them; ``ResidentRows`` reads them once and
  forms dense rows vec(u vᵀ) chunk by chunk (the Khatri–Rao product; G is never materialized);
  ``layer_rows`` picks the resident one when the rows fit a fraction of the device's memory;
- stage 3 scores ``TrainBlock``s (``lorif_ray.math.scoring``): ``streamed_blocks`` decodes them shard by
  shard, ``ResidentIndex`` holds every row of a run of shards in the stacked layout.

Every source can be limited to a run of shards (a Ray actor's group) and keeps global row numbers.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from lorif_ray.math.influence import dense_from_factors
from lorif_ray.math.scoring import ScoreLayout, TrainBlock
from lorif_ray.stages.featurize import LayerSpec, blocks_from_columns
from lorif_ray.store import Manifest, iter_batches
from lorif_ray.store.schema import TORCH_STORAGE_DTYPES

CHUNK_BYTES = 512 * 2**20  # dense rows formed at a time per GEMM (chunk_rows · D numbers)
RESIDENT_FRACTION = 0.25  # stage 2 holds a layer's rows resident when they take at most this share of memory


def layer_columns(manifest: Manifest, layer: str) -> list[str]:
    """The store columns of one layer: ``<layer>.u``, ``<layer>.v`` (factors) or ``<layer>.g`` (dense)."""
    return [f"{layer}.{c}" for c in (("u", "v") if manifest.kind == "factors" else ("g",))]


class ParquetRows:
    """Some layers' dense rows, streamed from the shards on every pass: one read of each shard per pass for
    all of them (only their columns are decoded).

    Args:
        index_path, manifest: the index.
        specs: the layers.
        dtype: of the delivered rows (the policy's math dtype).
        shards: the run of shards to read (None = all).
        batch_rows: rows per decoded batch.
        device: where the rows are delivered.
    """

    def __init__(self, index_path, manifest: Manifest, specs: list[LayerSpec], *, dtype: torch.dtype,
                 shards: list[int] | None = None, batch_rows: int = 2048, device="cpu"):
        self.index_path, self.manifest, self.specs, self.shards = index_path, manifest, list(specs), shards
        self.names = [s.name for s in self.specs]
        self.dtype, self.batch_rows, self.device = dtype, batch_rows, torch.device(device)
        self.passes = 0  # how often the shards were read (tests count them)

    def columns(self) -> list[str]:
        return [c for s in self.specs for c in layer_columns(self.manifest, s.name)]

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        self.passes += 1
        for _, cols in iter_batches(self.index_path, self.columns(), batch_rows=self.batch_rows, out_dtype=self.dtype,
                                    device=self.device, manifest=self.manifest, shards=self.shards):
            yield {n: b.dense() for n, b in blocks_from_columns(self.specs, self.manifest.kind, cols).items()}


class ResidentRows:
    """Some layers' rows held on a device: {layer: (u (N, d1, c), v (N, d2, c))} of factors, or
    {layer: (g (N, D), None)} of dense rows; dense rows are formed ``chunk_rows`` at a time."""

    def __init__(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]], chunk_rows: int | None = None):
        self.rows, self.names = rows, list(rows)
        first = next(iter(rows.values()))[0]
        self.device, self.num_rows = first.device, first.shape[0]
        dims = [u.shape[1] * v.shape[1] if v is not None else u.shape[1] for u, v in rows.values()]
        self.chunk_rows = chunk_rows or max(64, min(4096, CHUNK_BYTES // (sum(dims) * first.element_size())))
        self.passes = 0

    @classmethod
    def read(cls, source: ParquetRows, chunk_rows: int | None = None) -> "ResidentRows":
        """Read the layers' rows once (through ``source``'s shards, dtype and device) and keep them."""
        names = source.columns()
        parts = [cols for _, cols in iter_batches(source.index_path, names, batch_rows=65536, out_dtype=source.dtype,
                                                  device=source.device, manifest=source.manifest,
                                                  shards=source.shards)]
        full = {n: torch.cat([p[n] for p in parts]) for n in names}
        rows = {}
        for spec in source.specs:
            if source.manifest.kind != "factors":
                rows[spec.name] = (full[f"{spec.name}.g"], None)
            else:
                u, v = full[f"{spec.name}.u"], full[f"{spec.name}.v"]
                rows[spec.name] = (u.reshape(u.shape[0], spec.d1, spec.c), v.reshape(v.shape[0], spec.d2, spec.c))
        return cls(rows, chunk_rows)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        self.passes += 1
        for start in range(0, self.num_rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.num_rows)
            yield {n: u[start:stop] if v is None else dense_from_factors(u[start:stop], v[start:stop])
                   for n, (u, v) in self.rows.items()}


def device_memory(device) -> int:
    """Bytes of memory of ``device`` (the GPU's, or this machine's RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rows_bytes(manifest: Manifest, specs: list[LayerSpec], dtype: torch.dtype, shards: list[int] | None = None) -> int:
    """Memory of these layers' rows held resident: N · Σ c(d1+d2) (factors) or N · Σ D (dense) numbers."""
    start, stop = manifest.row_range(shards) if shards is not None else (0, manifest.num_rows)
    width = sum(s.c * (s.d1 + s.d2) if manifest.kind == "factors" else s.dim for s in specs)
    return (stop - start) * width * torch.finfo(dtype).bits // 8


def layer_rows(index_path, manifest: Manifest, specs: list[LayerSpec], *, dtype: torch.dtype, device="cpu",
               shards: list[int] | None = None, batch_rows: int = 2048, resident: bool | None = None,
               fraction: float = RESIDENT_FRACTION):
    """The row source of some layers: resident when asked, or (``resident`` None) when their rows fit
    ``fraction`` of the device's memory (``rows_bytes``); else streamed once per pass."""
    streamed = ParquetRows(index_path, manifest, specs, dtype=dtype, shards=shards, batch_rows=batch_rows,
                           device=device)
    if resident is None:
        resident = rows_bytes(manifest, specs, dtype, shards) <= fraction * device_memory(device)
    return ResidentRows.read(streamed) if resident else streamed


def streamed_blocks(index_path, manifest: Manifest, layout: ScoreLayout | None, *, dtype: torch.dtype, device,
                    batch_rows: int, coordinates=None, shards: list[int] | None = None
                    ) -> Iterator[tuple[int, list[str], TrainBlock]]:
    """(global row offset, ids, block) of the training rows, decoded shard by shard.

    ``layout`` None reads a "hidden" store (RepSim) as ``block.dense``; ``coordinates`` is a callable
    (start, stop) → {layer: g'_t (n, r)} of stored g'_t for those rows.
    """
    offset = manifest.row_range(shards)[0] if shards is not None else 0
    for ids, columns in iter_batches(index_path, batch_rows=batch_rows, out_dtype=dtype, device=device,
                                     manifest=manifest, shards=shards):
        if layout is None:
            block = TrainBlock(dense=columns["hidden"])
        else:
            stored = coordinates(offset, offset + len(ids)) if coordinates is not None else None
            block = layout.train_block(columns, stored, dtype=dtype)
        yield offset, ids, block
        offset += len(ids)


class ResidentIndex:
    """Every training row of an index (or of a run of its shards) in the stacked scoring layout, on one device,
    in the index's storage dtype (a bfloat16 index takes half the memory of float32 rows); each block is cast
    to the math dtype as it is scored (the same values: the wider dtype holds every stored one).

    Attributes:
        ids: example ids in index order.
        offset: global index of the first row.
        block: the rows as a ``TrainBlock`` (storage dtype; stored g'_t in the math dtype).
        dtype: the dtype ``blocks`` delivers.
    """

    def __init__(self, ids: list[str], block: TrainBlock, offset: int = 0, dtype: torch.dtype | None = None):
        self.ids, self.block, self.offset, self.dtype = ids, block, offset, dtype

    @classmethod
    def from_index(cls, index_path, manifest: Manifest, layout: ScoreLayout | None, *, device, dtype,
                   coordinates=None, batch_rows: int = 8192, shards: list[int] | None = None,
                   pin: bool = True, on_rows=None) -> "ResidentIndex":
        """Read the shards (all, or a consecutive run ``shards``) into the stacked layout on ``device``.

        ``layout`` None reads a "hidden" store (RepSim) as ``block.dense``; ``coordinates`` as in
        ``streamed_blocks``. Batches are staged in page-locked memory so host→device copies run
        asynchronously on a GPU. ``on_rows`` gets each batch's row count (a progress bar's ``update``).
        """
        start, stop = manifest.row_range(shards) if shards is not None else (0, manifest.num_rows)
        n = stop - start
        device = torch.device(device)
        stored = TORCH_STORAGE_DTYPES[manifest.dtype]
        factors, dense = None, None
        if layout is not None and layout.kind == "factors":
            factors = [(torch.empty(len(g.names), n, g.c, g.d1, dtype=stored, device=device),
                        torch.empty(len(g.names), n, g.c, g.d2, dtype=stored, device=device))
                       for g in layout.factor_groups]
        else:
            width = manifest.columns["hidden"] if layout is None else sum(layout.dense_dims.values())
            dense = torch.empty(n, width, dtype=stored, device=device)
        coords = None
        if coordinates is not None:
            coords = torch.empty(n, layout.coordinate_width, dtype=dtype, device=device)
        ids: list[str] = []
        pinned = pin and device.type == "cuda"
        for offset, batch_ids, part in streamed_blocks(index_path, manifest, layout, dtype=stored, device="cpu",
                                                       batch_rows=batch_rows, coordinates=coordinates,
                                                       shards=shards):
            at, take = offset - start, len(batch_ids)
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
            ids.extend(batch_ids)
            if on_rows is not None:
                on_rows(take)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return cls(ids, TrainBlock(factors, dense, coords), start, dtype)

    def blocks(self, chunk_rows: int) -> Iterator[tuple[int, list[str], TrainBlock]]:
        """(global row offset, ids, block) of ``chunk_rows`` resident rows at a time, in ``dtype`` (views when the
        storage dtype is that one)."""
        for start in range(0, len(self.ids), chunk_rows):
            stop = min(start + chunk_rows, len(self.ids))
            block = self.block.rows(start, stop)
            yield self.offset + start, self.ids[start:stop], block if self.dtype is None else block.cast(self.dtype)

    def nbytes(self) -> int:
        return self.block.nbytes()
