"""Examples from JSON Lines or Parquet files, tokenized with loss masks and padded into batches."""

from lorif_ray.data.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    iter_batches,
    tokenize_examples,
)
from lorif_ray.data.examples import Example, load_examples

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "TokenizedExample",
    "collate",
    "iter_batches",
    "load_examples",
    "tokenize_examples",
]
