"""Small results (curvature, scores, reports) saved like shards: atomically, with the config that made them.

Every file is written to a temporary name in its directory, fsynced and renamed, so a reader never sees
a partial file. The config goes inside the file: safetensors metadata or Parquet schema metadata under
the key `lorif.meta` (JSON).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
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

from lorif_ray.errors import CorruptShardError, IndexNotFoundError

META_KEY = "lorif.meta"
TEMPORARY_INFIX = ".tmp-"  # temporary files are named `.<name>.tmp-<hex>` (see temporary_path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success moves it to `path`.

    The temporary file is fsynced, renamed over `path` (`os.replace`) and the directory fsynced. If the
    body raises, the temporary file is removed and `path` is left as it was.

    Example:
        >>> with atomic_path(out / "scores.parquet") as tmp:
        ...     pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Saves named tensors to a safetensors file, atomically, with `meta` as JSON under `lorif.meta`.

    Args:
        path: destination file.
        tensors: name -> tensor of any shape (moved to CPU; must not share memory with each other).
        meta: JSON-serializable config that made the tensors.

    Returns:
        Hex SHA-256 of the written file.
    """
    header = {META_KEY: json.dumps(meta)}
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, tmp, metadata=header)
        digest = file_sha256(tmp)
    return digest


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                 names: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Loads a file written by `save_tensors` (only the tensors whose name `names` accepts, if given:
    the others are never read).

    Returns:
        (name -> tensor on `device`, meta dict; {} if the file has none).

    Raises:
        IndexNotFoundError: no file at `path`.
        CorruptShardError: the file is not readable safetensors or its meta is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexNotFoundError(f"no tensor file at {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys() if names is None or names(name)}
        meta = json.loads(header.get(META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptShardError(f"cannot read tensor file {path}: {e}") from e
    return tensors, meta


def write_table(path: str | os.PathLike, table: pa.Table, meta: dict) -> str:
    """Writes a Parquet file, atomically, with `meta` as JSON under the schema metadata key `lorif.meta`.

    Returns:
        Hex SHA-256 of the written file.
    """
    return write_tables(path, table.schema, [table], meta)


def write_tables(path: str | os.PathLike, schema: pa.Schema, tables: Iterable[pa.Table], meta: dict) -> str:
    """``write_table`` of tables of one ``schema`` written one after another (a file larger than memory)."""
    schema = schema.with_metadata({**(schema.metadata or {}), META_KEY.encode(): json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
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
        raise OSError(
            e.errno or errno.EIO,
            f"cannot allocate {path}: {total} bytes needed ({shape} {np.dtype(dtype).name}), {free} bytes free "
            f"on that filesystem ({e.strerror or e}); free space or choose another output_dir",
        ) from e
    return np.lib.format.open_memmap(path, mode="r+")


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
