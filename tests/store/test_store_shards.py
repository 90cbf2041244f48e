"""Shards: round trip, reading without this package, atomic writes, resume, damaged shards."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from store_helpers import COLUMNS, TORCH_DTYPES, make_rows, reopen, write_index

from lorif_ray.errors import ConfigError, CorruptShardError, IndexMismatchError, IndexNotFoundError, MissingShardError
from lorif_ray.store import IndexFolder, Manifest, ShardWriter, shard_file_name


def read_all(directory, **kwargs):
    """All batches of an index, concatenated: (ids, {column: tensor}, batch sizes)."""
    ids, parts, sizes = [], {}, []
    for batch_ids, tensors in IndexFolder(directory).batches(**kwargs):
        ids += batch_ids
        sizes.append(len(batch_ids))
        for name, t in tensors.items():
            assert t.shape[0] == len(batch_ids)
            parts.setdefault(name, []).append(t)
    return ids, {name: torch.cat(ts) for name, ts in parts.items()}, sizes


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    _, ids, arrays = write_index(tmp_path, num_rows=10, shard_size=4, dtype=dtype)
    read_ids_, tensors, sizes = read_all(tmp_path)
    assert read_ids_ == ids == IndexFolder(tmp_path).ids()
    assert sizes == [4, 4, 2]
    assert list(tensors) == list(COLUMNS)
    for name, t in tensors.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, arrays[name].to(TORCH_DTYPES[dtype]).float())


def test_batch_rows_and_column_subset(index_dir):
    ids, arrays = make_rows(10)
    got_ids, tensors, sizes = read_all(index_dir, columns=["h.0.attn.v"], batch_rows=3)
    assert sizes == [3, 1, 3, 1, 2]  # batches never span shards
    assert got_ids == ids and list(tensors) == ["h.0.attn.v"]
    assert torch.equal(tensors["h.0.attn.v"], arrays["h.0.attn.v"].float())
    assert read_all(index_dir, batch_rows=100)[2] == [4, 4, 2]
    got_ids, tensors, _ = read_all(index_dir, shards=[2, 0], out_dtype=torch.float64)
    assert got_ids == ids[8:] + ids[:4] and tensors["h.0.attn.u"].dtype == torch.float64
    assert IndexFolder(index_dir).ids(shards=[1]) == ids[4:8]


def test_unknown_column_or_shard(index_dir):
    with pytest.raises(ConfigError, match=r"'nope'.*h\.0\.attn\.u"):
        next(IndexFolder(index_dir).batches(["nope"]))
    with pytest.raises(ConfigError, match=r"\[7\]"):
        next(IndexFolder(index_dir).batches(shards=[7]))


def test_readable_with_pyarrow_alone(index_dir):
    files = sorted(str(p) for p in index_dir.glob("shard-*.parquet"))
    table = pq.read_table(files)
    assert table.column_names == ["example_id", *COLUMNS]
    assert table.column("example_id").to_pylist() == make_rows(10)[0]
    assert table.schema.field("h.0.attn.u").type == pa.list_(pa.field("element", pa.float32(), nullable=False), 3)
    assert table.schema.field("h.0.attn.v").metadata == {b"lorif.dtype": b"float32"}
    assert json.loads(table.schema.metadata[b"lorif.meta"]) == {"seed": 0, "f": 4}
    row = table.column("h.0.attn.v")[9].as_py()
    assert row == pytest.approx(make_rows(10)[1]["h.0.attn.v"][9].tolist(), rel=1e-6)


def test_no_temporary_files_remain(index_dir):
    assert not [p.name for p in index_dir.iterdir() if ".tmp" in p.name]
    assert sorted(p.name for p in index_dir.glob("*.parquet")) == [shard_file_name(i) for i in range(3)]


def test_resume_skips_done_shards_and_finalize_names_missing(tmp_path):
    write_index(tmp_path, num_rows=10, shard_size=4, skip={1}, finalize=False)
    writer = reopen(tmp_path)
    assert [writer.is_done(i) for i in range(3)] == [True, False, True]
    with pytest.raises(MissingShardError, match=r"shards \[1\]"):
        writer.finalize(10)
    with pytest.raises(IndexNotFoundError, match="incomplete"):
        IndexFolder(tmp_path).manifest()
    assert len(IndexFolder(tmp_path).manifest(expect_complete=False).shards) == 2
    ids, arrays = make_rows(10)
    writer.write_shard(1, ids[4:8], {c: a[4:8] for c, a in arrays.items()})
    manifest = writer.finalize(10)
    assert manifest.complete and manifest.num_rows == 10 and Manifest.load(tmp_path) == manifest
    assert IndexFolder(tmp_path).ids() == ids


def test_two_writers_on_one_directory_keep_both_records(tmp_path):
    ids, arrays = make_rows(8)
    make = lambda: ShardWriter(tmp_path, kind="factors", columns=COLUMNS, dtype="float16", shard_size=4, meta={})
    first, second = make(), make()
    first.write_shard(0, ids[:4], {c: a[:4] for c, a in arrays.items()})
    second.write_shard(1, ids[4:], {c: a[4:] for c, a in arrays.items()})
    assert [s.index for s in first.finalize(8).shards] == [0, 1]


def test_shard_on_disk_but_not_in_manifest_is_not_done(index_dir):
    manifest = Manifest.load(index_dir)
    manifest.shards = manifest.shards[:2]  # as if the process died between rename and manifest update
    manifest.save(index_dir)
    writer = reopen(index_dir)
    assert (index_dir / shard_file_name(2)).exists() and not writer.is_done(2)


@pytest.mark.parametrize(
    ("change", "key"),
    [({"dtype": "float16"}, "dtype"), ({"shard_size": 5}, "shard_size"), ({"meta": {"seed": 1, "f": 4}}, "meta.seed"),
     ({"columns": {"h.0.attn.u": 3}}, "columns"), ({"kind": "dense"}, "kind")],
)
def test_resume_with_other_config_names_key(index_dir, change, key):
    config = dict(kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta={"seed": 0, "f": 4}) | change
    with pytest.raises(IndexMismatchError, match=rf"{key}:.*another directory"):
        ShardWriter(index_dir, **config)


def test_write_shard_validation_names_column(tmp_path):
    writer = ShardWriter(tmp_path, kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta={})
    ids, arrays = make_rows(3)
    cases = [
        ({"h.0.attn.u": arrays["h.0.attn.u"]}, "missing columns \\['h.0.attn.v'\\]"),
        (arrays | {"extra": arrays["h.0.attn.u"]}, "unexpected columns \\['extra'\\]"),
        (arrays | {"h.0.attn.v": arrays["h.0.attn.v"][:, :4]}, "'h.0.attn.v': expected shape \\(3, 5\\)"),
        (arrays | {"h.0.attn.u": arrays["h.0.attn.u"][:2]}, "'h.0.attn.u': expected shape \\(3, 3\\)"),
        (arrays | {"h.0.attn.u": arrays["h.0.attn.u"].flatten()}, "'h.0.attn.u'"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            writer.write_shard(0, ids, bad)
    with pytest.raises(ConfigError, match="1 to 4 rows"):
        writer.write_shard(0, make_rows(5)[0], make_rows(5)[1])
    with pytest.raises(ConfigError, match="JSON"):
        ShardWriter(tmp_path / "x", kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta={"p": {1, 2}})
    assert not writer.manifest.shards and not list(tmp_path.glob("*.parquet"))


def test_finalize_checks_row_counts_and_extra_shards(tmp_path):
    writer, _, _ = write_index(tmp_path, num_rows=10, shard_size=4, finalize=False)
    with pytest.raises(IndexMismatchError, match=r"shards \[2\]"):
        writer.finalize(8)
    with pytest.raises(CorruptShardError, match="shard 2: 2 rows, expected 3"):
        writer.finalize(11)


def test_missing_shard_file(index_dir):
    manifest = IndexFolder(index_dir).manifest()
    (index_dir / shard_file_name(1)).unlink()
    with pytest.raises(MissingShardError, match=shard_file_name(1)):
        IndexFolder(index_dir).manifest()
    with pytest.raises(MissingShardError, match=shard_file_name(1)):
        list(IndexFolder(index_dir).batches(manifest=manifest))


def test_flipped_bytes_fail_verify(index_dir):
    path = index_dir / shard_file_name(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    IndexFolder(index_dir).manifest()  # same size: only the checksum can tell
    recorded = Manifest.load(index_dir).shards[0].sha256
    with pytest.raises(CorruptShardError, match=rf"{shard_file_name(0)}.*[0-9a-f]{{64}}.*{recorded}"):
        IndexFolder(index_dir).manifest(verify=True)


def test_truncated_shard(index_dir):
    manifest = IndexFolder(index_dir).manifest()
    path = index_dir / shard_file_name(2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match=shard_file_name(2)):
        IndexFolder(index_dir).manifest()
    with pytest.raises(CorruptShardError, match=shard_file_name(2)) as info:
        list(IndexFolder(index_dir).batches(manifest=manifest))
    assert isinstance(info.value.__cause__, (pa.ArrowException, OSError, ValueError))  # ValueError: the footer
    writer = reopen(index_dir)
    assert not writer.is_done(2)


def test_shard_disagreeing_with_manifest(index_dir):
    manifest = IndexFolder(index_dir).manifest()
    with pytest.raises(CorruptShardError, match=rf"{shard_file_name(0)}.*h\.0\.attn\.u"):
        list(IndexFolder(index_dir).batches(manifest=dataclasses.replace(manifest, dtype="float16")))
    shards = [dataclasses.replace(s, rows=3) if s.index == 1 else s for s in manifest.shards]
    with pytest.raises(CorruptShardError, match=rf"{shard_file_name(1)} has 4 rows; the manifest says 3"):
        list(IndexFolder(index_dir).batches(manifest=dataclasses.replace(manifest, shards=shards)))
