"""Every input kind (JSON Lines, Parquet, Arrow IPC file or stream, a datasets save_to_disk folder), chat
data with a chat template, and schema errors raised when the data is loaded (before stage 1)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorif_ray.data import (IGNORE_INDEX, Example, data_sha256, examples_of_rows, load_examples, read_rows,
                            tokenize_examples)
from lorif_ray.embedded.tokenizer import build_tokenizer
from lorif_ray.errors import DataError
from lorif_ray.store import file_sha256

ROWS = [{"id": "a", "prompt": "the cat", "response": " sat"}, {"id": "b", "prompt": "a dog", "response": " ran"}]
EXPECTED = [Example("a", "the cat sat", prompt="the cat"), Example("b", "a dog ran", prompt="a dog")]
CHAT = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}" \
       "{% if add_generation_prompt %}assistant : {% endif %}"


def write_arrow(path, table, stream: bool):
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return path


def save_to_disk_layout(directory, table, shards: int = 2):
    """What ``datasets.Dataset.save_to_disk`` writes: data-0000i-of-0000n.arrow IPC streams + two JSON files."""
    directory.mkdir()
    step = -(-table.num_rows // shards)
    for i in range(shards):
        write_arrow(directory / f"data-{i:05d}-of-{shards:05d}.arrow", table.slice(i * step, step), stream=True)
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
    files = [{"filename": f"data-{i:05d}-of-{shards:05d}.arrow"} for i in range(shards)]
    (directory / "state.json").write_text(json.dumps({"_data_files": files}))
    return directory


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow-file", "arrow-stream", "save_to_disk"])
def test_every_input_kind_gives_the_same_examples(tmp_path, kind):
    table = pa.Table.from_pylist(ROWS)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(table, path)
    elif kind.startswith("arrow"):
        path = write_arrow(tmp_path / "d.arrow", table, stream=kind == "arrow-stream")
    else:
        path = save_to_disk_layout(tmp_path / "saved", table)
    assert load_examples(path) == EXPECTED
    assert len(data_sha256(path)) == 64


def test_data_digest_of_a_file_is_its_sha256(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    assert data_sha256(path) == file_sha256(path)


def test_folder_without_arrow_files_is_refused(tmp_path):
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "dataset_dict.json").write_text("{}")
    with pytest.raises(DataError, match=r"split: a folder without data-\*\.arrow files.*DatasetDict"):
        load_examples(tmp_path / "split")


def test_unreadable_arrow_is_named(tmp_path):
    (tmp_path / "x.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match=r"x\.arrow: cannot read Arrow IPC"):
        load_examples(tmp_path / "x.arrow")


def test_mixed_schemas_are_refused_at_load_time_naming_the_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"id": "q0", "text": "the cat sat"}, {"id": "q1", "text": "a dog"},
            {"id": "q2", "prompt": "the cat", "response": " ran"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"mixed\.jsonl, row 2 \(id 'q2'\): prompt \+ response where row 0 has text"):
        load_examples(path)
    columns = {k: [r.get(k) for r in rows] for k in ("id", "text", "prompt", "response")}
    pq.write_table(pa.table(columns), tmp_path / "mixed.parquet")  # nulls where a row lacks a column
    with pytest.raises(DataError, match=r"row 2 \(id 'q2'\): prompt \+ response where row 0 has text"):
        load_examples(tmp_path / "mixed.parquet")


def test_a_mixed_query_file_fails_before_stage_1(tiny_assets, tmp_path):
    """run_attribute loads both files first: nothing is indexed when the queries are unusable."""
    from lorif_ray.config import ClusterConfig
    from lorif_ray.stages.attribute import run_attribute
    from tests.stages.helpers import make_config

    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "the"}, {"role": "assistant", "content": "cat"}]}) + "\n")
    cfg = make_config({**tiny_assets, "queries": queries}, tmp_path / "out", cluster=ClusterConfig(backend="none"))
    with pytest.raises(DataError, match=r"row 1: messages where row 0 has text"):
        run_attribute(cfg)
    assert not cfg.index_path.exists()


def chat_row(i=0):
    return {"id": f"c{i}", "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "the cat"},
                                        {"role": "assistant", "content": "sat on the mat"},
                                        {"role": "user", "content": "and the dog"},
                                        {"role": "assistant", "content": "ran"}]}


def test_messages_loss_on_assistant_turns_only(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([chat_row(0), chat_row(1)]), path)
    examples = load_examples(path)
    assert examples[0].messages[2] == ("assistant", "sat on the mat")
    assert examples[0].text.splitlines()[1] == "user: the cat"
    tokenizer = build_tokenizer(["be brief the cat sat on mat and dog ran system user assistant : ."])
    tokenizer.chat_template = CHAT
    [t, _] = tokenize_examples(examples, tokenizer, max_length=64)
    words = tokenizer.convert_ids_to_tokens(t.input_ids)
    assert " ".join(words) == ("system : be brief . user : the cat . assistant : sat on the mat . "
                               "user : and the dog . assistant : ran .")
    loss_words = [w for w, label in zip(words, t.labels) if label != IGNORE_INDEX]
    assert loss_words == ["sat", "on", "the", "mat", ".", "ran", "."]  # content + end marker, no header


def test_messages_without_a_chat_template_is_a_data_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat_row()) + "\n")
    tokenizer = build_tokenizer(["the cat"])
    with pytest.raises(DataError, match=r"'c0' has 'messages', but the tokenizer has no chat template"):
        tokenize_examples(load_examples(path), tokenizer, max_length=64)


def test_messages_schema_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"row 0: no 'assistant' message"):
        load_examples(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "text": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"row 0: message 0 must be"):
        load_examples(path)


def test_read_rows_serves_every_kind(tmp_path):
    directory = save_to_disk_layout(tmp_path / "saved", pa.Table.from_pylist(ROWS), shards=1)
    rows, columns = read_rows(directory)
    assert [r["id"] for r in rows] == ["a", "b"] and columns == {"id", "prompt", "response"}


def test_rows_in_memory_are_checked_like_a_file(tmp_path):
    """A request's rows (``examples_of_rows``) give the file's examples, and each bad row the file's error with
    the request named instead of the file."""
    assert examples_of_rows("request", ROWS) == EXPECTED
    bad_sets = [ROWS + [{"id": "c", "text": "a cat"}], [{"id": "a", "prompt": "x"}], ROWS + [ROWS[0]],
                [{"id": "a", "text": 3}], [{"messages": [{"role": "user", "content": "hi"}]}]]
    for rows in bad_sets:
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError) as from_file:
            load_examples(path)
        with pytest.raises(DataError) as from_memory:
            examples_of_rows("request", rows)
        assert str(from_memory.value) == str(from_file.value).replace(str(path), "request")
    with pytest.raises(DataError, match=r"request, row 1: expected an object, got str"):
        examples_of_rows("request", [ROWS[0], "the cat"])
