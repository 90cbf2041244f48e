"""Storage overhead of shards over the raw float payload, for a realistic layout.

Run with `-s` to see the figures.
"""

import pytest
import torch

from lorif_ray.store import ShardWriter

NUM_ROWS, SHARD_SIZE = 2048, 1024
COLUMNS = {f"h.{i // 4}.{('attn', 'mlp')[i // 2 % 2]}.{'uv'[i % 2]}": (64, 128)[i % 2] for i in range(24)}
STORAGE_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BIT_TYPES = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def gradient_like(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Unit rows scaled by a per-example norm spread over decades, like factors of per-example gradients."""
    x = torch.randn(rows, width, generator=gen)
    return x / x.norm(dim=1, keepdim=True) * torch.exp(2 * torch.randn(rows, 1, generator=gen)) * 1e-3


def random_bits(rows: int, width: int, dtype: str, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns (NaNs included): incompressible, the worst case for the format."""
    bits = torch.randint(-(2**15), 2**15, (rows, width), generator=gen, dtype=torch.int32)
    if dtype == "float32":
        bits = (bits << 16) | torch.randint(0, 2**16, (rows, width), generator=gen, dtype=torch.int32)
    return bits.to(BIT_TYPES[dtype]).view(STORAGE_TYPES[dtype])


@pytest.mark.parametrize("values", ["gradient-like", "random-bits"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_overhead_at_most_one_percent(tmp_path, dtype, values):
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp_path, kind="factors", columns=COLUMNS, dtype=dtype, shard_size=SHARD_SIZE, meta={"f": 4})
    for index in range(NUM_ROWS // SHARD_SIZE):
        ids = [f"train-{index * SHARD_SIZE + i:06d}" for i in range(SHARD_SIZE)]
        if values == "gradient-like":
            arrays = {c: gradient_like(SHARD_SIZE, w, gen) for c, w in COLUMNS.items()}
        else:
            arrays = {c: random_bits(SHARD_SIZE, w, dtype, gen) for c, w in COLUMNS.items()}
        writer.write_shard(index, ids, arrays)
    manifest = writer.finalize(NUM_ROWS)
    payload = NUM_ROWS * manifest.payload_bytes_per_row()
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.parquet"))
    assert on_disk == manifest.total_bytes()
    overhead = 100 * (on_disk / payload - 1)
    print(f"\n{dtype} {values}: {on_disk} bytes on disk for {payload} payload bytes: {overhead:+.2f} %")
    assert on_disk <= 1.01 * payload
