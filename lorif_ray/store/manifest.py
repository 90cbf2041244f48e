"""The manifest of an index directory: what its rows hold, how they were made, and its shards.

`_manifest.json` sits next to the shard files. It lists each shard with its row count, size and SHA-256,
and says whether the index is complete (every shard written and `finalize` called). While stage 1 runs,
each committed shard's record is appended to `_shards.jsonl` (one JSON line, fsynced) instead of
rewriting the whole manifest per shard, which grows quadratically with the shards (3,700 at the
mission's scale); loading merges the log, and `finalize` folds it into `_manifest.json`.

The manifest and every log line carry the CRC-32 of their own content (``integrity.seal``); each record
also holds the SHA-256 of its shard's Parquet footer, which every read checks (page CRCs cover the page
data, not the footer). Format 1 (before these checksums, with the K-FAC statistics in ``kronecker/``) is
refused by name: such an index is rebuilt.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorif_ray.errors import ConfigError, CorruptShardError, IndexNotFoundError
from lorif_ray.store.artifacts import storage_error, write_json
from lorif_ray.store.integrity import contained, read_sealed_json, seal, unseal
from lorif_ray.store.schema import BYTES_PER_VALUE, check_columns, check_dtype

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"  # leading "_": dataset readers skip it, so the directory reads as Parquet
SHARD_LOG_NAME = "_shards.jsonl"  # records committed since the manifest was last written
FORMAT_VERSION = 2  # 2: sealed manifest and log lines, footer SHA-256 per record, statistics in _kronecker/


@dataclass
class ShardRecord:
    """One shard file of an index."""

    index: int  # position in the index; shard i holds rows [i * shard_size, (i + 1) * shard_size)
    file: str  # file name, relative to the index directory
    rows: int
    sha256: str  # hex digest of the file's bytes
    bytes: int  # file size
    footer_sha256: str = ""  # hex digest of its Parquet footer (``integrity.parquet_footer_sha256``), checked by reads


@dataclass
class Manifest:
    """What an index directory holds and how it was made."""

    kind: str  # what rows hold: "factors", "dense", "hidden", ...
    columns: dict[str, int]  # column name -> floats per row, in storage order
    dtype: str  # storage dtype, one of schema.STORAGE_DTYPES
    shard_size: int  # rows per shard (the last one may hold fewer)
    num_rows: int | None = None  # total rows, set by finalize
    complete: bool = False  # every shard written and finalize called
    meta: dict = field(default_factory=dict)  # config, model identity, layer list: whatever the writer passes
    shards: list[ShardRecord] = field(default_factory=list)  # sorted by index
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        check_columns(self.columns)
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"shard_size must be a positive int, got {self.shard_size!r}")

    def payload_bytes_per_row(self) -> int:
        """Bytes of float values in one row: sum of widths x bytes per value."""
        return sum(self.columns.values()) * BYTES_PER_VALUE[self.dtype]

    def total_bytes(self) -> int:
        """Sum of the shard file sizes."""
        return sum(s.bytes for s in self.shards)

    def row_range(self, shards: list[int]) -> tuple[int, int]:
        """Rows [start, stop) in index order of a contiguous run of shard indices (e.g. a worker's group).

        Raises:
            ConfigError: the shards are not consecutive or not in this index.
        """
        rows = {s.index: s.rows for s in self.shards}
        if not shards:
            return 0, 0
        first = shards[0]
        if list(shards) != list(range(first, first + len(shards))) or any(i not in rows for i in shards):
            raise ConfigError(f"shards {shards} are not a consecutive run of this index's {len(rows)} shards")
        start = sum(n for i, n in rows.items() if i < first)
        return start, start + sum(rows[i] for i in shards)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `directory/_manifest.json` atomically, with every record (the shard log is then folded in)."""
        write_json(Path(directory) / MANIFEST_NAME, seal(asdict(self)))
        (Path(directory) / SHARD_LOG_NAME).unlink(missing_ok=True)

    @staticmethod
    def append_record(directory: str | os.PathLike, record: ShardRecord) -> None:
        """Appends one committed shard's record to the shard log, durably (O(1) per shard).

        Raises:
            StorageFullError: the disk is full (the line is then not committed: the shard is redone).
        """
        path = Path(directory) / SHARD_LOG_NAME
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        line = ("\n" if torn else "") + json.dumps(seal(asdict(record))) + "\n"
        try:
            with open(path, "a") as log:
                log.write(line)
                log.flush()
                os.fsync(log.fileno())
        except OSError as error:
            full = storage_error(path, error, len(line))
            if full is not None:
                raise full from error
            raise

    def record(self, index: int) -> ShardRecord | None:
        """The record of shard ``index``, or None (O(log shards): ``shards`` is sorted by index)."""
        at = bisect.bisect_left(self.shards, index, key=lambda s: s.index)
        return self.shards[at] if at < len(self.shards) and self.shards[at].index == index else None

    def add(self, record: ShardRecord) -> None:
        """Records (or replaces) a shard in memory; the index is no longer complete."""
        at = bisect.bisect_left(self.shards, record.index, key=lambda s: s.index)
        if at < len(self.shards) and self.shards[at].index == record.index:
            self.shards[at] = record
        else:
            self.shards.insert(at, record)
        self.complete, self.num_rows = False, None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Reads `directory/_manifest.json`.

        Raises:
            IndexNotFoundError: no manifest in `directory`.
            CorruptShardError: the manifest is not valid JSON, lacks fields, or does not match its checksum.
            IndexMismatchError: written by another format version (1: before checksums; or a newer one).
            UnsafePathError: the manifest is a symlink out of `directory`.
        """
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise IndexNotFoundError(f"no index at {Path(directory)}: {path} does not exist")
        rebuild = f"delete {Path(directory)} (or choose another index_dir) and re-run stage 1 (jobs/index.py)"
        data = read_sealed_json(contained(directory, MANIFEST_NAME, source=f"the index {directory}"), FORMAT_VERSION,
                                rebuild, error=CorruptShardError, unversioned=None,
                                older=" (made before footer and header checksums, with its K-FAC statistics in kronecker/)")
        try:
            shards = [ShardRecord(**s) for s in data.pop("shards")]
            manifest = cls(**data, shards=shards)
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise CorruptShardError(f"invalid manifest {path}: {e}") from e
        for record in _read_shard_log(Path(directory) / SHARD_LOG_NAME):
            manifest.add(record)
        return manifest


def _read_shard_log(path: Path) -> list[ShardRecord]:
    """The records of a shard log; a torn line (a crash mid-append) is skipped: its shard counts as not
    written and is redone."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(ShardRecord(**unseal(json.loads(line), f"line {number} of {path}", "it is redone")))
        except (ValueError, TypeError) as e:
            logger.warning("skipping line %d of %s (torn by a crash mid-write, or corrupt: %s); that shard is redone",
                           number, path, e)
    return records
