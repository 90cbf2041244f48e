"""A training input cut into shards by row range: planned by one streaming pass, then read shard by shard.

``shard_input`` reads the input once, one shard of rows as Python objects at a time: it checks every
row's schema, the ids' uniqueness (pyarrow counts the id column: N short strings in Arrow memory, no
Python set), hashes the bytes and records each shard's row range. For JSON Lines it also records the
byte offset and line of each shard's first row, so ``read_shard`` starts there and reads no line of
another shard. Converting JSON Lines to a Parquet cache would give the same random access, but the
pass over the file is needed anyway (hash, ids, schema), and offsets write nothing: read-only inputs
and index folders work, and no second copy of a large input appears on disk. The plan holds O(shards)
numbers; stage 1 on Ray makes it in a task, so its driver never reads the input. Asked for, the same pass
writes the index's row table (``lorif_ray.data.row_table``: each row's id and position in the input, one
shard of rows at a time), so results read the texts of their rows without another pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lorif_ray.data.examples import DEFAULT_COLUMNS, Columns, Example, check_unique_ids, iter_examples
from lorif_ray.data.row_table import open_row_table
from lorif_ray.data.rows import RowRange, data_sha256
from lorif_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputShard:
    """One shard of a training input: rows ``rows`` of ``path``, of the file's schema ``schema``, its fields in
    ``columns`` (what a Ray worker needs to read it)."""

    path: str
    schema: str
    rows: RowRange
    columns: Columns = DEFAULT_COLUMNS


@dataclass(frozen=True)
class InputShards:
    """A checked training input cut into shards: shard i holds rows [i·shard_size, (i+1)·shard_size).

    Attributes:
        path: The input (file or ``save_to_disk`` folder).
        sha256: ``data_sha256`` of the input.
        schema: Its rows' schema (one of ``lorif_ray.data.examples.SCHEMAS``).
        ranges: The row range of each shard, in order.
        columns: The columns of the schema's fields (``data.*_column``).
        rows_table: The row table this pass wrote, under a temporary name for the stage to commit
            (``commit_row_table``) once the index accepts the input; None: none asked for, the one there
            already records this input, or the folder is not writable.

    Example:
        >>> plan = shard_input("train.jsonl", shard_size=1024)  # doctest: +SKIP
        >>> plan.num_rows, len(plan.ranges), plan.shard(1).rows  # doctest: +SKIP
        (3000, 3, RowRange(start=1024, stop=2048, offset=81920, line=1025))
    """

    path: str
    sha256: str
    schema: str
    ranges: tuple[RowRange, ...]
    columns: Columns = DEFAULT_COLUMNS
    rows_table: str | None = None

    @property
    def num_rows(self) -> int:
        return self.ranges[-1].stop

    def shard(self, index: int) -> InputShard:
        return InputShard(self.path, self.schema, self.ranges[index], self.columns)


def shard_input(path: str | Path, shard_size: int, columns: Columns = DEFAULT_COLUMNS,
               rows_table: str | Path | None = None) -> InputShards:
    """Check a training input and cut it into shards of ``shard_size`` rows (one streaming pass, plus the hash).

    Args:
        columns: the columns of the schema's fields (``data.*_column``), recorded in the row table too.
        rows_table: where the index keeps its row table (``IndexFolder.row_table_path``); written in the same pass, a
            shard of rows at a time, under a temporary name (``InputShards.rows_table``). None: not written.

    Raises:
        ConfigError: shard_size < 1.
        DataError: as ``load_examples``: the path is unusable, empty, has no schema's columns, a row is
            malformed or of another schema (named), or ids repeat.
    """
    import pyarrow as pa  # Deferred: JSON Lines inputs need pyarrow only for the id check.

    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size}: must be >= 1")
    path = Path(path)
    sha256 = data_sha256(path) if rows_table is not None and path.exists() else None
    table = open_row_table(rows_table, path, sha256, columns) if sha256 is not None else None
    ranges, ids, schema = [], [], None
    try:
        for rows, examples in iter_examples(path, batch_rows=shard_size, columns=columns):
            schema = schema or examples[0].schema
            ranges.append(replace(rows, offsets=None, lines=None))  # the plan holds O(shards) numbers
            batch_ids = [e.id for e in examples]
            ids.append(pa.array(batch_ids, pa.string()))
            if table is not None:
                table = _add_rows(table, rows, batch_ids, schema)
        if not ranges:
            raise DataError(f"{path}: the file holds no examples")
        check_unique_ids(path, pa.chunked_array(ids, pa.string()))
    except BaseException:
        if table is not None:
            table.abort()
        raise
    written = _close_rows(table) if table is not None else None
    return InputShards(str(path), sha256 or data_sha256(path), schema, tuple(ranges), columns, written)


def _close_rows(table) -> str | None:
    """``table.close``; on a full disk the table is dropped (logged) and the plan goes on without it."""
    try:
        return table.close()
    except OSError as error:
        log.warning("cannot write the row table %s (%s): results will show ids only", table.pending, error)
        table.abort()
        return None


def _add_rows(table, rows: RowRange, ids: list[str], schema: str):
    """``table.add``; on a full disk the table is dropped (logged) and the plan goes on without it."""
    try:
        table.add(rows, ids, schema)
        return table
    except OSError as error:
        log.warning("cannot write the row table %s (%s): results will show ids only", table.tmp, error)
        table.abort()
        return None


def read_shard(shard: InputShard) -> list[Example]:
    """The examples of one shard, read from its own rows only.

    Raises:
        DataError: a row is malformed, or the file no longer holds the shard's rows (it changed after
            ``shard_input``).
    """
    rows = shard.rows
    examples = [e for _, batch in iter_examples(shard.path, rows, shard.schema, batch_rows=rows.rows,
                                                columns=shard.columns) for e in batch]
    if len(examples) != rows.rows:
        raise DataError(f"{shard.path}: rows [{rows.start}, {rows.stop}) were planned, {len(examples)} read; the "
                        "file changed after stage 1 planned its shards: run stage 1 again")
    return examples
