"""Where the bytes of each artifact are: byte ranges of the regions of a Parquet shard, a safetensors file and
a .npy file (read from the files themselves, with a few lines of Thrift compact-protocol parsing), and a
single-bit flip that puts the file back afterwards."""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip(data: bytes, pos: int, kind: int) -> int:
    """Skip one Thrift compact value of type ``kind`` starting at ``pos``."""
    if kind in (1, 2):  # bool, inline in the field header
        return pos
    if kind == 3:  # byte
        return pos + 1
    if kind in (4, 5, 6):  # i16, i32, i64: zigzag varints
        return _varint(data, pos)[1]
    if kind == 7:  # double
        return pos + 8
    if kind == 8:  # binary
        size, pos = _varint(data, pos)
        return pos + size
    if kind in (9, 10):  # list, set
        head = data[pos]
        pos += 1
        count, element = head >> 4, head & 0x0F
        if count == 15:
            count, pos = _varint(data, pos)
        for _ in range(count):
            pos = _skip(data, pos, element)
        return pos
    if kind == 12:  # struct
        return _struct(data, pos)[1]
    raise ValueError(f"Thrift type {kind} at {pos}")


def _struct(data: bytes, pos: int) -> tuple[dict[int, int], int]:
    """({field id: value} of the struct's integer fields, end position)."""
    fields, last = {}, 0
    while True:
        head = data[pos]
        pos += 1
        if head == 0:
            return fields, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            field = last + delta
        else:
            zigzag, pos = _varint(data, pos)
            field = (zigzag >> 1) ^ -(zigzag & 1)
        last = field
        if kind in (5, 6):
            zigzag, pos = _varint(data, pos)
            fields[field] = (zigzag >> 1) ^ -(zigzag & 1)
        else:
            pos = _skip(data, pos, kind)


def parquet_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """{region: [(start, stop), ...]} of a Parquet file: "magic" (leading PAR1), "page headers", "pages" (page
    data, covered by the page CRCs), "footer" (FileMetaData), "tail" (footer length + PAR1)."""
    data = path.read_bytes()
    metadata = pq.ParquetFile(path).metadata
    headers, pages = [], []
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            pos, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
            while pos < end:
                fields, header_end = _struct(data, pos)
                headers.append((pos, header_end))
                pages.append((header_end, header_end + fields[3]))  # field 3: compressed_page_size
                pos = header_end + fields[3]
    footer_length = struct.unpack("<I", data[-8:-4])[0]
    footer = len(data) - 8 - footer_length
    return {"magic": [(0, 4)], "page headers": headers, "pages": pages, "footer": [(footer, len(data) - 8)],
            "tail": [(len(data) - 8, len(data))]}


def safetensors_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """{region: ranges} of a safetensors file: "length" (8 bytes), "header" (JSON: names, dtypes, shapes,
    offsets, metadata with the checksums), "tensors" (each tensor's bytes)."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    tensors = [(8 + length + start, 8 + length + stop) for name, entry in header.items() if name != "__metadata__"
               for start, stop in [entry["data_offsets"]] if stop > start]
    return {"length": [(0, 8)], "header": [(8, 8 + length)], "tensors": tensors}


def npy_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """{region: ranges} of a .npy file: "preamble" (magic, version, header length), "header" (the dict), "rows"."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(f)  # moves to the data offset
        offset = f.tell()
    preamble = 8 + (2 if version == (1, 0) else 4)
    return {"preamble": [(0, preamble)], "header": [(preamble, offset)], "rows": [(offset, path.stat().st_size)]}


@contextmanager
def flipped(path: Path, byte: int, bit: int):
    """The file with bit ``bit`` of byte ``byte`` inverted, for the body; then the original bytes again."""
    original = path.read_bytes()
    data = bytearray(original)
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)
