"""Parquet shards of an index: write them atomically and resumably, check them, read one back checked.

The index folder's reader and namer is ``lorif_ray.store.index_folder.IndexFolder`` (its ``writer`` makes the
``ShardWriter``; its ``manifest``, ``finished``, ``batches`` and ``ids`` read through ``verify_shards`` and
``shard_batches``); this module holds the Parquet side of one shard file.

An index directory holds `_manifest.json` and `shard-00000.parquet`, `shard-00001.parquet`, ...; shard i
holds rows [i * shard_size, (i + 1) * shard_size). Each shard is written to a temporary file (`.shard-*`,
which dataset readers skip) and renamed, then recorded in the manifest with its row count, size, SHA-256
and the SHA-256 of its footer, so a re-run skips finished shards whose bytes still match.

Every read checks what it reads, in the same pass (``lorif_ray.store.integrity``): each page's CRC-32, the
footer's SHA-256 against the record (schema, page offsets, row counts: what the page CRCs do not cover),
the shard's own ``lorif.meta`` (model identity, index settings) against the manifest, and the rows each
column decoded to against the record (a flipped bit in a page header changes how many values a page
decodes to, not its CRC). Every file named by a record resolves inside the index folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lorif_ray.errors import ConfigError, CorruptShardError, IndexMismatchError, MissingShardError
from lorif_ray.store.artifacts import META_KEY, atomic_path, file_sha256, remove_stale_temporaries
from lorif_ray.store.integrity import check_parquet_footer, contained, counted_batches, parquet_footer_sha256
from lorif_ray.store.manifest import MANIFEST_NAME, Manifest, ShardRecord
from lorif_ray.store.schema import ID_COLUMN, arrow_schema, tensor_to_arrow

LOCK_NAME = ".manifest.lock"
REPAIR_HINT = "re-run stage 1 (jobs/index.py) with the same config: it verifies every shard and recomputes this one"
logger = logging.getLogger(__name__)
# One row group per shard unless a shard is larger than this (bounds reader memory).
ROW_GROUP_BYTES = 256 << 20
# Measured on 24 columns of widths 64/128 in 1024-row shards (tests/store/test_store_overhead.py prints it):
# uncompressed, the repetition levels of the list columns cost 1.4 % (float32) / 2.8 % (float16) over
# the raw values, and bfloat16 doubles (Parquet stores uint16 as INT32). zstd level 1 on v1 data pages
# (levels compressed with the values) plus BYTE_STREAM_SPLIT gives +0.1-0.2 % on incompressible bits and
# 10-22 % below raw on gradient-like values, writing at ~0.6 GB/s and reading at >1 GB/s per thread.
_PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=1,
    data_page_version="1.0",
    use_dictionary=False,
    write_statistics=False,  # min/max of float lists are useless bytes
    # A CRC-32 per page (4 bytes per ~1 MiB page), checked by every read (shard_batches): a flipped
    # bit in a shard is a CorruptShardError at the first read, with no extra pass over the file.
    write_page_checksum=True,
)
# Not for float16: DuckDB cannot decode BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY (float16 still
# compresses 10 % without it). bfloat16 (INT32) needs it to drop the zero bytes; DuckDB reads INT32
# BYTE_STREAM_SPLIT from mid-2026 on.
_BYTE_STREAM_SPLIT_DTYPES = ("float32", "bfloat16")


def shard_file_name(index: int) -> str:
    """File name of shard `index`, e.g. `shard-00007.parquet`."""
    return f"shard-{index:05d}.parquet"


def shard_path(directory: str | os.PathLike, record: ShardRecord) -> Path:
    """The file of a record, checked to resolve inside the index folder (``integrity.contained``)."""
    return contained(directory, record.file, source=f"the record of shard {record.index} in {Path(directory)}")


def some(items: list) -> str:
    """`items` for an error message, cut after 20."""
    return str(items) if len(items) <= 20 else f"{items[:20]} ... ({len(items)} in all)"


def config_diff(existing: Manifest, wanted: Manifest) -> list[str]:
    """`key: old != new` for each config key that differs; meta is compared key by key."""
    pairs = [(key, getattr(existing, key), getattr(wanted, key)) for key in ("kind", "dtype", "shard_size")]
    pairs.append(("columns", list(existing.columns.items()), list(wanted.columns.items())))  # order matters
    pairs += _dict_pairs("meta", existing.meta, wanted.meta)
    return [f"{key}: {str(old)[:80]} != {str(new)[:80]}" for key, old, new in pairs if old != new]


def _dict_pairs(prefix: str, old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old, new) per key of two dicts, descending into values that are dicts on both sides."""
    pairs = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            pairs += _dict_pairs(f"{prefix}.{key}", a, b)
        else:
            pairs.append((f"{prefix}.{key}", a, b))
    return pairs


class ShardWriter:
    """Writes the shards of one index directory and keeps its manifest.

    One run at a time (the stage holds ``lorif_ray.store.locks.writer_lock`` on the directory) and one writer
    per run, made by its driver: processes that write files for it (a Ray pool) get a copy (pickled: see
    ``__getstate__``), call ``write_file`` and return the records, which the driver ``commit``s. The manifest
    is updated under a file lock.

    Example:
        >>> writer = ShardWriter(out, kind="factors", columns=store_columns("factors", specs),
        ...                      dtype="float16", shard_size=1024, meta={"seed": 0})
        >>> for i, (ids, arrays) in enumerate(shard_batches):
        ...     if not writer.is_done(i):
        ...         writer.write_shard(i, ids, arrays)
        >>> writer.finalize(num_rows)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        kind: str,
        columns: dict[str, int],
        dtype: str,
        shard_size: int,
        meta: dict,
        also_done: Callable[[int], bool] | None = None,
    ) -> None:
        """Creates `directory`, or resumes the index in it.

        Args:
            also_done: what else a shard needs to count as done (e.g. its K-FAC statistics on disk): a shard
                whose record is intact but lacks it is recomputed, and the index is not finalized without it.

        Raises:
            IndexMismatchError: `directory` holds an index made with another kind, columns, dtype,
                shard_size or meta; the message names the keys that differ.
            ConfigError: invalid dtype, columns, shard_size, or meta not JSON-serializable.
        """
        self.directory = Path(directory)
        self.also_done = also_done
        try:
            meta = json.loads(json.dumps(meta))  # as it will read back from JSON
        except (TypeError, ValueError) as e:
            raise ConfigError(f"meta must be JSON-serializable: {e}") from e
        wanted = Manifest(kind=kind, columns=dict(columns), dtype=dtype, shard_size=shard_size, meta=meta)
        self._schema = arrow_schema(wanted.columns, dtype).with_metadata({META_KEY: json.dumps(meta)})
        self._byte_stream_split = (
            [f"{name}.list.element" for name in wanted.columns] if dtype in _BYTE_STREAM_SPLIT_DTYPES else False
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        # (shard index, sha256, size, mtime_ns) -> whether that file matched its record, as checked here
        self._verified: dict[tuple, bool] = {}
        with self._locked():
            self.manifest = self._load_or_create(wanted)
            remove_stale_temporaries(self.directory)

    def __getstate__(self) -> dict:
        """What a process that writes this index's files for its owner gets (``write_file``; e.g. a Ray pool actor,
        whose records the owner commits): the writer without the owner's cache of verified files and its
        ``also_done`` check."""
        return {**self.__dict__, "_verified": {}, "also_done": None}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK_NAME, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _load_or_create(self, wanted: Manifest) -> Manifest:
        """The manifest on disk (checked against `wanted`'s config), or `wanted` saved. Call under the lock."""
        if not (self.directory / MANIFEST_NAME).exists():
            wanted.save(self.directory)
            return wanted
        existing = Manifest.load(self.directory)
        diffs = config_diff(existing, wanted)
        if diffs:
            raise IndexMismatchError(
                f"{self.directory} holds an index made with another config ({'; '.join(diffs)}). "
                "Use another directory, or delete this one to rebuild it."
            )
        return existing

    def is_done(self, shard_index: int) -> bool:
        """Whether shard `shard_index` is recorded and its file is on disk with the recorded size and SHA-256.

        The first call verifies every recorded shard (all bytes, on several threads); a file that does
        not match its record is logged and counts as not done, so the caller recomputes it and
        `write_shard` replaces the record. Files verified (or written) here are not read again while
        their size and mtime stay the same.
        """
        record = self.manifest.record(shard_index)
        key = None if record is None else _file_key(self.directory, record)
        if key is None:
            return False
        if key not in self._verified:
            unchecked = [r for r in self.manifest.shards if _file_key(self.directory, r) not in self._verified]
            self._verified.update(verify_shards(self.directory, unchecked, self.manifest))
        return self._verified.get(key, False) and (self.also_done is None or self.also_done(shard_index))

    def write_shard(
        self, shard_index: int, example_ids: list[str], arrays: dict[str, torch.Tensor]
    ) -> ShardRecord:
        """Writes shard `shard_index` atomically and records it in the manifest (replacing any old record).

        Args:
            shard_index: position of the shard; it holds rows [shard_index * shard_size, ...).
            example_ids: n ids, 1 <= n <= shard_size.
            arrays: column name -> (n, width) float tensor, for exactly the manifest's columns; rounded
                to the storage dtype here.

        Returns:
            The shard's record (file name, rows, sha256, bytes).

        Raises:
            ConfigError: a missing or extra column, a wrong shape or row count, a non-string id.
        """
        return self.commit(self.write_file(shard_index, example_ids, arrays))

    def write_file(
        self, shard_index: int, example_ids: list[str], arrays: dict[str, torch.Tensor]
    ) -> ShardRecord:
        """Writes the file of shard `shard_index` atomically, without recording it in the manifest.

        For pipelines where workers write files and one owner (the driver) commits their records:
        a file that is never committed is simply rewritten by the next run. Arguments as `write_shard`.

        Raises:
            StorageFullError: the disk is full (names the file and about how many bytes it needed).
        """
        self._validate(shard_index, example_ids, arrays)
        dtype = self.manifest.dtype
        table = pa.Table.from_arrays(
            [pa.array(example_ids, pa.string())] + [tensor_to_arrow(arrays[c], dtype) for c in self.manifest.columns],
            schema=self._schema,
        )
        rows = len(example_ids)
        row_group_rows = max(1, min(rows, ROW_GROUP_BYTES // self.manifest.payload_bytes_per_row()))
        path = self.directory / shard_file_name(shard_index)
        with atomic_path(path, needed_bytes=table.nbytes) as tmp:  # locked until renamed (stale-file removal skips it)
            pq.write_table(
                table,
                tmp,
                row_group_size=row_group_rows,
                use_byte_stream_split=self._byte_stream_split,
                **_PARQUET_OPTIONS,
            )
            record = ShardRecord(shard_index, path.name, rows, file_sha256(tmp), tmp.stat().st_size,
                                 parquet_footer_sha256(tmp))
        return record

    def commit(self, record: ShardRecord) -> ShardRecord:
        """Records a shard written by `write_file` (here or in another process) in the manifest.

        Raises:
            MissingShardError: the record's file is not on disk with the recorded size.
        """
        path = shard_path(self.directory, record)
        if not path.is_file() or path.stat().st_size != record.bytes:
            raise MissingShardError(f"shard {record.index}: {path} is not on disk with {record.bytes} bytes")
        with self._locked():  # one appended line per shard, not the whole manifest rewritten
            if self.manifest.complete:  # a re-run replaces a record of a finished index: no longer finished
                self.manifest.complete, self.manifest.num_rows = False, None
                self.manifest.save(self.directory)
            Manifest.append_record(self.directory, record)
            self.manifest.add(record)
        self._verified[_file_key(self.directory, record)] = True  # its SHA-256 was taken when it was written
        return record

    def _validate(self, shard_index: int, example_ids: list[str], arrays: dict[str, torch.Tensor]) -> None:
        if isinstance(shard_index, bool) or not isinstance(shard_index, int) or shard_index < 0:
            raise ConfigError(f"shard index must be a non-negative int, got {shard_index!r}")
        rows, shard_size = len(example_ids), self.manifest.shard_size
        if not 1 <= rows <= shard_size:
            raise ConfigError(f"shard {shard_index}: {rows} rows; a shard holds 1 to {shard_size} rows")
        bad_ids = [i for i, x in enumerate(example_ids) if not isinstance(x, str)]
        if bad_ids:
            raise ConfigError(f"shard {shard_index}: example ids must be str; rows {some(bad_ids)} are not")
        columns = self.manifest.columns
        missing = [c for c in columns if c not in arrays]
        extra = [c for c in arrays if c not in columns]
        if missing or extra:
            raise ConfigError(f"shard {shard_index}: missing columns {missing}, unexpected columns {extra}")
        for name, width in columns.items():
            shape = tuple(arrays[name].shape)
            if shape != (rows, width):
                raise ConfigError(f"shard {shard_index}, column {name!r}: expected shape {(rows, width)}, got {shape}")

    def finalize(self, num_rows: int) -> Manifest:
        """Marks the index complete after checking that it holds exactly `num_rows` rows.

        Raises:
            MissingShardError: shards 0..ceil(num_rows / shard_size) - 1 not all written (names them).
            IndexMismatchError: shards beyond those (made for a larger data set).
            CorruptShardError: a shard whose row count is not what its position implies.
        """
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ConfigError(f"num_rows must be a non-negative int, got {num_rows!r}")
        with self._locked():
            self.manifest = manifest = self._load_or_create(self.manifest)
            shard_size = manifest.shard_size
            expected = -(-num_rows // shard_size)
            missing = [i for i in range(expected) if not self.is_done(i)]
            if missing:
                raise MissingShardError(
                    f"{self.directory}: shards {some(missing)} of 0..{expected - 1} are not written "
                    "(or their files, or what else they need, are missing or corrupt); write them, then finalize: "
                    f"{REPAIR_HINT}"
                )
            records = {s.index: s for s in manifest.shards}
            extra = sorted(i for i in records if i >= expected)
            if extra:
                raise IndexMismatchError(
                    f"{self.directory}: shards {some(extra)} lie beyond the {expected} shards of {num_rows} rows; "
                    "the directory was written for a larger data set"
                )
            wrong = [
                f"shard {i}: {records[i].rows} rows, expected {min(shard_size, num_rows - i * shard_size)}"
                for i in range(expected)
                if records[i].rows != min(shard_size, num_rows - i * shard_size)
            ]
            if wrong:
                raise CorruptShardError(f"{self.directory}: {some(wrong)}")
            manifest.complete, manifest.num_rows = True, num_rows
            manifest.save(self.directory)
        return manifest


def _file_key(directory: Path, record: ShardRecord) -> tuple | None:
    """(index, sha256, size, mtime_ns) of a record and its file as on disk now; None if the file is missing."""
    try:
        stat = shard_path(directory, record).stat()
    except FileNotFoundError:
        return None
    return record.index, record.sha256, stat.st_size, stat.st_mtime_ns


_written_meta: tuple[dict | None, bytes] = (None, b"")  # the last manifest meta and its JSON as shards hold it


def _meta_diff(path: Path, schema: pa.Schema, manifest: Manifest) -> list[str]:
    """`key: shard's != manifest's` for each meta key where the shard's own `lorif.meta` differs from its index's
    (the bytes are compared first: a shard holds exactly ``json.dumps(meta)`` of its index's meta)."""
    global _written_meta
    raw = (schema.metadata or {}).get(META_KEY.encode())
    if _written_meta[0] is not manifest.meta:
        _written_meta = (manifest.meta, json.dumps(manifest.meta).encode())
    if raw == _written_meta[1]:
        return []
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return [f"{META_KEY}: not JSON"]
    pairs = _dict_pairs("meta", meta if isinstance(meta, dict) else {}, manifest.meta)
    return [f"{key}: {str(old)[:80]} != {str(new)[:80]}" for key, old, new in pairs if old != new]


def _verify_shard(directory: Path, record: ShardRecord, manifest: Manifest | None) -> tuple[tuple | None, bool]:
    """(the record's `_file_key`, whether its file has the recorded size, SHA-256 and footer SHA-256 and, with
    `manifest`, was made for that index); mismatches are logged."""
    key = _file_key(directory, record)
    if key is None:
        return None, False
    path = shard_path(directory, record)
    if key[2] != record.bytes:
        logger.warning("shard %s has %d bytes, the manifest says %d: it will be recomputed", path, key[2], record.bytes)
        return key, False
    digest = file_sha256(path)
    if digest != record.sha256:
        logger.warning("shard %s has SHA-256 %s, the manifest says %s (corrupt): it will be recomputed",
                       path, digest, record.sha256)
        return key, False
    try:
        footer = parquet_footer_sha256(path)
        diff = [] if manifest is None else _meta_diff(path, pq.read_schema(path), manifest)
    except (ValueError, pa.ArrowException, OSError) as e:
        footer, diff = None, [f"unreadable footer ({e})"]
    if footer != record.footer_sha256 or diff:
        logger.warning("shard %s does not belong to this index (%s): it will be recomputed", path,
                       "; ".join(diff) or f"footer SHA-256 {footer}, the record says {record.footer_sha256!r}")
        return key, False
    return key, True


def verify_shards(directory: str | os.PathLike, records: list[ShardRecord],
                  manifest: Manifest | None = None) -> dict[tuple, bool]:
    """{(index, sha256, size, mtime_ns): intact} of the records' files on disk (missing files left out).

    Reads every byte once, several files at a time (hashlib releases the GIL); a file whose size, SHA-256 or
    footer SHA-256 differs from its record, or (with `manifest`) whose own `lorif.meta` is not its index's,
    is False (and logged).
    """
    directory = Path(directory)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        checked = pool.map(lambda r: _verify_shard(directory, r, manifest), records)
        return {key: ok for key, ok in checked if key is not None}


def _schema_diff(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Names of the fields that are missing, extra or of another type in `actual`."""
    actual_fields = {f.name: f for f in actual}
    expected_fields = {f.name: f for f in expected}
    names = list(expected.names) + [n for n in actual.names if n not in expected_fields]
    return [
        n
        for n in names
        if n not in actual_fields or n not in expected_fields or not actual_fields[n].equals(expected_fields[n])
    ]


def shard_batches(
    directory: Path, manifest: Manifest, record: ShardRecord, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of `example_id` and `columns` of one shard, checked against the manifest as they are read.

    Opening the shard checks its footer's SHA-256 against the record and its own `lorif.meta` against the
    manifest (footer only); every page's CRC-32 is checked while it is read; the rows decoded are counted
    against the record (``integrity.counted_batches``). Corrupt bytes raise CorruptShardError instead of
    decoding into wrong values or fewer rows.
    """
    path = shard_path(directory, record)
    if not path.is_file():
        raise MissingShardError(f"shard {record.index} of {directory} is missing: {path}")
    check_parquet_footer(path, record.footer_sha256, REPAIR_HINT, error=CorruptShardError)
    try:
        parquet_file = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(f"cannot read shard {path} (corrupt): {e}; {REPAIR_HINT}") from e
    with parquet_file:
        diff = _schema_diff(parquet_file.schema_arrow, arrow_schema(manifest.columns, manifest.dtype))
        if diff:
            raise CorruptShardError(
                f"shard {path} does not match its manifest: columns {some(diff)} differ; {REPAIR_HINT}"
            )
        foreign = _meta_diff(path, parquet_file.schema_arrow, manifest)
        if foreign:
            raise CorruptShardError(f"shard {path} was made for another index than {directory} ({some(foreign)}): "
                                    f"it does not belong here; {REPAIR_HINT}")
        if parquet_file.metadata.num_rows != record.rows:
            raise CorruptShardError(
                f"shard {path} has {parquet_file.metadata.num_rows} rows; the manifest says {record.rows}; "
                f"{REPAIR_HINT}"
            )
        batches = counted_batches(path, _decoded(path, parquet_file, batch_rows, [ID_COLUMN, *columns]), record.rows,
                                  REPAIR_HINT, error=CorruptShardError)
        yield from batches


def _decoded(path: Path, parquet_file: pq.ParquetFile, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's record batches; a decoding error (a page CRC, a bad page) is a CorruptShardError."""
    batches = parquet_file.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise CorruptShardError(f"cannot read shard {path} (corrupt): {e}; {REPAIR_HINT}") from e
        yield batch
