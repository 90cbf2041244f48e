"""Loading examples from JSON Lines and Parquet, and the errors for unusable files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorif_ray.data import Example, load_examples
from lorif_ray.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_jsonl_text_schema_with_default_ids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b ."}, {"text": "c d ."}])
    assert load_examples(path) == [Example("0", "a b ."), Example("1", "c d .")]


def test_jsonl_prompt_response_schema_keeps_extra_columns_out(tmp_path):
    rows = [{"id": 7, "prompt": "a b", "response": " c", "source_id": "t1"}]
    [example] = load_examples(write_jsonl(tmp_path / "q.jsonl", rows))
    assert example == Example(id="7", text="a b c", prompt="a b")


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [e.text for e in load_examples(path)] == ["a", "b"]


def test_parquet_both_schemas(tmp_path):
    text = write_parquet(tmp_path / "t.parquet", {"id": [10, 11], "text": ["x y", "z"]})
    assert load_examples(text) == [Example("10", "x y"), Example("11", "z")]
    pr = write_parquet(tmp_path / "p.parquet", {"prompt": ["x"], "response": [" y"]})
    assert load_examples(pr) == [Example("0", "x y", prompt="x")]


def test_prompt_response_wins_over_text(tmp_path):
    rows = [{"text": "whole", "prompt": "p", "response": " r"}]
    assert load_examples(write_jsonl(tmp_path / "d.jsonl", rows))[0].prompt == "p"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\na\n")
    with pytest.raises(DataError, match=r"data\.csv.*unknown file kind '\.csv'"):
        load_examples(path)


def test_neither_schema_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "body": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl.*found \['body', 'prompt'\]"):
        load_examples(path)
    path = write_parquet(tmp_path / "d.parquet", {"body": ["b"]})
    with pytest.raises(DataError, match=r"d\.parquet.*found \['body'\]"):
        load_examples(path)


def test_empty_files(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl.*no examples"):
        load_examples(path)
    path = write_parquet(tmp_path / "empty.parquet", {"text": pa.array([], pa.string())})
    with pytest.raises(DataError, match="empty.parquet.*no examples"):
        load_examples(path)


def test_duplicate_ids_are_named(tmp_path):
    rows = [{"id": i % 3, "text": "t"} for i in range(12)]
    with pytest.raises(DataError, match=r"dup\.jsonl: duplicate ids '0', '1', '2'"):
        load_examples(write_jsonl(tmp_path / "dup.jsonl", rows))


def test_non_string_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 3}])
    with pytest.raises(DataError, match=r"d\.jsonl, row 1: 'text' must be a string, got int"):
        load_examples(path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "response": None}])
    with pytest.raises(DataError, match=r"p\.jsonl, row 0: 'response' must be a string"):
        load_examples(path)


def test_non_scalar_id(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": [1], "text": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl, row 0: id must be a scalar"):
        load_examples(path)


def test_bad_json_line_is_numbered(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_examples(path)
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: expected a JSON object"):
        load_examples(path)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        load_examples(path)


def test_prompt_must_prefix_text():
    with pytest.raises(DataError, match="'e1'"):
        Example(id="e1", text="a b", prompt="x")
