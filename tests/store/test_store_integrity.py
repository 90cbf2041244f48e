"""Integrity of shards: page checksums on read, SHA-256 on resume, read-only reuse, stale temporaries."""

import json

import pyarrow.parquet as pq
import pytest
from store_helpers import COLUMNS, DEFAULT_META, make_rows, reopen, write_index

from lorif_ray.errors import CorruptShardError, IndexMismatchError
from lorif_ray.store import IndexFolder, remove_stale_temporaries, shard_file_name
from lorif_ray.store.manifest import MANIFEST_NAME

LAYOUT = dict(kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta=DEFAULT_META)


def _flip(path, at=0.5, count=16):
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_shards_carry_page_checksums(index_dir):
    """Every data page of a shard has a CRC; a page with a flipped byte is refused while reading."""
    parquet = pq.ParquetFile(index_dir / shard_file_name(0), page_checksum_verification=True)
    assert parquet.read().num_rows == 4
    _flip(index_dir / shard_file_name(1))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.parquet.*jobs/index\.py"):
        list(IndexFolder(index_dir).batches())


def test_is_done_checks_the_sha256_and_a_rewrite_replaces_the_record(index_dir):
    _flip(index_dir / shard_file_name(1))
    writer = reopen(index_dir)
    assert [writer.is_done(i) for i in range(3)] == [True, False, True]
    ids, arrays = make_rows(10)
    writer.write_shard(1, ids[4:8], {c: a[4:8] for c, a in arrays.items()})
    assert [writer.is_done(i) for i in range(3)] == [True, True, True]
    writer.finalize(10)
    assert [i for i, _ in IndexFolder(index_dir).batches(batch_rows=4)][1] == ids[4:8]


def test_finished_index_reads_only_and_needs_every_shard_intact(index_dir):
    (index_dir / ".manifest.lock").unlink()
    manifest = IndexFolder(index_dir).finished(num_rows=10, **LAYOUT)
    assert manifest is not None and manifest.complete
    assert not (index_dir / ".manifest.lock").exists()
    assert IndexFolder(index_dir).finished(num_rows=11, **LAYOUT) is None  # more data: work left
    assert IndexFolder(index_dir).finished(num_rows=10, **{**LAYOUT, "meta": {"seed": 1, "f": 4}}) is None
    _flip(index_dir / shard_file_name(2), at=0.3)
    assert IndexFolder(index_dir).finished(num_rows=10, **LAYOUT) is None


def test_mismatch_names_the_nested_meta_key(tmp_path):
    meta = {"model": {"class": "GPT2", "weights_fingerprint": "a" * 64}, "seed": 0}
    write_index(tmp_path / "index", num_rows=4, shard_size=4, meta=meta)
    other = {"model": {"class": "GPT2", "weights_fingerprint": "b" * 64}, "seed": 0}
    with pytest.raises(IndexMismatchError, match=r"meta\.model\.weights_fingerprint: a+ != b+"):
        write_index(tmp_path / "index", num_rows=4, shard_size=4, meta=other)


def test_stale_temporaries_are_hidden_from_readers_and_removed(index_dir):
    stale = [index_dir / ".shard-00003.parquet.tmp-0123456789ab", index_dir / "shard-00004.parquet.tmp-0123456789ab"]
    for path in stale:
        path.write_bytes(b"PAR1")
    assert remove_stale_temporaries(index_dir) == sorted(stale)
    assert json.loads((index_dir / MANIFEST_NAME).read_text())["complete"]
    assert pq.read_table(index_dir).num_rows == 10
