"""Atomic files with the config that made them."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.errors import CorruptArtifactError, CorruptShardError, IndexMismatchError, IndexNotFoundError
from lorif_ray.store import (
    atomic_path,
    file_sha256,
    load_tensors,
    read_table_meta,
    save_tensors,
    write_json,
    write_table,
)


def test_tensors_round_trip_with_meta(tmp_path):
    tensors = {"V": torch.randn(10, 3), "sigma": torch.rand(3, dtype=torch.float64)}
    meta = {"r": 3, "layers": ["h.0.attn"], "lambda": 0.1}
    digest = save_tensors(tmp_path / "curv.safetensors", tensors, meta)
    assert digest == file_sha256(tmp_path / "curv.safetensors")
    loaded, loaded_meta = load_tensors(tmp_path / "curv.safetensors")
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["curv.safetensors"]


def test_load_tensors_errors(tmp_path):
    with pytest.raises(IndexNotFoundError, match="missing.safetensors"):
        load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CorruptArtifactError, match="bad.safetensors.*re-run it"):
        load_tensors(tmp_path / "bad.safetensors", rebuild="re-run it")


def test_every_tensor_read_is_checked_against_its_checksum(tmp_path):
    """A flipped bit in a tensor's bytes is found when (and only when) that tensor is read."""
    path = tmp_path / "curv.safetensors"
    save_tensors(path, {"values": torch.arange(4.0), "vectors": torch.ones(8, 4)}, {"r": 4})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # the last tensor in the file: "vectors" (names are stored sorted)
    path.write_bytes(bytes(data))
    assert torch.equal(load_tensors(path, names=lambda name: name == "values")[0]["values"], torch.arange(4.0))
    with pytest.raises(CorruptArtifactError, match=r"curv\.safetensors: tensor 'vectors'.*crc32.*stage 2"):
        load_tensors(path, rebuild="re-run stage 2")


def test_a_tensor_file_without_checksums_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"values": torch.ones(3)}, tmp_path / "old.safetensors", metadata={"lorif.meta": "{}"})
    with pytest.raises(IndexMismatchError, match="older lorif-ray .*without checksums.*re-run stage 2"):
        load_tensors(tmp_path / "old.safetensors", rebuild="re-run stage 2")


def test_table_with_meta(tmp_path):
    table = pa.table({"query": ["q0", "q1"], "score": [1.5, -2.0]}).replace_schema_metadata({"other": "kept"})
    write_table(tmp_path / "scores.parquet", table, {"method": "lorif", "c": 1})
    assert read_table_meta(tmp_path / "scores.parquet") == {"method": "lorif", "c": 1}
    read = pq.read_table(tmp_path / "scores.parquet")
    assert read.column("score").to_pylist() == [1.5, -2.0] and read.schema.metadata[b"other"] == b"kept"
    with pytest.raises(IndexNotFoundError):
        read_table_meta(tmp_path / "missing.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(CorruptShardError, match="bad.parquet"):
        read_table_meta(tmp_path / "bad.parquet")


def test_crash_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "partial')
            raise RuntimeError("simulated crash")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("simulated crash")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
