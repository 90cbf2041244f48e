"""Examples from JSON Lines, Parquet or Arrow files (or a datasets folder), read whole or shard by shard,
tokenized with loss masks and padded into batches."""

from lorif_ray.data.batching import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    iter_batches,
    tokenize_examples,
)
from lorif_ray.data.examples import Columns, Example, examples_of_rows, iter_examples, load_examples
from lorif_ray.data.row_table import TrainTexts, commit_row_table, discard_row_table
from lorif_ray.data.rows import RowRange, data_sha256, iter_rows, read_rows
from lorif_ray.data.shards import InputShards, InputShard, shard_input, read_shard

__all__ = [
    "IGNORE_INDEX",
    "Columns",
    "Example",
    "examples_of_rows",
    "InputShards",
    "InputShard",
    "RowRange",
    "TokenizedExample",
    "TrainTexts",
    "collate",
    "commit_row_table",
    "data_sha256",
    "discard_row_table",
    "iter_batches",
    "iter_examples",
    "iter_rows",
    "load_examples",
    "shard_input",
    "read_rows",
    "read_shard",
    "tokenize_examples",
]
