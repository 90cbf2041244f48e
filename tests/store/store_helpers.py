"""Helpers for the store tests: rows and small indexes written in code."""

import torch

from lorif_ray.store import ShardWriter

COLUMNS = {"h.0.attn.u": 3, "h.0.attn.v": 5}
DEFAULT_META = {"seed": 0, "f": 4}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_rows(num_rows: int, columns: dict[str, int] = COLUMNS, seed: int = 0):
    """Ids `train-000000`, ... and float64 (num_rows, width) tensors per column."""
    gen = torch.Generator().manual_seed(seed)
    ids = [f"train-{i:06d}" for i in range(num_rows)]
    arrays = {name: torch.randn(num_rows, width, generator=gen, dtype=torch.float64) for name, width in columns.items()}
    return ids, arrays


def reopen(directory) -> ShardWriter:
    """A writer on `directory` with the config `write_index` uses by default."""
    return ShardWriter(directory, kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta=DEFAULT_META)


def write_index(directory, num_rows: int, shard_size: int, dtype: str = "float32", skip=(), finalize=True, meta=None):
    """Writes rows of `make_rows(num_rows)` into shards (except those in `skip`); returns (writer, ids, arrays)."""
    writer = ShardWriter(
        directory, kind="factors", columns=COLUMNS, dtype=dtype, shard_size=shard_size, meta=meta or DEFAULT_META
    )
    ids, arrays = make_rows(num_rows)
    for index, start in enumerate(range(0, num_rows, shard_size)):
        if index not in skip:
            stop = start + shard_size
            writer.write_shard(index, ids[start:stop], {c: a[start:stop] for c, a in arrays.items()})
    if finalize:
        writer.finalize(num_rows)
    return writer, ids, arrays

