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


def test_commits_append_to_a_log_folded_in_at_finalize(tmp_path):
    """Each committed shard appends one line to _shards.jsonl (the manifest is not rewritten per shard);
    loading merges it, a torn last line is skipped (that shard is redone), finalize folds it in."""
    import torch

    from lorif_ray.store import ShardWriter
    from lorif_ray.store.manifest import MANIFEST_NAME, SHARD_LOG_NAME, Manifest

    writer = ShardWriter(tmp_path, kind="factors", columns={"a.u": 2}, dtype="float32", shard_size=2, meta={})
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    for shard in range(3):
        writer.write_shard(shard, [f"x{2 * shard}", f"x{2 * shard + 1}"], {"a.u": torch.ones(2, 2)})
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before  # untouched while shards are committed
    assert len((tmp_path / SHARD_LOG_NAME).read_text().splitlines()) == 3
    assert [r.index for r in Manifest.load(tmp_path).shards] == [0, 1, 2]
    with open(tmp_path / SHARD_LOG_NAME, "a") as log:
        log.write('{"index": 3, "file": "shard-0')  # a crash mid-append
    again = ShardWriter(tmp_path, kind="factors", columns={"a.u": 2}, dtype="float32", shard_size=2, meta={})
    assert again.is_done(2) and not again.is_done(3) and again.manifest.record(1).rows == 2
    again.write_shard(2, ["x4", "x5"], {"a.u": torch.zeros(2, 2)})  # a re-run after the torn line
    assert [r.index for r in Manifest.load(tmp_path).shards] == [0, 1, 2]
    manifest = again.finalize(6)
    assert manifest.complete and not (tmp_path / SHARD_LOG_NAME).exists()
    assert [r.index for r in Manifest.load(tmp_path).shards] == [0, 1, 2]
