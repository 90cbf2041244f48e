"""Loading training or query examples from JSON Lines or Parquet files.

Two schemas are accepted: a `text` column (loss on every token), or `prompt` + `response` columns
(loss on the response tokens only). An optional `id` column names each example; without it the id is
the row index. Other columns are ignored.
"""

from __future__ import annotations

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
        text: The whole sequence (prompt + response when there is a prompt).
        prompt: Prefix of `text` whose tokens carry no loss, or None when every token does.
    """

    id: str
    text: str
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.text.startswith(self.prompt):
            raise DataError(f"example {self.id!r}: text does not start with its prompt")


def load_examples(path: str | Path) -> list[Example]:
    """Reads examples from a `.jsonl` or `.parquet` file.

    Args:
        path: File with a `text` column, or `prompt` and `response` columns (text = prompt +
            response); optional `id` column of scalars (turned into strings), default the row index.
            When both schemas are present, `prompt` + `response` wins (loss on the response only).

    Returns:
        The examples in file order.

    Raises:
        DataError: The file is missing, empty, of an unknown kind or unreadable (e.g. a JSON Lines
            line that is not UTF-8: the message names the line); it has neither
            schema; a text, prompt or response is not a string; an id is missing or not a scalar;
            or ids repeat.

    Example:
        >>> examples = load_examples("train.jsonl")  # doctest: +SKIP
        >>> examples[0]  # doctest: +SKIP
        Example(id='0', text='the capital of zorvia is kelm .', prompt=None)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, columns = _read_jsonl(path)
    elif suffix == ".parquet":
        rows, columns = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file kind {suffix!r}; expected .jsonl or .parquet")
    if not rows:
        raise DataError(f"{path}: the file holds no examples")

    if "prompt" in columns and "response" in columns:
        examples = [_prompt_response_example(path, i, row) for i, row in enumerate(rows)]
    elif "text" in columns:
        examples = [_text_example(path, i, row) for i, row in enumerate(rows)]
    else:
        raise DataError(
            f"{path}: expected a 'text' column or 'prompt' and 'response' columns; "
            f"found {sorted(columns)}"
        )
    _check_unique_ids(path, examples)
    return examples


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
    return table.to_pylist(), set(table.column_names)


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
