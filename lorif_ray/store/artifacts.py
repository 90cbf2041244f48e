"""Small results (curvature, scores, reports) saved like shards: atomically, with the config that made them.

Every file is written to a temporary name in its directory (locked by its writer until the rename, so
``remove_stale_temporaries`` only removes what a killed writer left), fsynced and renamed, so a reader never
sees a partial file. The config goes inside the file: safetensors metadata or Parquet schema metadata under
the key `lorif.meta` (JSON). A safetensors file also records each tensor's CRC-32, dtype and shape and the
CRC-32 of its meta (``lorif.checksums``), checked whenever the tensor is read. A write that finds the disk
full is a ``StorageFullError`` (an OSError) naming the file and, where known, the bytes it needed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorif_ray.errors import (CorruptArtifactError, CorruptShardError, IndexMismatchError, IndexNotFoundError, LorifError,
                              StorageFullError)
from lorif_ray.store.integrity import check_tensor, crc32, tensor_entry

logger = logging.getLogger(__name__)

META_KEY = "lorif.meta"
CHECKSUMS_KEY = "lorif.checksums"  # {tensor: {dtype, shape, crc32}, "lorif.meta": crc32} of a safetensors file
TENSOR_FORMAT_KEY = "lorif.format_version"
TENSOR_FORMAT_VERSION = 2  # 1 (no key): before checksums
TEMPORARY_INFIX = ".tmp-"  # temporary files are named `.<name>.tmp-<hex>` (see temporary_path)
# every temporary name this package has used: `.<name>.tmp-<hex>`, and `<name>.tmp-<hex>` of older writers
_TEMPORARY = re.compile(r".+\.tmp-[0-9a-f]{12}")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success moves it to `path`.

    The temporary file is created and locked (``flock``) until it is renamed, so ``remove_stale_temporaries``
    leaves it alone; it is fsynced, renamed over `path` (`os.replace`) and the directory fsynced. If the
    body raises, the temporary file is removed and `path` is left as it was.

    Args:
        needed_bytes: about how many bytes the file takes, for the message of a full disk.

    Raises:
        StorageFullError: the disk (or a quota or file-size limit) is full: names `path` and the bytes.

    Example:
        >>> with atomic_path(out / "scores.parquet") as tmp:
        ...     pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until renamed: remove_stale_temporaries skips it
        yield tmp
        replace_durably(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = storage_error(path, error, needed_bytes)
        if full is not None:
            raise full from error
        raise
    finally:
        os.close(fd)


def storage_error(path: str | os.PathLike, error: BaseException, needed_bytes: int | None = None
                  ) -> StorageFullError | None:
    """A ``StorageFullError`` naming `path`, the bytes needed (if known) and free, if `error` is a full disk,
    quota or file-size limit (an OSError, or a safetensors error that wraps one); else None."""
    code = error.errno if isinstance(error, OSError) else None
    if isinstance(error, StorageFullError):
        return None  # already named
    if code is None and type(error).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code not in _SPACE_ERRNOS:
        return None
    parent = Path(path).parent
    free = shutil.disk_usage(parent).free if parent.is_dir() else 0
    needed = f"about {needed_bytes} bytes needed, " if needed_bytes is not None else ""
    return StorageFullError(code, f"cannot write {path}: {os.strerror(code)} ({needed}{free} bytes free on that "
                                  "filesystem); free space (or choose another output_dir / index_dir) and re-run: "
                                  "finished work is kept")


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to `path` (its directory is created), e.g. `.shard-00007.parquet.tmp-<hex>`.

    The leading "." makes dataset readers (pyarrow.dataset, pandas, duckdb globs of `*.parquet`) skip a
    temporary file that a killed writer left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}{TEMPORARY_INFIX}{uuid.uuid4().hex[:12]}")


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync `tmp`, rename it over `path` and fsync the directory: `path` is then whole or untouched."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    with atomic_path(path, needed_bytes=len(text)) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Saves named tensors to a safetensors file, atomically, with `meta` as JSON under `lorif.meta` and the
    CRC-32, dtype and shape of every tensor (and the CRC-32 of the meta) under `lorif.checksums`.

    Args:
        path: destination file.
        tensors: name -> tensor of any shape (moved to CPU; must not share memory with each other).
        meta: JSON-serializable config that made the tensors.

    Returns:
        Hex SHA-256 of the written file.

    Raises:
        StorageFullError: the disk is full (names the file and the bytes needed).
    """
    meta_text = json.dumps(meta)
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    checksums = {name: tensor_entry(t) for name, t in cpu.items()}
    checksums[META_KEY] = crc32(meta_text.encode())
    header = {META_KEY: meta_text, CHECKSUMS_KEY: json.dumps(checksums),
              TENSOR_FORMAT_KEY: str(TENSOR_FORMAT_VERSION)}
    needed = sum(t.numel() * t.element_size() for t in cpu.values()) + len(json.dumps(header)) + 1024
    with atomic_path(path, needed_bytes=needed) as tmp:
        save_file(cpu, tmp, metadata=header)
        digest = file_sha256(tmp)
    return digest


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                 names: Callable[[str], bool] | None = None, *, rebuild: str = "rebuild it"
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Loads a file written by `save_tensors` (only the tensors whose name `names` accepts, if given:
    the others are never read), checking each tensor read and the meta against the checksums written with
    them.

    Args:
        rebuild: the command that rebuilds this file, for the messages.

    Returns:
        (name -> tensor on `device`, meta dict).

    Raises:
        IndexNotFoundError: no file at `path`.
        CorruptArtifactError: the file is not readable safetensors, a tensor read or the meta does not match
            its checksum, or the checksums are missing.
        IndexMismatchError: the file was written by an older lorif-ray (no checksums) or a newer one.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexNotFoundError(f"no tensor file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            check_tensor_header(path, header, rebuild)
            checksums = json.loads(header[CHECKSUMS_KEY])
            stored = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in stored if names is None or names(name)}
        meta_text = header.get(META_KEY, "{}")
        if not isinstance(checksums, dict) or crc32(meta_text.encode()) != checksums.get(META_KEY):
            raise CorruptArtifactError(f"{path}: its meta does not match the checksum written with it; {rebuild}")
        meta = json.loads(meta_text)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, LorifError):
            raise
        raise CorruptArtifactError(f"cannot read tensor file {path} (corrupt): {e}; {rebuild}") from e
    if stored != set(checksums) - {META_KEY}:
        raise CorruptArtifactError(f"{path} holds tensors {sorted(stored)}; its checksums name "
                                   f"{sorted(set(checksums) - {META_KEY})} (corrupt); {rebuild}")
    for name, tensor in tensors.items():
        check_tensor(path, name, tensor, checksums.get(name), rebuild)
    return {name: t.to(device) for name, t in tensors.items()}, meta


def check_tensor_header(path: Path, header: dict, rebuild: str) -> None:
    """Raises IndexMismatchError for a tensor file of another format version, CorruptArtifactError for one
    whose checksums are missing."""
    version = header.get(TENSOR_FORMAT_KEY)
    if version is None and CHECKSUMS_KEY not in header:
        raise IndexMismatchError(f"{path} was written by an older lorif-ray (tensor format 1, without checksums); "
                                 f"this one reads format {TENSOR_FORMAT_VERSION}: {rebuild}")
    if version != str(TENSOR_FORMAT_VERSION) or CHECKSUMS_KEY not in header:
        raise CorruptArtifactError(f"{path} has tensor format {version!r} and checksums "
                                   f"{'present' if CHECKSUMS_KEY in header else 'missing'}; this lorif-ray writes "
                                   f"format {TENSOR_FORMAT_VERSION} with checksums (corrupt or newer): {rebuild}")


def write_table(path: str | os.PathLike, table: pa.Table, meta: dict) -> str:
    """Writes a Parquet file, atomically, with `meta` as JSON under the schema metadata key `lorif.meta`.

    Returns:
        Hex SHA-256 of the written file.
    """
    return write_tables(path, table.schema, [table], meta)


def write_tables(path: str | os.PathLike, schema: pa.Schema, tables: Iterable[pa.Table], meta: dict) -> str:
    """``write_table`` of tables of one ``schema`` written one after another (a file larger than memory)."""
    schema = schema.with_metadata({**(schema.metadata or {}), META_KEY.encode(): json.dumps(meta).encode()})
    with atomic_path(path) as tmp:  # streamed: the bytes needed are not known in advance
        # a CRC-32 per page, checked by readers that ask (QueryRun does), as the shards' are
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_page_checksum=True) as writer:
            for table in tables:
                writer.write_table(table.replace_schema_metadata(schema.metadata))
        digest = file_sha256(tmp)
    return digest


def read_table_meta(path: str | os.PathLike) -> dict:
    """The `lorif.meta` dict of a Parquet file ({} if it has none), read from the footer only.

    Raises:
        IndexNotFoundError: no file at `path`.
        CorruptShardError: not a readable Parquet file, or its meta is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexNotFoundError(f"no Parquet file at {path}")
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata.get(META_KEY.encode(), b"{}"))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptShardError(f"cannot read Parquet metadata of {path}: {e}") from e


def preallocated_memmap(path: str | os.PathLike, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new `.npy` file of `shape` and `dtype` at `path`, its blocks allocated on disk, memory-mapped r+.

    `np.lib.format.open_memmap(mode="w+")` makes a sparse file: on a full disk the first write to an
    unallocated page kills the process with SIGBUS. Here every block is reserved first
    (`os.posix_fallocate`, or zeros written where the filesystem cannot), so a full disk is an OSError
    before any work, and writes through the map never fail.

    Args:
        path: the file to create (replaced if it exists); e.g. a `temporary_path` renamed when whole.
        dtype: numpy dtype of the values.
        shape: array shape, e.g. (queries, training examples).

    Returns:
        The writable map (contents zero).

    Raises:
        OSError: ENOSPC (or another errno) with the path, the bytes needed and the bytes free; the
            file is removed.

    Example:
        >>> scores = preallocated_memmap(out / "scores.npy", np.float32, (nq, n))
        >>> scores[:, :1024] = block; scores.flush()
    """
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    total = header.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        with open(path, "wb") as f:
            f.write(header.getvalue())
            f.flush()
            _allocate(f, total)
    except OSError as e:
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        raise (StorageFullError if e.errno in _SPACE_ERRNOS else OSError)(
            e.errno or errno.EIO,
            f"cannot allocate {path}: {total} bytes needed ({shape} {np.dtype(dtype).name}), {free} bytes free "
            f"on that filesystem ({e.strerror or e}); free space or choose another output_dir",
        ) from e
    return np.lib.format.open_memmap(path, mode="r+")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that killed writers left in `directory`; returns them.

    Every naming this package has used counts (`.<name>.tmp-<hex>`, and `<name>.tmp-<hex>` of older writers,
    which dataset readers do not skip). A live writer holds an exclusive lock on its temporary file until it
    renames it (``atomic_path``), so only files nobody holds are removed.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
        if not _TEMPORARY.fullmatch(path.name) or not path.is_file() or path.is_symlink():
            continue
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue  # being written, or just renamed
        removed.append(path)
    if removed:
        names = [p.name for p in removed]
        logger.info("removed %d stale temporary files in %s: %s", len(removed), directory,
                    names if len(names) <= 20 else f"{names[:20]} ... ({len(names)} in all)")
    return removed


def _allocate(f, total: int) -> None:
    """Reserve `total` bytes of the open file `f` on disk (its size becomes `total`)."""
    try:
        os.posix_fallocate(f.fileno(), 0, total)
        return
    except AttributeError:  # no posix_fallocate (macOS)
        pass
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    chunk = bytes(16 << 20)  # the filesystem cannot reserve: write zeros (allocates every block)
    f.seek(0, os.SEEK_END)
    position = f.tell()
    while position < total:
        position += f.write(chunk[: min(len(chunk), total - position)])
    f.flush()
    os.fsync(f.fileno())
