"""Cases 1 and 2 of issue 12: bytes flipped inside a committed shard are found by every reader and by a re-run."""

from __future__ import annotations

import json

import pytest

from lorif_ray.errors import CorruptShardError
from lorif_ray.store import IndexFolder
from lorif_ray.store.manifest import MANIFEST_NAME
from tests.reliability.conftest import flip_bytes


def test_flipped_bytes_fail_the_read_instead_of_wrong_scores(run_copy):
    """Case 1: 16 bytes flipped in the middle of a shard. The query paths open the index without hashing
    it and stream it with `iter_batches`; that reader now stops at the shard with a CorruptShardError
    naming it and the repair, instead of decoding wrong values."""
    shard = run_copy.index_path / "shard-00002.parquet"
    flip_bytes(shard)
    manifest = IndexFolder(run_copy.index_path).manifest()  # sizes unchanged: the cheap check passes, as before
    read = []
    with pytest.raises(CorruptShardError, match=r"shard-00002\.parquet.*re-run stage 1"):
        for ids, _ in IndexFolder(run_copy.index_path).batches(manifest=manifest, batch_rows=4):
            read.extend(ids)
    assert len(read) <= 2 * 10 + 8  # stopped inside shard 2, before its values were all handed out


@pytest.mark.parametrize("at", [0.0, 0.5, 0.97], ids=["header", "pages", "footer"])
def test_corruption_anywhere_in_the_file_is_a_corrupt_shard_error(run_copy, at):
    """Where page checksums do not reach (magic bytes, footer), the read itself fails: same error."""
    flip_bytes(run_copy.index_path / "shard-00001.parquet", at=at)
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet"):
        for _ in IndexFolder(run_copy.index_path).batches():
            pass


def test_rerun_recomputes_a_corrupt_shard(run_copy):
    """Case 2: the re-run of stage 1 recomputes the corrupt shard (not "0 computed, 5 reused") and
    replaces its record; the index then reads back exactly as before the corruption."""
    from lorif_ray.stages.index import run_index

    before = list(IndexFolder(run_copy.index_path).batches())
    records = json.loads((run_copy.index_path / MANIFEST_NAME).read_text())["shards"]
    shard = run_copy.index_path / "shard-00003.parquet"
    flip_bytes(shard)
    report = run_index(run_copy)
    assert report["computed"] == 10 and report["skipped_shards"] == 4
    after = list(IndexFolder(run_copy.index_path).batches())
    assert [ids for ids, _ in after] == [ids for ids, _ in before]
    for (_, old), (_, new) in zip(before, after):
        assert all(old[c].equal(new[c]) for c in old)
    manifest = IndexFolder(run_copy.index_path).manifest(verify=True)
    assert [(s.index, s.sha256) for s in manifest.shards] == [(r["index"], r["sha256"]) for r in records]
