"""Checks that an artifact reads back as it was written, run in the pass that reads it (no extra pass).

Every store calls these instead of re-implementing them:

- ``crc32`` of bytes, an array or a tensor; ``tensor_entry`` / ``check_tensor``: a tensor's CRC-32, dtype and
  shape, kept in its file's header and checked when the tensor is read;
- ``block_checksums`` / ``CheckedBlocks``: a CRC-32 per block of rows of a memory-mapped array, checked when
  a read first touches the block;
- ``seal`` / ``unseal``: a JSON header (manifest, shard-log line, curvature header, g'_t meta) that carries the
  CRC-32 of its own content;
- ``parquet_footer_sha256`` / ``check_parquet_footer``: the footer of a Parquet file (schema, page offsets, row
  counts, metadata), which the page CRCs do not cover;
- ``counted_batches``: the rows a shard decoded to, against its record: a flipped bit in a data-page header
  (its value count or page type) changes how many values the page decodes to, not the page's CRC;
- ``contained``: a path taken from a manifest, record, header or meta, resolved inside its folder (symlinks
  included).

CRC-32 (zlib, ~6 GB/s on one core) finds every single-bit error and every burst up to 32 bits: it guards
against corruption, not against someone who rewrites the checksum too.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lorif_ray.errors import CorruptArtifactError, IndexMismatchError, UnsafePathError

SEAL_KEY = "crc32"  # the key of a sealed JSON header's own checksum
PARQUET_MAGIC = b"PAR1"


def crc32(data) -> int:
    """CRC-32 of bytes, of a C-contiguous array's bytes, or of a tensor's bytes (any dtype, moved to the CPU)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    elif isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return zlib.crc32(data)


def tensor_entry(tensor: torch.Tensor) -> dict:
    """What a file records of a tensor it holds: {"dtype", "shape", "crc32"}."""
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "crc32": crc32(tensor)}


def check_tensor(path, name: str, tensor: torch.Tensor, entry: dict | None, rebuild: str) -> None:
    """Raises CorruptArtifactError unless ``tensor`` (as read from ``path``) has the recorded dtype, shape and CRC-32."""
    if entry is None:
        raise CorruptArtifactError(f"{path}: tensor {name!r} has no recorded checksum (the file is corrupt); {rebuild}")
    actual = tensor_entry(tensor)
    if actual != entry:
        what = ", ".join(f"{key} {actual[key]} != {entry.get(key)}" for key in actual if actual[key] != entry.get(key))
        raise CorruptArtifactError(f"{path}: tensor {name!r} does not match what was written ({what}); {rebuild}")


def block_checksums(values: np.ndarray, first_row: int, block_rows: int) -> dict[int, int]:
    """{block: CRC-32} of rows ``first_row`` ... of an array cut in blocks of ``block_rows`` rows (``first_row``
    starts a block; the last block may be shorter)."""
    if first_row % block_rows:
        raise ValueError(f"rows from {first_row} do not start a block of {block_rows} rows")
    first = first_row // block_rows
    return {first + i: crc32(values[start:start + block_rows])
            for i, start in enumerate(range(0, values.shape[0], block_rows))}


class CheckedBlocks:
    """Rows of a memory-mapped (N, ...) array whose blocks of ``block_rows`` rows are each checked against their
    CRC-32 the first time a read touches them (a read of part of a block reads that whole block once).

    Args:
        path: the file (for messages).
        array: the memory map.
        block_rows: rows per block.
        checksums: CRC-32 of each block, in order (``ceil(N / block_rows)`` of them).
        rebuild: the command that rebuilds the file (for messages).
    """

    def __init__(self, path, array: np.ndarray, block_rows: int, checksums: list[int], rebuild: str):
        self.path, self.array, self.block_rows, self.checksums, self.rebuild = path, array, block_rows, checksums, rebuild
        self.checked: set[int] = set()
        blocks = -(-array.shape[0] // block_rows)
        if len(checksums) != blocks:
            raise CorruptArtifactError(f"{path}: {len(checksums)} block checksums recorded for {blocks} blocks of "
                                       f"{block_rows} rows; {rebuild}")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows [start, stop), every block they touch checked."""
        out = np.array(self.array[start:stop])
        size = self.block_rows
        for block in range(start // size, -(-stop // size)):
            if block in self.checked:
                continue
            first, last = block * size, min((block + 1) * size, self.array.shape[0])
            data = out[first - start:last - start] if start <= first and last <= stop else self.array[first:last]
            if crc32(data) != self.checksums[block]:
                raise CorruptArtifactError(f"{self.path}: rows {first}-{last - 1} do not match the checksum written "
                                           f"with them (block {block}); {self.rebuild}")
            self.checked.add(block)
        return out


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seal(obj: dict) -> dict:
    """``obj`` with the CRC-32 of its canonical JSON under ``SEAL_KEY`` (``unseal`` checks it)."""
    return {**obj, SEAL_KEY: crc32(_canonical(obj))}


def unseal(obj, path, rebuild: str, error: type[CorruptArtifactError] = CorruptArtifactError) -> dict:
    """The content of a header written by ``seal``, after checking its CRC-32.

    Raises:
        error: ``obj`` is not a dict, carries no checksum, or its content differs from what was sealed.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get(SEAL_KEY), int):
        raise error(f"{path} carries no checksum ({SEAL_KEY!r}): it is corrupt or was not written by lorif-ray; {rebuild}")
    body = {key: value for key, value in obj.items() if key != SEAL_KEY}
    if crc32(_canonical(body)) != obj[SEAL_KEY]:
        raise error(f"{path} does not match the checksum written with it (corrupt); {rebuild}")
    return body


def read_sealed_json(path, version: int, rebuild: str, *, older: str = "", unversioned: int | None = 1,
                     error: type[CorruptArtifactError] = CorruptArtifactError) -> dict:
    """The content of a sealed JSON header of format ``version`` (``_manifest.json``, ``_curvature.json``, g'_t's
    ``_meta.json``), checked: readable, of this format, and matching its checksum.

    Args:
        older: what an older format lacked, for the refusal (e.g. " (before checksums)").
        unversioned: the format of a header with neither a version nor a seal (1: those made before headers had
            versions); None: such a header is corrupt (one whose every format records its version).

    Raises:
        error: unreadable JSON, or content that differs from what was sealed (``unseal``).
        IndexMismatchError: another format version (a header without one, nor a seal, is format 1).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"unreadable {path}: {e}; {rebuild}") from e
    found = data.get("format_version", unversioned if SEAL_KEY not in data else None) if isinstance(data, dict) else None
    if isinstance(found, int) and found != version:
        raise IndexMismatchError(f"{path} has format version {found}{older if found < version else ''}; this "
                                 f"lorif-ray reads format {version}: {rebuild}")
    return unseal(data, path, rebuild, error=error)


def parquet_footer_sha256(path) -> str:
    """Hex SHA-256 of a Parquet file's footer (its FileMetaData, length and magic: the last bytes of the file).

    Raises:
        ValueError: the file does not end like a Parquet file.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 12:
            raise ValueError(f"{size} bytes is too short for a Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != PARQUET_MAGIC or length > size - 12:
            raise ValueError("the file does not end with a Parquet footer")
        f.seek(size - 8 - length)
        footer = f.read(length)
    return hashlib.sha256(footer + tail).hexdigest()


def check_parquet_footer(path, expected: str, rebuild: str, error: type[CorruptArtifactError] = CorruptArtifactError
                         ) -> None:
    """Raises ``error`` unless the footer of the Parquet file at ``path`` has the SHA-256 recorded for it."""
    try:
        actual = parquet_footer_sha256(path)
    except ValueError as e:
        raise error(f"cannot read the footer of {path} (corrupt): {e}; {rebuild}") from e
    if actual != expected:
        raise error(f"the footer of {path} (schema, page offsets, row counts, metadata) has SHA-256 {actual}; "
                    f"its record says {expected} (corrupt); {rebuild}")


def counted_batches(path, batches: Iterable[pa.RecordBatch], rows: int, rebuild: str,
                    error: type[CorruptArtifactError] = CorruptArtifactError) -> Iterator[pa.RecordBatch]:
    """The batches of a file, each validated (every column as long as the batch, every list's values where its
    offsets say), and their total rows checked against ``rows`` (its record's): more rows fail before they are
    handed out, fewer at the end."""
    seen = 0
    for batch in batches:
        try:
            batch.validate()
        except pa.ArrowException as e:
            raise error(f"{path} decoded to inconsistent columns (corrupt): {e}; {rebuild}") from e
        seen += batch.num_rows
        if seen > rows:
            raise error(f"{path} decoded to more than the {rows} rows its record says (corrupt); {rebuild}")
        yield batch
    if seen != rows:
        raise error(f"{path} decoded to {seen} rows; its record says {rows} (a corrupt page header drops values "
                    f"that no page checksum covers); {rebuild}")


def contained(folder, name, *, source: str) -> Path:
    """``folder / name``, after checking that it resolves inside ``folder`` (symlinks followed).

    Args:
        folder: the artifact's folder (itself resolved first: a folder that is a symlink is fine).
        name: a relative path read from a manifest, record, header or meta.
        source: where ``name`` was read, for the message (e.g. "the record of shard 3 in .../_manifest.json").

    Raises:
        UnsafePathError: ``name`` is absolute, climbs out with "..", or is (or passes through) a symlink that
            leads out of ``folder``.
    """
    folder = Path(folder)
    path = folder / name
    try:
        root, resolved = folder.resolve(), path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise UnsafePathError(f"{source} names {str(name)!r}, which cannot be resolved inside {folder}: {e}") from e
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafePathError(f"{source} names {str(name)!r}, which resolves to {resolved}, outside {root}: a path "
                              "taken from an artifact must stay inside its folder (no '..', absolute path or symlink "
                              "out of it); remove that entry or rebuild the artifact")
    return path
