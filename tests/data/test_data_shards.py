"""A training input planned into shards by row range and read shard by shard: every kind gives the file's
examples in order, a shard reads only its own rows, and the plan checks the file like load_examples."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorif_ray.data import RowRange, data_sha256, load_examples, shard_input, read_shard
from lorif_ray.errors import DataError
from tests.data.test_data_formats import save_to_disk_layout, write_arrow

ROWS = [{"id": f"r{i}", "prompt": f"p{i}", "response": f" s{i}"} for i in range(10)]


def write_input(directory, kind, rows=ROWS):
    """``rows`` as an input of ``kind``; JSON Lines with a BOM and blank lines, Parquet in row groups of 3
    rows, a save_to_disk folder in 3 files: no kind's own boundaries align with shards of 4."""
    table = pa.Table.from_pylist(rows)
    if kind == "jsonl":
        path = directory / "d.jsonl"
        lines = [json.dumps(r) + ("\n\n" if i % 3 == 1 else "\n") for i, r in enumerate(rows)]
        path.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
        return path
    if kind == "parquet":
        pq.write_table(table, directory / "d.parquet", row_group_size=3)
        return directory / "d.parquet"
    if kind.startswith("arrow"):
        return write_arrow(directory / "d.arrow", table, stream=kind == "arrow-stream")
    return save_to_disk_layout(directory / "saved", table, shards=3)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow-file", "arrow-stream", "save_to_disk"])
def test_shards_of_every_kind_are_the_file_cut_in_order(tmp_path, kind):
    path = write_input(tmp_path, kind)
    plan = shard_input(path, shard_size=4)
    assert [(r.start, r.stop) for r in plan.ranges] == [(0, 4), (4, 8), (8, 10)]
    assert (plan.num_rows, plan.schema, plan.sha256) == (10, "prompt + response", data_sha256(path))
    shards = [read_shard(plan.shard(i)) for i in reversed(range(3))][::-1]  # any order
    assert [e for shard in shards for e in shard] == load_examples(path)


def test_a_jsonl_shard_starts_at_its_own_line(tmp_path):
    """Shard 1 is read from the byte offset the plan recorded: garbage in shard 0's lines (same length, so
    the offsets hold) does not reach it, and shard 0 names the bad line by its number in the file."""
    path = write_input(tmp_path, "jsonl")
    plan = shard_input(path, shard_size=4)
    assert plan.ranges[1] == RowRange(4, 8, offset=plan.ranges[1].offset, line=6)  # one blank line before row 4
    data = path.read_bytes()
    line = json.dumps(ROWS[2]).encode()
    path.write_bytes(data.replace(line, b"x" * len(line)))
    assert [e.id for e in read_shard(plan.shard(1))] == ["r4", "r5", "r6", "r7"]
    with pytest.raises(DataError, match=r"d\.jsonl, line 4: invalid JSON"):
        read_shard(plan.shard(0))


def test_a_parquet_shard_reads_only_the_row_groups_it_overlaps(tmp_path, monkeypatch):
    path = write_input(tmp_path, "parquet")  # row groups [0, 3) [3, 6) [6, 9) [9, 10)
    plan = shard_input(path, shard_size=4)
    read_groups, real = [], pq.ParquetFile.iter_batches

    def recording(self, *args, row_groups=None, **kwargs):
        read_groups.append(row_groups)
        return real(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    assert [e.id for e in read_shard(plan.shard(1))] == ["r4", "r5", "r6", "r7"]
    assert read_groups == [[1, 2]]


def test_the_plan_checks_the_whole_file_like_load_examples(tmp_path):
    rows = [{"id": i % 7, "text": "t"} for i in range(12)]
    with pytest.raises(DataError, match=r"d\.jsonl: duplicate ids '0', '1', '2', '3', '4'$"):
        shard_input(write_input(tmp_path, "jsonl", rows), shard_size=4)
    rows = [{"id": f"t{i}", "text": "t"} for i in range(6)] + [{"id": "m", "prompt": "a", "response": " b"}]
    columns = {k: [r.get(k) for r in rows] for k in ("id", "text", "prompt", "response")}  # nulls where absent
    pq.write_table(pa.table(columns), tmp_path / "mixed.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"mixed\.parquet, row 6 \(id 'm'\): prompt \+ response where row 0 has text"):
        shard_input(tmp_path / "mixed.parquet", shard_size=4)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no examples"):
        shard_input(tmp_path / "empty.jsonl", shard_size=4)


def test_a_file_that_lost_rows_after_planning_is_named(tmp_path):
    path = write_input(tmp_path, "parquet")
    plan = shard_input(path, shard_size=4)
    pq.write_table(pa.Table.from_pylist(ROWS[:9]), path)
    with pytest.raises(DataError, match=r"rows \[8, 10\) were planned, 1 read; the file changed"):
        read_shard(plan.shard(2))
