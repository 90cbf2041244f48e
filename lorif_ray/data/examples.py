"""Loading training or query examples from JSON Lines, Parquet or Arrow files, or a `datasets` folder.

Three schemas are accepted: a `text` column (loss on every token), `prompt` + `response` columns (loss
on the response tokens only), or a `messages` column of chat turns ({"role", "content"}; rendered with
the tokenizer's chat template, loss on the assistant turns only). One file holds one schema: every row
is checked when the file is loaded, and the first row of another schema is named. An optional `id`
column names each example; without it the id is the row index. Other columns are ignored.

Inputs: `.jsonl`, `.parquet`, `.arrow` (an Arrow IPC file or stream), or a folder written by
`datasets.Dataset.save_to_disk` (its `data-*.arrow` stream files, read with pyarrow alone: `datasets`
is not needed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorif_ray.errors import DataError

# How many offending ids an error message lists before it only counts the rest.
_SHOWN_IDS = 5


@dataclass(frozen=True)
class Example:
    """One training or query example.

    Attributes:
        id: Unique name of the example within its file.
        text: The whole sequence (prompt + response when there is a prompt); for chat examples a plain
            rendering ("role: content" lines) to show, the tokens come from `messages`.
        prompt: Prefix of `text` whose tokens carry no loss, or None when every token does.
        messages: Chat turns ((role, content), ...) rendered with the tokenizer's chat template, loss on
            the assistant turns; None for the other schemas.
    """

    id: str
    text: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.text.startswith(self.prompt):
            raise DataError(f"example {self.id!r}: text does not start with its prompt")


SCHEMAS = ("text", "prompt + response", "messages")


def load_examples(path: str | Path) -> list[Example]:
    """Reads examples from a `.jsonl`, `.parquet` or `.arrow` file or a `save_to_disk` folder.

    Args:
        path: Data with a `text` column, or `prompt` and `response` columns (text = prompt +
            response), or a `messages` column (a list of {"role", "content"} with at least one
            "assistant" turn); optional `id` column of scalars (turned into strings), default the row
            index. A row with both `text` and `prompt` + `response` counts as prompt + response.

    Returns:
        The examples in file order.

    Raises:
        DataError: The path is missing, empty, of an unknown kind or unreadable (e.g. a JSON Lines
            line that is not UTF-8: the message names the line); it has no schema's columns; a row
            has another schema than the first row (the row is named); a text, prompt, response or
            turn is not a string; an id is missing or not a scalar; or ids repeat.

    Example:
        >>> examples = load_examples("train.jsonl")  # doctest: +SKIP
        >>> examples[0]  # doctest: +SKIP
        Example(id='0', text='the capital of zorvia is kelm .', prompt=None, messages=None)
    """
    path = Path(path)
    rows, columns = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the file holds no examples")
    if not ({"prompt", "response"} <= columns or "text" in columns or "messages" in columns):
        raise DataError(
            f"{path}: expected a 'text' column, 'prompt' and 'response' columns, or a 'messages' column; "
            f"found {sorted(columns)}"
        )
    first = _row_schema(path, 0, rows[0])
    examples = []
    for i, row in enumerate(rows):
        schema = _row_schema(path, i, row)
        if schema != first:
            raise DataError(
                f"{path}, row {i}{_id_note(row)}: {schema} where row 0 has {first}; one file holds one schema "
                f"({', '.join(SCHEMAS)}): split it into one file per schema"
            )
        examples.append(_MAKERS[schema](path, i, row))
    _check_unique_ids(path, examples)
    return examples


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], set[str]]:
    """The rows (dicts) of a data path and the union of their columns, whatever its kind.

    Raises:
        DataError: missing path, unknown kind, or unreadable file.
    """
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".arrow":
        return _table_rows(_read_arrow(path))
    raise DataError(f"{path}: unknown file kind {suffix!r}; expected .jsonl, .parquet, .arrow or a "
                    "datasets save_to_disk folder")


def data_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a data file's bytes (equal to ``lorif_ray.store.file_sha256``), or of a folder's
    data files (name and bytes of each ``*.arrow``/``*.parquet``/``*.jsonl``, in name order)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".arrow", ".parquet", ".jsonl"))
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _read_saved_dataset(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """A `datasets.Dataset.save_to_disk` folder: its `data-*.arrow` files (Arrow IPC streams) in name order."""
    import pyarrow as pa  # Deferred: only Arrow inputs need pyarrow here.

    files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not files:
        hint = " (a DatasetDict: pass one split's folder)" if (path / "dataset_dict.json").exists() else ""
        raise DataError(f"{path}: a folder without data-*.arrow files; expected a datasets save_to_disk "
                        f"folder{hint}")
    return _table_rows(pa.concat_tables([_read_arrow(f) for f in files]))


def _read_arrow(path: Path):
    """An Arrow IPC file (random access) or stream (what `datasets` writes) as a table."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all()
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read Arrow IPC ({e})") from e


def _table_rows(table) -> tuple[list[dict[str, Any]], set[str]]:
    return table.to_pylist(), set(table.column_names)


def _row_schema(path: Path, index: int, row: dict[str, Any]) -> str:
    """The schema of one row: messages, prompt + response (either key set), or text."""
    if row.get("messages") is not None:
        return "messages"
    if row.get("prompt") is not None or row.get("response") is not None:
        return "prompt + response"
    if row.get("text") is not None:
        return "text"
    raise DataError(f"{path}, row {index}{_id_note(row)}: no 'text', 'prompt' + 'response' or 'messages' "
                    f"value (keys {sorted(k for k, v in row.items() if v is not None)})")


def _id_note(row: dict[str, Any]) -> str:
    return f" (id {row['id']!r})" if row.get("id") is not None else ""


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """Returns the rows (one JSON object per non-blank line) and the union of their keys."""
    rows: list[dict[str, Any]] = []
    columns: set[str] = set()
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}, line {line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "JSON Lines files must be UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_number}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            columns.update(row)
    return rows, columns


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """Returns the rows and the column names of a Parquet file."""
    import pyarrow.parquet as pq  # Deferred: only Parquet inputs need pyarrow.

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files.
        raise DataError(f"{path}: cannot read Parquet ({e})") from e
    return _table_rows(table)


def _example_id(path: Path, index: int, row: dict[str, Any]) -> str:
    if "id" not in row:
        return str(index)
    value = row["id"]
    if value is None or isinstance(value, (dict, list, tuple, bytes)):
        raise DataError(f"{path}, row {index}: id must be a scalar, got {value!r}")
    return str(value)


def _string_field(path: Path, index: int, row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise DataError(
            f"{path}, row {index}: {name!r} must be a string, got {type(value).__name__}"
        )
    return value


def _text_example(path: Path, index: int, row: dict[str, Any]) -> Example:
    return Example(id=_example_id(path, index, row), text=_string_field(path, index, row, "text"))


def _prompt_response_example(path: Path, index: int, row: dict[str, Any]) -> Example:
    prompt = _string_field(path, index, row, "prompt")
    response = _string_field(path, index, row, "response")
    return Example(id=_example_id(path, index, row), text=prompt + response, prompt=prompt)


def _messages_example(path: Path, index: int, row: dict[str, Any]) -> Example:
    messages = row["messages"]
    where = f"{path}, row {index}{_id_note(row)}"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    turns = []
    for j, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: message {j} must be {{'role': str, 'content': str}}, got {turn!r}")
        turns.append((turn["role"], turn["content"]))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no 'assistant' message (the loss is on the assistant turns)")
    text = "\n".join(f"{role}: {content}" for role, content in turns)
    return Example(id=_example_id(path, index, row), text=text, messages=tuple(turns))


_MAKERS = {"text": _text_example, "prompt + response": _prompt_response_example, "messages": _messages_example}


def _check_unique_ids(path: Path, examples: list[Example]) -> None:
    seen: set[str] = set()
    duplicates: dict[str, None] = {}  # A dict keeps first-seen order without repeats.
    for example in examples:
        if example.id in seen:
            duplicates[example.id] = None
        seen.add(example.id)
    if duplicates:
        shown = ", ".join(repr(d) for d in list(duplicates)[:_SHOWN_IDS])
        more = f" and {len(duplicates) - _SHOWN_IDS} more" if len(duplicates) > _SHOWN_IDS else ""
        raise DataError(f"{path}: duplicate ids {shown}{more}")
