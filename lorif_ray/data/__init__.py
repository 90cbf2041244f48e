"""Examples from JSON Lines, Parquet or Arrow files (or a datasets folder), tokenized with loss masks and padded into batches."""

from lorif_ray.data.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    iter_batches,
    tokenize_examples,
)
from lorif_ray.data.examples import Example, data_sha256, load_examples, read_rows

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "TokenizedExample",
    "collate",
    "data_sha256",
    "iter_batches",
    "load_examples",
    "read_rows",
    "tokenize_examples",
]
