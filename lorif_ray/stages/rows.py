"""Where the training rows come from: streamed from the Parquet shards, or held resident on a device.

Stages 2 and 3 are one piece of code each; what differs between a laptop, a GPU and a Ray actor is only
where their rows live, and that is decided here:

- stage 2 reads one layer's rows as a ``RowSource`` (``lorif_ray.math.rsvd``): ``ParquetRows`` streams
  that layer's columns once per pass, ``ResidentRows`` reads them once and forms dense rows vec(u vᵀ)
  chunk by chunk (the Khatri–Rao product; G is never materialized); ``layer_rows`` picks the resident
  one when the rows fit a fraction of the device's memory;
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

CHUNK_BYTES = 512 * 2**20  # dense rows formed at a time per GEMM (chunk_rows · D numbers)
RESIDENT_FRACTION = 0.25  # stage 2 holds a layer's rows resident when they take at most this share of memory


def layer_columns(manifest: Manifest, layer: str) -> list[str]:
    """The store columns of one layer: ``<layer>.u``, ``<layer>.v`` (factors) or ``<layer>.g`` (dense)."""
    return [f"{layer}.{c}" for c in (("u", "v") if manifest.kind == "factors" else ("g",))]


class ParquetRows:
    """One layer's dense rows, streamed from the shards on every pass (only that layer's columns).

    Args:
        index_path, manifest: the index.
        spec: the layer.
        shards: the run of shards to read (None = all).
        batch_rows: rows per decoded batch.
        device: where the rows are delivered.
    """

    def __init__(self, index_path, manifest: Manifest, spec: LayerSpec, *, shards: list[int] | None = None,
                 batch_rows: int = 2048, device="cpu"):
        self.index_path, self.manifest, self.spec, self.shards = index_path, manifest, spec, shards
        self.batch_rows, self.device = batch_rows, torch.device(device)
        self.passes = 0  # how often the shards were read (tests count them)

    def batches(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        self.passes += 1
        columns = layer_columns(self.manifest, self.spec.name)
        for _, cols in iter_batches(self.index_path, columns, batch_rows=self.batch_rows, out_dtype=dtype,
                                    device=self.device, manifest=self.manifest, shards=self.shards):
            yield blocks_from_columns([self.spec], self.manifest.kind, cols)[self.spec.name].dense()


class ResidentRows:
    """One layer's rows held on a device: factors u (N, d1, c), v (N, d2, c), or dense g (N, D) in ``u``
    with ``v`` None; dense rows are formed ``chunk_rows`` at a time."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor | None, chunk_rows: int | None = None):
        self.u, self.v, self.device = u, v, u.device
        dim = u.shape[1] * v.shape[1] if v is not None else u.shape[1]
        self.chunk_rows = chunk_rows or max(64, min(4096, CHUNK_BYTES // (dim * u.element_size())))
        self.passes = 0

    @classmethod
    def read(cls, rows: ParquetRows, dtype: torch.dtype, chunk_rows: int | None = None) -> "ResidentRows":
        """Read a layer's rows once (through ``rows``' shards and device) and keep them."""
        names = layer_columns(rows.manifest, rows.spec.name)
        parts = [cols for _, cols in iter_batches(rows.index_path, names, batch_rows=65536, out_dtype=dtype,
                                                  device=rows.device, manifest=rows.manifest, shards=rows.shards)]
        full = {n: torch.cat([p[n] for p in parts]) for n in names}
        spec = rows.spec
        if rows.manifest.kind != "factors":
            return cls(full[names[0]], None, chunk_rows)
        n = full[names[0]].shape[0]
        return cls(full[names[0]].reshape(n, spec.d1, spec.c), full[names[1]].reshape(n, spec.d2, spec.c), chunk_rows)

    def batches(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        self.passes += 1
        for start in range(0, self.u.shape[0], self.chunk_rows):
            stop = min(start + self.chunk_rows, self.u.shape[0])
            rows = self.u[start:stop] if self.v is None else dense_from_factors(self.u[start:stop], self.v[start:stop])
            yield rows.to(dtype)


def device_memory(device) -> int:
    """Bytes of memory of ``device`` (the GPU's, or this machine's RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def layer_rows(index_path, manifest: Manifest, spec: LayerSpec, *, dtype: torch.dtype, device="cpu",
               shards: list[int] | None = None, batch_rows: int = 2048, resident: bool | None = None,
               fraction: float = RESIDENT_FRACTION):
    """The row source of one layer: resident when asked, or (``resident`` None) when its rows (N · c(d1+d2)
    or N · D numbers in ``dtype``) fit ``fraction`` of the device's memory; else streamed."""
    streamed = ParquetRows(index_path, manifest, spec, shards=shards, batch_rows=batch_rows, device=device)
    if resident is None:
        start, stop = manifest.row_range(shards) if shards is not None else (0, manifest.num_rows)
        width = spec.c * (spec.d1 + spec.d2) if manifest.kind == "factors" else spec.dim
        resident = (stop - start) * width * torch.finfo(dtype).bits // 8 <= fraction * device_memory(device)
    return ResidentRows.read(streamed, dtype) if resident else streamed


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
    """Every training row of an index (or of a run of its shards) in the stacked scoring layout, on one device.

    Attributes:
        ids: example ids in index order.
        offset: global index of the first row.
        block: the rows as a ``TrainBlock``.
    """

    def __init__(self, ids: list[str], block: TrainBlock, offset: int = 0):
        self.ids, self.block, self.offset = ids, block, offset

    @classmethod
    def from_index(cls, index_path, manifest: Manifest, layout: ScoreLayout | None, *, device, dtype,
                   coordinates=None, batch_rows: int = 8192, shards: list[int] | None = None,
                   pin: bool = True) -> "ResidentIndex":
        """Read the shards (all, or a consecutive run ``shards``) into the stacked layout on ``device``.

        ``layout`` None reads a "hidden" store (RepSim) as ``block.dense``; ``coordinates`` as in
        ``streamed_blocks``. Batches are staged in page-locked memory so host→device copies run
        asynchronously on a GPU.
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
        coords = None
        if coordinates is not None:
            coords = torch.empty(n, layout.coordinate_width, dtype=dtype, device=device)
        ids: list[str] = []
        pinned = pin and device.type == "cuda"
        for offset, batch_ids, part in streamed_blocks(index_path, manifest, layout, dtype=dtype, device="cpu",
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return cls(ids, TrainBlock(factors, dense, coords), start)

    def blocks(self, chunk_rows: int) -> Iterator[tuple[int, list[str], TrainBlock]]:
        """(global row offset, ids, block) of ``chunk_rows`` resident rows at a time (views, no copy)."""
        for start in range(0, len(self.ids), chunk_rows):
            stop = min(start + chunk_rows, len(self.ids))
            yield self.offset + start, self.ids[start:stop], self.block.rows(start, stop)

    def nbytes(self) -> int:
        return self.block.nbytes()
