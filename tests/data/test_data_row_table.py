"""The index's row table: written in the plan's pass over the input, it gives the examples of given rows of every
input kind reading only those rows, checks each row's id, and refuses an input that changed."""

import json
import os

import pyarrow.parquet as pq
import pytest

from lorif_ray.data import TrainTexts, commit_row_table, load_examples, shard_input
from lorif_ray.store import IndexFolder
from lorif_ray.store.index_folder import ROWS_NAME
from lorif_ray.errors import DataError
from tests.data.test_data_shards import ROWS, write_input


def _planned(tmp_path, kind):
    path = write_input(tmp_path, kind)
    index = tmp_path / "index"
    plan = shard_input(path, shard_size=4, rows_table=IndexFolder(index).row_table_path)
    assert plan.rows_table is not None and not (index / ROWS_NAME).exists()  # a temporary until committed
    commit_row_table(plan.rows_table)
    return path, index


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow-file", "arrow-stream", "save_to_disk"])
def test_the_row_table_gives_the_examples_of_given_rows(tmp_path, kind):
    path, index = _planned(tmp_path, kind)
    table = pq.read_table(index / ROWS_NAME)
    assert table.column("example_id").to_pylist() == [r["id"] for r in ROWS]
    assert table.num_rows == 10 and len(pq.ParquetFile(index / ROWS_NAME).metadata.to_dict()["row_groups"]) == 3
    texts = TrainTexts(index)
    examples = load_examples(path)
    assert texts.examples([7, 0, 3]) == {0: examples[0], 3: examples[3], 7: examples[7]}
    assert texts.texts([9]) == {9: "p9 s9"} and texts.ids([2, 5]) == {2: "r2", 5: "r5"}


def test_a_jsonl_row_is_read_from_its_byte_offset(tmp_path):
    """Rows 0-8 replaced by garbage of the same length: row 9 still reads (its offset holds), row 2 is refused
    naming its line (a blank line before it), and nothing else of the file is parsed."""
    path, index = _planned(tmp_path, "jsonl")
    data = path.read_bytes()
    for row in ROWS[:9]:
        line = json.dumps(row).encode()
        data = data.replace(line, b"x" * len(line))
    stat = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the rows can tell
    assert TrainTexts(index).texts([9]) == {9: "p9 s9"}
    with pytest.raises(DataError, match=r"d\.jsonl, line 4: invalid JSON"):
        TrainTexts(index).texts([2])


def test_a_changed_input_is_refused_by_name(tmp_path):
    path, index = _planned(tmp_path, "jsonl")
    rows = [{**r, "id": f"x{i}"} if i == 4 else r for i, r in enumerate(ROWS)]
    stat = os.stat(path)
    path.write_text("\ufeff" + "".join(json.dumps(r) + ("\n\n" if i % 3 == 1 else "\n") for i, r in enumerate(rows)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"row 4: id 'x4' where stage 1 indexed 'r4'"):
        TrainTexts(index).texts([4])  # same size and time: caught by the id check
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"d\.jsonl: the training input changed since stage 1 indexed it \(sha256"):
        TrainTexts(index)
    path.write_text(path.read_text() + json.dumps({"id": "more", "prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(DataError, match=r"changed since stage 1 indexed it \(\d+ bytes then, \d+ now\)"):
        TrainTexts(index)
    with pytest.raises(DataError, match="has no _rows.parquet"):
        TrainTexts(tmp_path / "elsewhere")


def test_the_table_is_not_rewritten_for_the_same_input(tmp_path):
    path, index = _planned(tmp_path, "parquet")
    assert shard_input(path, shard_size=4, rows_table=IndexFolder(index).row_table_path).rows_table is None
    assert shard_input(path, shard_size=4).rows_table is None
