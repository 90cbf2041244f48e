"""Rows (dicts) of an input path, read in batches from a row range, whatever its kind.

Kinds: `.jsonl`, `.parquet`, `.arrow` (an Arrow IPC file or stream), or a folder written by
`datasets.Dataset.save_to_disk` (its `data-*.arrow` stream files, read with pyarrow alone: `datasets`
is not needed). Only the rows of the range become Python objects, one batch at a time:

- Parquet: the row groups that overlap the range, streamed in record batches.
- Arrow: memory-mapped (no copy), the range sliced out.
- JSON Lines: read from the byte offset of the range's first row (``RowRange.offset``, found by a
  pass over the file: ``lorif_ray.data.shards.shard_input`` records it for each shard), so a shard
  costs its own lines, not the lines before it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorif_ray.errors import DataError

BATCH_ROWS = 8192
"""Rows per batch when the caller does not choose (a batch is the most rows held as dicts at once)."""


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of an input (stop None: to its end). In a JSON Lines file row ``start`` is on
    line ``line`` (1-based), at byte ``offset``; other kinds ignore both. A JSON Lines batch read by
    ``iter_rows`` also carries ``offsets`` and ``lines``: each of its rows' byte offset and line (None
    otherwise; not compared).

    Example:
        >>> RowRange(1024, 2048).rows
        1024
    """

    start: int = 0
    stop: int | None = None
    offset: int = 0
    line: int = 1
    offsets: tuple[int, ...] | None = field(default=None, compare=False, repr=False)
    lines: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        """How many rows the range holds (stop must be known)."""
        return self.stop - self.start


def iter_rows(path: str | Path, rows: RowRange = RowRange(),
              batch_rows: int = BATCH_ROWS) -> Iterator[tuple[RowRange, list[dict[str, Any]], set[str]]]:
    """The rows of ``rows`` in batches of ``batch_rows`` (counted from ``rows.start``; the last may be shorter).

    Yields:
        (the batch's own range, with its JSON Lines offset and line; its rows; their columns: the union of
        the keys for JSON Lines, the schema's names otherwise).

    Raises:
        DataError: missing path, unknown kind, or unreadable file (a JSON Lines line that is not UTF-8,
            not JSON or not an object is named by its number).
    """
    path = Path(path)
    if path.is_dir():
        yield from _arrow_batches(_saved_dataset_table(path), rows, batch_rows)
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_batches(path, rows, batch_rows)
    elif suffix == ".parquet":
        yield from _parquet_batches(path, rows, batch_rows)
    elif suffix == ".arrow":
        yield from _arrow_batches(_arrow_table(path), rows, batch_rows)
    else:
        raise DataError(f"{path}: unknown file kind {suffix!r}; expected .jsonl, .parquet, .arrow or a "
                        "datasets save_to_disk folder")


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], set[str]]:
    """Every row (dict) of a data path and the union of their columns, whatever its kind (small files:
    queries, evaluation sets).

    Raises:
        DataError: missing path, unknown kind, or unreadable file.
    """
    rows: list[dict[str, Any]] = []
    columns: set[str] = set()
    for _, batch, batch_columns in iter_rows(path):
        rows += batch
        columns |= batch_columns
    return rows, columns


def rows_at(path: str | Path, rows: list[RowRange], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows (dicts) of single-row ranges ``rows`` of an input, in the given order, reading only those rows:
    a JSON Lines row from its byte ``offset`` (its ``line`` names it in errors), a Parquet row from its row
    group (each touched group read once, ``columns`` only), an Arrow row from the memory map.

    Raises:
        DataError: as ``iter_rows``; a row past the input's end.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        out = []
        with path.open("rb") as f:
            for row in rows:
                f.seek(row.offset)
                value = _json_row(path, row.line, f.readline())
                if value is None:
                    raise DataError(f"{path}, line {row.line}: blank where row {row.start} was; the file changed")
                out.append(value)
        return out
    if path.is_file() and path.suffix.lower() == ".parquet":
        return _parquet_rows_at(path, [r.start for r in rows], columns)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".arrow"):
        table = _saved_dataset_table(path) if path.is_dir() else _arrow_table(path)
        wanted = [r.start for r in rows]
        if wanted and max(wanted) >= table.num_rows:
            raise DataError(f"{path}: row {max(wanted)} asked for, the input has {table.num_rows} rows")
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        return table.take(wanted).to_pylist() if wanted else []
    return [row for _, batch, _ in iter_rows(path, RowRange(0, 0)) for row in batch]  # names the path's fault


def _parquet_rows_at(path: Path, wanted: list[int], columns: list[str] | None) -> list[dict[str, Any]]:
    """Rows ``wanted`` of a Parquet file, one row group read at a time (each group that holds one, once)."""
    import bisect

    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, page_checksum_verification=True)  # pages written with a CRC: checked
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
        names = file.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read Parquet ({e})") from e
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    if wanted and max(wanted) >= starts[-1]:
        raise DataError(f"{path}: row {max(wanted)} asked for, the input has {starts[-1]} rows")
    by_group: dict[int, list[int]] = {}
    for row in sorted(set(wanted)):
        by_group.setdefault(bisect.bisect_right(starts, row) - 1, []).append(row)
    found: dict[int, dict[str, Any]] = {}
    selected = None if columns is None else [c for c in columns if c in names]
    for group, group_rows in by_group.items():
        table = file.read_row_group(group, columns=selected)
        values = table.take([r - starts[group] for r in group_rows]).to_pylist()
        found.update(zip(group_rows, values))
    return [found[r] for r in wanted]


def data_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a data file's bytes (equal to ``lorif_ray.store.file_sha256``), or of a folder's
    data files (name and bytes of each ``*.arrow``/``*.parquet``/``*.jsonl``, in name order); streamed
    in 1 MiB reads."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".arrow", ".parquet", ".jsonl"))
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _jsonl_batches(path: Path, rows: RowRange, batch_rows: int):
    """JSON Lines rows (one object per non-blank line) from byte ``rows.offset``, line ``rows.line``."""
    batch: list[dict[str, Any]] = []
    keys: set[str] = set()
    offsets: list[int] = []
    lines: list[int] = []
    index, offset, line_number = rows.start, rows.offset, rows.line

    def where() -> RowRange:
        return RowRange(index - len(batch), index, offsets[0], lines[0], tuple(offsets), tuple(lines))

    with path.open("rb") as f:
        f.seek(rows.offset)
        for raw in f:
            row = _json_row(path, line_number, raw)
            if row is not None:
                batch.append(row)
                offsets.append(offset)
                lines.append(line_number)
                keys.update(row)
                index += 1
                if len(batch) == batch_rows or index == rows.stop:
                    yield where(), batch, keys
                    batch, keys, offsets, lines = [], set(), [], []
                    if index == rows.stop:
                        return
            offset, line_number = offset + len(raw), line_number + 1
    if batch:
        yield where(), batch, keys


def _json_row(path: Path, line_number: int, raw: bytes) -> dict[str, Any] | None:
    """One JSON Lines line as a dict; None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is fine
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}, line {line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "JSON Lines files must be UTF-8"
        ) from e
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {line_number}: invalid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise DataError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
    return row


def _parquet_batches(path: Path, rows: RowRange, batch_rows: int):
    """The row groups of a Parquet file that overlap ``rows``, streamed and re-cut into batches (a shard
    costs the row groups it touches: files written with row groups of about a shard or less read best)."""
    import pyarrow.parquet as pq  # Deferred: only Parquet inputs need pyarrow.

    try:
        file = pq.ParquetFile(path)
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read Parquet ({e})") from e
    groups, first, begin = [], None, 0
    for group, size in enumerate(sizes):
        if begin + size > rows.start and (rows.stop is None or begin < rows.stop):
            groups.append(group)
            first = begin if first is None else first
        begin += size
    if groups:
        yield from _recut(file.iter_batches(batch_size=batch_rows, row_groups=groups), first, rows, batch_rows)


def _arrow_batches(table, rows: RowRange, batch_rows: int):
    """A (memory-mapped) table's rows in ``rows``: slicing copies nothing until the rows become dicts."""
    stop = table.num_rows if rows.stop is None else min(rows.stop, table.num_rows)
    if rows.start < stop:
        yield from _recut(table.slice(rows.start, stop - rows.start).to_batches(), rows.start, rows, batch_rows)


def _recut(batches, first: int, rows: RowRange, batch_rows: int):
    """Consecutive record batches, the first beginning at row ``first``, as batches of dicts of rows
    [s, s + batch_rows) for s = rows.start, rows.start + batch_rows, ... up to rows.stop."""
    import pyarrow as pa

    held, at = None, first  # held: a table of rows [at, at + held.num_rows)
    stop = rows.stop
    for batch in batches:
        table = pa.Table.from_batches([batch])
        held = table if held is None else pa.concat_tables([held, table])
        if at < rows.start:
            skip = min(rows.start - at, held.num_rows)
            held, at = held.slice(skip), at + skip
        while held.num_rows and (held.num_rows >= batch_rows or (stop is not None and at + held.num_rows >= stop)):
            n = min(batch_rows, held.num_rows if stop is None else stop - at)
            yield RowRange(at, at + n), held.slice(0, n).to_pylist(), set(held.column_names)
            held, at = held.slice(n), at + n
            if stop is not None and at >= stop:
                return
    if held is not None and held.num_rows:
        yield RowRange(at, at + held.num_rows), held.to_pylist(), set(held.column_names)


def dataset_split(path: str | Path, split: str | None, key: str = "data.split") -> Path:
    """The folder of split ``split`` of a ``datasets.DatasetDict.save_to_disk`` folder (``dataset_dict.json`` and
    one ``save_to_disk`` folder per split); any other path as it is, when no split is asked for.

    Raises:
        DataError: a DatasetDict folder without ``split`` (its splits are named), or with a split it lacks; a
            split asked of a path that is not a DatasetDict folder (``key`` names the setting).
    """
    path = Path(path)
    listing = path / "dataset_dict.json"
    if not listing.is_file():
        if split is not None:
            raise DataError(f"{key}={split}: {path} is not a DatasetDict save_to_disk folder (no dataset_dict.json); "
                            f"drop {key} or point at the DatasetDict folder")
        return path
    try:
        splits = list(json.loads(listing.read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{listing}: unreadable DatasetDict listing ({e})") from e
    if split is None:
        raise DataError(f"{path} is a DatasetDict with splits {', '.join(splits)}: choose one with "
                        f"{key}={splits[0] if splits else '<split>'}")
    if split not in splits or not (path / split).is_dir():
        raise DataError(f"{key}={split}: {path} has the splits {', '.join(splits)}")
    return path / split


def _saved_dataset_table(path: Path):
    """A `datasets.Dataset.save_to_disk` folder: its `data-*.arrow` files (Arrow IPC streams) in name order."""
    import pyarrow as pa  # Deferred: only Arrow inputs need pyarrow here.

    files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not files:
        hint = " (a DatasetDict: choose a split with data.split)" if (path / "dataset_dict.json").exists() else ""
        raise DataError(f"{path}: a folder without data-*.arrow files; expected a datasets save_to_disk "
                        f"folder{hint}")
    return pa.concat_tables([_arrow_table(f) for f in files])


def _arrow_table(path: Path):
    """An Arrow IPC file (random access) or stream (what `datasets` writes), memory-mapped."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:  # the table's buffers keep the mapping alive
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all()
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read Arrow IPC ({e})") from e
