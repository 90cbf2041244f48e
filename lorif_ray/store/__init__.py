"""Store: Parquet shards of per-example rows (+ manifest), and small artifacts saved with their config.

The checks every artifact's reader runs (``integrity``: checksums per tensor, per block of rows, per sealed
header, of a Parquet footer; paths contained in their folder) and the one-writer lock per folder (``locks``)
live here, so every store calls them instead of re-implementing them.

``IndexFolder`` is stage 1's folder (the manifest and its settings, the shards, the K-FAC statistics, the row
table and report); ``CurvatureFolder`` is stage 2's folder (the curvature layer by layer, its header, the stored g'_t).

Imports only pyarrow, numpy, torch, safetensors and the standard library.
"""

from lorif_ray.store.artifacts import (
    atomic_path,
    file_sha256,
    load_tensors,
    preallocated_memmap,
    read_table_meta,
    remove_stale_temporaries,
    replace_durably,
    save_tensors,
    temporary_path,
    write_json,
    write_table,
    write_tables,
)
from lorif_ray.store.curvature_folder import CurvatureFolder
from lorif_ray.store.index_folder import IndexFolder, IndexSettings
from lorif_ray.store.integrity import CheckedBlocks, block_checksums, contained, read_sealed_json, seal, unseal
from lorif_ray.store.locks import writer_lock
from lorif_ray.store.manifest import Manifest, ShardRecord
from lorif_ray.store.schema import ID_COLUMN, STORAGE_DTYPES, arrow_schema, arrow_to_tensor, tensor_to_arrow
from lorif_ray.store.shards import ShardWriter, shard_file_name

__all__ = [
    "CheckedBlocks",
    "CurvatureFolder",
    "ID_COLUMN",
    "IndexFolder",
    "IndexSettings",
    "STORAGE_DTYPES",
    "Manifest",
    "ShardRecord",
    "ShardWriter",
    "arrow_schema",
    "arrow_to_tensor",
    "atomic_path",
    "block_checksums",
    "contained",
    "file_sha256",
    "load_tensors",
    "preallocated_memmap",
    "read_table_meta",
    "remove_stale_temporaries",
    "replace_durably",
    "save_tensors",
    "seal",
    "shard_file_name",
    "temporary_path",
    "tensor_to_arrow",
    "read_sealed_json",
    "unseal",
    "write_json",
    "write_table",
    "write_tables",
    "writer_lock",
]
