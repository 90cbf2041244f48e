"""The index's row table ``<index>/_rows.parquet``: each index row's example id and where the row lives in the
training input, so the texts of a top-k are read from those rows alone, never by a scan of the input.

One row per index row, in index order (= input order: global row i is input row i): ``example_id`` (string),
``offset`` (int64: the row's byte offset in a JSON Lines file; its row number in a Parquet, Arrow or
save_to_disk input) and ``line`` (int64: its 1-based line in a JSON Lines file, else 0). The leading
underscore keeps ``pyarrow.parquet.read_table(index_dir)`` to the shards. The metadata (``lorif.meta``) names
the input: ``path`` (absolute), ``sha256`` (``data_sha256``), ``size`` and ``mtime_ns`` (of the file, or the
sum and latest of a folder's data files), its ``schema`` and the table's ``format``.

``shard_input`` writes it in its one pass over the input, a shard of rows at a time, to a temporary file next
to it; the stage renames it into place once the index has accepted the input (``commit_row_table``), so a
run refused for another input never replaces the table of the index that refused it. ``TrainTexts`` reads
it: the examples of given rows, each row's id checked against the table.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lorif_ray.data.examples import DEFAULT_COLUMNS, Columns, Example, examples_at
from lorif_ray.data.rows import RowRange, data_sha256, rows_at
from lorif_ray.errors import DataError
from lorif_ray.store.index_folder import ROWS_NAME, ROWS_PENDING_PREFIX, IndexFolder

log = logging.getLogger(__name__)

ROWS_FORMAT = 1
_META_KEY = b"lorif.meta"  # as lorif_ray.store.artifacts.META_KEY: the store's readers read it alike
_DATA_SUFFIXES = (".arrow", ".parquet", ".jsonl")
_CHECKED: dict[tuple[str, int, int], str] = {}  # (input, size, mtime_ns) → sha256 computed in this process


def input_stat(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes, modification time in ns) of an input file, or the sum and latest of a folder's data files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES)
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def read_row_table_meta(path: str | os.PathLike) -> dict:
    """The metadata of a row table ({} if it has none)."""
    import pyarrow.parquet as pq

    try:
        return json.loads((pq.read_schema(path).metadata or {}).get(_META_KEY, b"{}"))
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read the index's row table ({e}); re-run stage 1 to rewrite it") from e


class RowTableWriter:
    """A row table for one input, written a batch of rows at a time (``add``) to a temporary file beside
    ``path``, which ``close`` turns into a pending table (``_rows.pending-<sha>.parquet``, whole) and returns
    (``commit_row_table`` renames it); ``abort`` removes the temporary.

    Raises:
        OSError: the folder is not writable (or the disk is full).
    """

    def __init__(self, path: str | os.PathLike, input_path: str | os.PathLike, sha256: str,
                 columns: Columns = DEFAULT_COLUMNS):
        from lorif_ray.store.artifacts import temporary_path

        size, mtime_ns = input_stat(input_path)
        self.meta = {"format": ROWS_FORMAT, "path": str(Path(input_path).resolve()), "sha256": sha256,
                     "size": size, "mtime_ns": mtime_ns, "kind": _kind(input_path), "columns": columns.renamed()}
        # whole once closed: a *pending* table (not a temporary, which the stage's sweep of stale temporaries would
        # remove before the driver commits it; the plan may be a Ray task that has ended by then)
        self.pending = pending_row_table_path(path, sha256)
        self.tmp = temporary_path(self.pending)
        self.writer = None

    def add(self, rows: RowRange, ids: list[str], schema: str) -> None:
        """One batch of consecutive rows (``iter_rows``'s range, with its JSON Lines offsets) and their ids."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if rows.offsets is not None:
            offsets, lines = list(rows.offsets), list(rows.lines)
        else:
            offsets, lines = list(range(rows.start, rows.stop)), [0] * rows.rows
        if self.writer is None:
            meta = {**self.meta, "schema": schema, "offset": "byte" if rows.offsets is not None else "row"}
            fields = pa.schema([("example_id", pa.string()), ("offset", pa.int64()), ("line", pa.int64())])
            self.schema = fields.with_metadata({_META_KEY: json.dumps(meta).encode()})
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", write_page_checksum=True)
        self.writer.write_table(pa.table([pa.array(ids, pa.string()), pa.array(offsets, pa.int64()),
                                          pa.array(lines, pa.int64())], schema=self.schema))

    def close(self) -> str | None:
        """The pending table, whole (``commit_row_table`` renames it); None when no row was added."""
        from lorif_ray.store.artifacts import replace_durably

        if self.writer is None:
            return None
        self.writer.close()
        replace_durably(self.tmp, self.pending)
        return str(self.pending)

    def abort(self) -> None:
        """Drop the temporary file; on storage that cannot be written (read-only, full) there may be none to drop."""
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError as error:  # e.g. EROFS: nothing was created
            log.debug("cannot remove %s: %s", self.tmp, error)


def open_row_table(path: str | os.PathLike | None, input_path: Path, sha256: str,
                   columns: Columns = DEFAULT_COLUMNS) -> RowTableWriter | None:
    """A writer of ``input_path``'s row table at ``path``; None when none is asked for, the one there already
    records this input (same sha256 and size), or the folder cannot be written (logged)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        try:
            meta = read_row_table_meta(path)
        except DataError:
            meta = {}
        if (meta.get("format") == ROWS_FORMAT and meta.get("sha256") == sha256
                and meta.get("size") == input_stat(input_path)[0] and meta.get("columns", {}) == columns.renamed()):
            return None
    try:
        return RowTableWriter(path, input_path, sha256, columns)
    except OSError as error:
        log.info("cannot write the row table %s (%s): the index works without it, results show ids only", path, error)
        return None


def pending_row_table_path(path: str | os.PathLike, sha256: str) -> Path:
    """Where the plan of an input of hash ``sha256`` leaves its row table until the stage commits it."""
    return Path(path).parent / f"{ROWS_PENDING_PREFIX}{sha256[:16]}.parquet"


def commit_row_table(temporary: str | None) -> None:
    """Move a row table written by ``shard_input`` (``InputShards.rows_table``) into place; None: nothing to do."""
    from lorif_ray.store.artifacts import replace_durably

    if temporary is None or not Path(temporary).is_file():
        return
    target = Path(temporary).parent / ROWS_NAME
    try:
        replace_durably(temporary, target)
        for stale in target.parent.glob(f"{ROWS_PENDING_PREFIX}*.parquet"):  # of runs that stopped before committing
            stale.unlink(missing_ok=True)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        log.info("cannot write the row table %s (%s): results show ids only", target, error)


def discard_row_table(temporary: str | None) -> None:
    """Remove an uncommitted row table (a stage that stopped before the index accepted its input), and the index
    folder with it when nothing else is in it (the table's writer made it: a refused run leaves no folder)."""
    if temporary is None or not Path(temporary).exists():
        return
    Path(temporary).unlink()
    try:
        Path(temporary).parent.rmdir()
    except OSError:  # not empty: an index (or anything else) is there
        pass


def _kind(path: str | os.PathLike) -> str:
    path = Path(path)
    return "save_to_disk" if path.is_dir() else path.suffix.lower().lstrip(".")


@dataclass(frozen=True)
class _Position:
    example_id: str
    rows: RowRange


class TrainTexts:
    """The training examples of index rows, read from the training input at the positions its row table holds
    (only those rows), each row's id checked against the table.

    Args:
        index_dir: the index folder (its ``_rows.parquet``).
        path: the training input; None = the path the table records (it may have moved: pass where it is now).
        sha256: the input hash the index records (``manifest.meta["data"]["sha256"]``), checked against the
            table's; None = not checked.

    Raises:
        DataError: the index has no row table, the input is missing, or it changed since stage 1 indexed it
            (another size; or another sha256, computed once per process when its modification time moved).

    Example:
        >>> texts = TrainTexts("out/index")  # doctest: +SKIP
        >>> texts.texts([0, 17])  # doctest: +SKIP
        {0: 'the capital of zorvia is kelm .', 17: '...'}
    """

    def __init__(self, index_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                 sha256: str | None = None):
        self.table = IndexFolder(index_dir).row_table_path
        if not self.table.is_file():
            raise DataError(f"{index_dir} has no {ROWS_NAME} (an index made before stage 1 wrote it, or on read-only "
                            "storage): run stage 1 again on it where it is writable (it reuses the index and adds "
                            "the table) to get training texts")
        self.meta = read_row_table_meta(self.table)
        if self.meta.get("format") != ROWS_FORMAT:
            raise DataError(f"{self.table}: row table format {self.meta.get('format')!r}, this version reads "
                            f"{ROWS_FORMAT}: run stage 1 again on the index to rewrite it")
        if sha256 is not None and self.meta["sha256"] != sha256:
            raise DataError(f"{self.table} was written for another input (sha256 {self.meta['sha256'][:12]}…) than "
                            f"the index's ({sha256[:12]}…): run stage 1 again on the index to rewrite it")
        self.path = Path(path) if path is not None else Path(self.meta["path"])
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        """Refuse an input that is not the one indexed: by size, then by sha256 if its time moved."""
        if not self.path.exists():
            raise DataError(f"{self.path}: the training input of the index ({self.table}) is not there any more; "
                            "pass where it is now (data.train=...)")
        size, mtime_ns = input_stat(self.path)
        indexed = self.meta["size"], self.meta["mtime_ns"]
        if size != indexed[0]:
            raise DataError(f"{self.path}: the training input changed since stage 1 indexed it ({indexed[0]} bytes "
                            f"then, {size} now); re-run stage 1 on it, or point data.train at the indexed file")
        if mtime_ns == indexed[1]:
            return
        key = (str(self.path.resolve()), size, mtime_ns)
        if key not in _CHECKED:
            _CHECKED[key] = data_sha256(self.path)
        if _CHECKED[key] != self.meta["sha256"]:
            raise DataError(f"{self.path}: the training input changed since stage 1 indexed it (sha256 "
                            f"{_CHECKED[key][:12]}… now, {self.meta['sha256'][:12]}… then); re-run stage 1 on it, "
                            "or point data.train at the indexed file")

    @property
    def num_rows(self) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.table).metadata.num_rows

    def _positions(self, rows: list[int]) -> dict[int, _Position]:
        """{row: its id and single-row range in the input}, reading the table's row groups that hold them."""
        values = rows_at(self.table, [RowRange(r, r + 1) for r in rows])
        out = {}
        for row, value in zip(rows, values):
            if self.meta["offset"] == "byte":
                where = RowRange(row, row + 1, value["offset"], value["line"])
            else:
                where = RowRange(value["offset"], value["offset"] + 1)
            out[row] = _Position(value["example_id"], where)
        return out

    def ids(self, rows: Iterable[int]) -> dict[int, str]:
        """{global row: example id} from the table alone (the input is not read)."""
        rows = sorted({int(r) for r in rows})
        return {row: p.example_id for row, p in self._positions(rows).items()}

    def all_ids(self) -> list[str]:
        """Every row's example id, in row order (the table's ``example_id`` column: O(N), for the full-score files'
        sidecars)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.table, columns=["example_id"]).column("example_id").to_pylist()

    def examples(self, rows: Iterable[int]) -> dict[int, Example]:
        """{global row: its ``Example``} (text; prompt; messages), read from those rows of the input.

        Raises:
            DataError: a row past the index's end, or a row whose id is not the one indexed (the input changed).
        """
        rows = sorted({int(r) for r in rows})
        if rows and (rows[0] < 0 or rows[-1] >= self.num_rows):
            raise DataError(f"{self.table}: rows {rows[0]}…{rows[-1]} asked for, the index has {self.num_rows}")
        positions = self._positions(rows)
        found = examples_at(self.path, [positions[r].rows for r in rows], self.meta["schema"],
                            Columns(**self.meta.get("columns", {})))
        out = {}
        for row, example in zip(rows, found):
            if example.id != positions[row].example_id:
                raise DataError(f"{self.path}, row {row}: id {example.id!r} where stage 1 indexed "
                                f"{positions[row].example_id!r}; the training input changed since: re-run stage 1")
            out[row] = example
        return out

    def texts(self, rows: Iterable[int]) -> dict[int, str]:
        """{global row: the example's text} (prompt + response as one text; chat as "role: content" lines)."""
        return {row: example.text for row, example in self.examples(rows).items()}
