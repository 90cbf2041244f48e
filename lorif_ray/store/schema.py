"""Arrow layout of a shard, the names of its columns, and tensor <-> Arrow conversion.

A shard row is one example: `example_id` (string) then one fixed-width list of floats per stored
block. The columns of an index of ``kind``: ``<layer>.u`` and ``<layer>.v`` (a layer's rank-c factors,
row-major (d, c) flattened) of a "factors" store, ``<layer>.g`` (dense vec(G̃)) of a "dense" one, and
``hidden`` of a "hidden" (RepSim) one. This module alone spells those names: everything else asks
``layer_columns``, ``factor_columns``, ``dense_column`` or ``store_columns``.

Values are float32, float16 or bfloat16. Arrow and Parquet have no bfloat16, so a bfloat16 column holds
the raw bits as uint16 (a reader decodes it as `float32(bits << 16)`); every value column names its dtype
in field metadata (`lorif.dtype`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lorif_ray.errors import ConfigError

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
ID_COLUMN = "example_id"
DTYPE_KEY = b"lorif.dtype"
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}

_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
TORCH_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HIDDEN_COLUMN = "hidden"  # the one column of a "hidden" store: last-layer hidden states (RepSim)


def factor_columns(layer: str) -> tuple[str, str]:
    """The columns of a layer's left and right factors u, v in a "factors" store."""
    return f"{layer}.u", f"{layer}.v"


def dense_column(layer: str) -> str:
    """The column of a layer's dense rows vec(G̃) in a "dense" store."""
    return f"{layer}.g"


def layer_columns(kind: str, layer: str) -> list[str]:
    """The columns of one layer in a store of ``kind``: [u, v] ("factors") or [g] ("dense")."""
    if kind == "factors":
        return list(factor_columns(layer))
    if kind == "dense":
        return [dense_column(layer)]
    raise ValueError(f"a {kind!r} store has no per-layer columns")


def store_columns(kind: str, specs, hidden_size: int | None = None) -> dict[str, int]:
    """{column: values per example} of a store of ``kind``, in storage order.

    Args:
        specs: the layers, objects with ``name``, ``d1``, ``d2``, ``c`` (``LayerSpec``); factors take d·c
            values each, dense rows D = d1·d2.
        hidden_size: H, the width of a "hidden" store's one column.
    """
    if kind == "hidden":
        return {HIDDEN_COLUMN: hidden_size}
    if kind == "dense":
        return {dense_column(s.name): s.d1 * s.d2 for s in specs}
    return {column: width for s in specs for column, width in zip(factor_columns(s.name), (s.d1 * s.c, s.d2 * s.c))}


def check_dtype(dtype: str) -> None:
    """Raises ConfigError unless `dtype` is one of STORAGE_DTYPES."""
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage dtype {dtype!r} is not one of {STORAGE_DTYPES}")


def check_columns(columns: dict[str, int]) -> None:
    """Raises ConfigError for an empty or reserved column name or a width that is not a positive int."""
    for name, width in columns.items():
        if not isinstance(name, str) or not name or name == ID_COLUMN:
            raise ConfigError(f"invalid column name {name!r} (non-empty, not {ID_COLUMN!r})")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"column {name!r}: width must be a positive int, got {width!r}")


def list_type(dtype: str, width: int) -> pa.FixedSizeListType:
    """The Arrow type of one value column: `width` non-null values of the storage type of `dtype`."""
    check_dtype(dtype)
    return pa.list_(pa.field("element", _ARROW_TYPES[dtype], nullable=False), width)


def arrow_schema(columns: dict[str, int], dtype: str) -> pa.Schema:
    """Schema of a shard.

    Args:
        columns: column name -> floats per row, in storage order.
        dtype: one of STORAGE_DTYPES.

    Returns:
        `example_id` (string, not null), then one FixedSizeList field per column, not null, with
        `{"lorif.dtype": dtype}` field metadata.
    """
    check_dtype(dtype)
    check_columns(columns)
    fields = [pa.field(ID_COLUMN, pa.string(), nullable=False)]
    fields += [
        pa.field(name, list_type(dtype, width), nullable=False, metadata={DTYPE_KEY: dtype})
        for name, width in columns.items()
    ]
    return pa.schema(fields)


def tensor_to_arrow(t: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """Converts rows of floats to a FixedSizeList column in storage dtype.

    Args:
        t: (n, width) tensor of any float dtype and device; rounded to `dtype` here.
        dtype: one of STORAGE_DTYPES.

    Returns:
        (n,) FixedSizeListArray of `width` values each. No copy beyond the dtype/device conversion.
    """
    check_dtype(dtype)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D (n, width) tensor, got shape {tuple(t.shape)}")
    width = t.shape[1]
    t = t.detach().to(device="cpu", dtype=TORCH_STORAGE_DTYPES[dtype]).contiguous()  # (n, width)
    values = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    flat = pa.array(values.reshape(-1), type=_ARROW_TYPES[dtype])  # (n * width,)
    return pa.FixedSizeListArray.from_arrays(flat, type=list_type(dtype, width))


def arrow_to_tensor(
    arr: pa.FixedSizeListArray | pa.ChunkedArray,
    dtype: str,
    out_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Converts a FixedSizeList column in storage dtype back to a tensor.

    Args:
        arr: (n,) lists of `width` values, as written by `tensor_to_arrow`.
        dtype: the storage dtype of `arr` (one of STORAGE_DTYPES).
        out_dtype: dtype of the result.
        device: device of the result.

    Returns:
        (n, width) tensor. Zero-copy (DLPack) when `out_dtype` is the storage dtype on CPU; the tensor
        then shares memory with `arr`.
    """
    check_dtype(dtype)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.value_type != _ARROW_TYPES[dtype]:
        raise ValueError(f"expected fixed-size lists of {_ARROW_TYPES[dtype]} for {dtype}, got {arr.type}")
    width = arr.type.list_size
    flat = torch.from_dlpack(arr.flatten())  # (n * width,), shares memory with arr
    if dtype == "bfloat16":
        flat = flat.view(torch.bfloat16)  # uint16 bits -> bfloat16
    return flat.view(-1, width).to(device=device, dtype=out_dtype)
