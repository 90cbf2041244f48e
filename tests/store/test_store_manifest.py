"""Manifest save/load."""

import pytest

from lorif_ray.errors import CorruptShardError, IndexMismatchError, IndexNotFoundError
from lorif_ray.store import Manifest, ShardRecord


def make_manifest():
    return Manifest(
        kind="factors",
        columns={"u": 64, "v": 128},
        dtype="float16",
        shard_size=1024,
        meta={"model": "gpt2", "layers": ["h.0.attn"]},
        shards=[
            ShardRecord(0, "shard-00000.parquet", 1024, "ab" * 32, 4000),
            ShardRecord(1, "shard-00001.parquet", 7, "cd" * 32, 300),
        ],
    )


def test_save_load_round_trip(tmp_path):
    manifest = make_manifest()
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]
    assert manifest.payload_bytes_per_row() == (64 + 128) * 2
    assert manifest.total_bytes() == 4300


def test_missing_manifest_names_path(tmp_path):
    with pytest.raises(IndexNotFoundError, match="_manifest.json"):
        Manifest.load(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", '{"kind": "factors"}', "[]"])
def test_unreadable_manifest_names_file(tmp_path, text):
    (tmp_path / "_manifest.json").write_text(text)
    with pytest.raises(CorruptShardError, match="_manifest.json"):
        Manifest.load(tmp_path)


def test_newer_format_version(tmp_path):
    manifest = make_manifest()
    manifest.format_version = 99
    manifest.save(tmp_path)
    with pytest.raises(IndexMismatchError, match="format version 99"):
        Manifest.load(tmp_path)
