"""Training or query examples from the rows of an input (JSON Lines, Parquet, Arrow, a `datasets` folder).

Three schemas are accepted: a `text` column (loss on every token), `prompt` + `response` columns (loss
on the response tokens only), or a `messages` column of chat turns ({"role", "content"}; rendered with
the tokenizer's chat template, loss on the assistant turns only). One file holds one schema: every row
is checked as it is read, and the first row of another schema is named. An optional `id` column names
each example; without it the id is the row index. Other columns are ignored. The five names are those of
``Columns`` (``data.text_column``, ``data.prompt_column``, ``data.response_column``, ``data.messages_column``,
``data.id_column``), so a dataset whose text is in ``content`` is read with ``Columns(text="content")``. Rows
are read in batches (``lorif_ray.data.rows``), so checking a file holds one batch of rows as Python objects at
a time. Rows already in memory (a request's queries) go through the same checks (``examples_of_rows``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorif_ray.data.rows import BATCH_ROWS, RowRange, iter_rows, rows_at
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

    @property
    def schema(self) -> str:
        """The schema of the row it came from: one of ``SCHEMAS``."""
        return "messages" if self.messages is not None else "text" if self.prompt is None else "prompt + response"


SCHEMAS = ("text", "prompt + response", "messages")


@dataclass(frozen=True)
class Columns:
    """The columns that hold each schema's fields (``data.*_column``); every other column is ignored.

    Example:
        >>> Columns(text="content").expected()
        "a 'content' column, 'prompt' and 'response' columns, or a 'messages' column"
    """

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    id: str = "id"

    def expected(self) -> str:
        """The accepted column sets, for error messages."""
        return (f"a {self.text!r} column, {self.prompt!r} and {self.response!r} columns, or a {self.messages!r} "
                "column")

    def renamed(self) -> dict[str, str]:
        """{field: column} of the names that differ from the defaults (what an index records)."""
        default = Columns()
        return {k: v for k, v in vars(self).items() if getattr(default, k) != v}

    def hint(self) -> str:
        """How to name other columns (for an error whose file has none of the expected ones)."""
        return ("; map your columns with data.text_column, data.prompt_column, data.response_column, "
                "data.messages_column (Python API: columns={'text': ...})")


DEFAULT_COLUMNS = Columns()


def load_examples(path: str | Path, columns: Columns = DEFAULT_COLUMNS) -> list[Example]:
    """Reads every example of a `.jsonl`, `.parquet` or `.arrow` file or a `save_to_disk` folder (for
    small sets: queries, evaluation; stage 1 reads its input by shard, ``lorif_ray.data.shards``).

    Args:
        path: Data with a `text` column, or `prompt` and `response` columns (text = prompt +
            response), or a `messages` column (a list of {"role", "content"} with at least one
            "assistant" turn); optional `id` column of scalars (turned into strings), default the row
            index. A row with both `text` and `prompt` + `response` counts as prompt + response.
        columns: the names of those columns (default: as above).

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
    import pyarrow as pa  # Deferred: JSON Lines inputs need pyarrow only for the id check.

    path = Path(path)
    examples = [example for _, batch in iter_examples(path, columns=columns) for example in batch]
    if not examples:
        raise DataError(f"{path}: the file holds no examples")
    check_unique_ids(path, pa.array([e.id for e in examples], pa.string()))
    return examples


def iter_examples(path: str | Path, rows: RowRange = RowRange(), schema: str | None = None,
                  batch_rows: int = BATCH_ROWS, columns: Columns = DEFAULT_COLUMNS,
                  ) -> Iterator[tuple[RowRange, list[Example]]]:
    """The checked examples of a row range, in batches (``iter_rows``'s batches).

    Args:
        rows: The rows to read (default: all).
        schema: The file's schema (row 0's; one of ``SCHEMAS``); None: the first row read's, for a
            range that starts at row 0.
        columns: the columns of the schemas' fields.

    Yields:
        (the batch's range, its examples).

    Raises:
        DataError: as ``load_examples`` (ids are not compared: see ``check_unique_ids``). The columns
            are checked on the rows read so far, so a JSON Lines file whose first rows lack every
            schema's columns is refused naming those rows' columns.
    """
    path = Path(path)
    found: set[str] = set()
    for where, batch, batch_columns in iter_rows(path, rows, batch_rows):
        found |= batch_columns
        schema, examples = _checked_batch(path, where.start, batch, found, schema, columns)
        yield where, examples


def examples_of_rows(source: str, rows: Sequence[Any], columns: Columns = DEFAULT_COLUMNS) -> list[Example]:
    """The checked examples of rows already in memory (e.g. the queries of an HTTP request), exactly as
    if they were the rows of a file named ``source``: the same schemas, checks and messages.

    Raises:
        DataError: as ``load_examples``, naming ``source`` and the row; also a row that is not an object.
    """
    import pyarrow as pa

    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}, row {index}: expected an object, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{source}: holds no examples")
    found = {key for row in rows for key in row}
    _, examples = _checked_batch(source, 0, list(rows), found, None, columns)
    check_unique_ids(source, pa.array([e.id for e in examples], pa.string()))
    return examples


def _checked_batch(path: str | Path, start: int, batch: list[dict[str, Any]], found: set[str],
                   schema: str | None, names: Columns) -> tuple[str, list[Example]]:
    """(the schema, the examples) of rows start, start + 1, ... of ``path`` whose columns so far are
    ``found``; ``schema`` None: the first row's."""
    if not ({names.prompt, names.response} <= found or names.text in found or names.messages in found):
        raise DataError(f"{path}: expected {names.expected()}; found {sorted(found)}{names.hint()}")
    schema = schema or _row_schema(path, start, batch[0], names)
    return schema, [_example(path, start + i, row, schema, names) for i, row in enumerate(batch)]


def examples_at(path: str | Path, rows: list[RowRange], schema: str,
                columns: Columns = DEFAULT_COLUMNS) -> list[Example]:
    """The checked examples of single-row ranges ``rows`` (with their JSON Lines offsets), in the given order,
    reading only those rows (``rows_at``); ``schema`` is the file's (one of ``SCHEMAS``).

    Raises:
        DataError: as ``iter_examples``.
    """
    path = Path(path)
    names = [columns.id, columns.text, columns.prompt, columns.response, columns.messages]
    values = rows_at(path, rows, columns=list(dict.fromkeys(names)))
    return [_example(path, row.start, value, schema, columns) for row, value in zip(rows, values)]


def check_unique_ids(path: str | Path, ids) -> None:
    """Raise when ids repeat; ``ids`` is a pyarrow (chunked) string array, counted with pyarrow (no
    Python set of N ids).

    Raises:
        DataError: naming the first repeated ids in order of first appearance.
    """
    import pyarrow.compute as pc

    counts = pc.value_counts(ids)
    duplicates = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(duplicates):
        shown = ", ".join(repr(d) for d in duplicates[:_SHOWN_IDS].to_pylist())
        more = f" and {len(duplicates) - _SHOWN_IDS} more" if len(duplicates) > _SHOWN_IDS else ""
        raise DataError(f"{path}: duplicate ids {shown}{more}")


def _example(path: str | Path, index: int, row: dict[str, Any], first: str, columns: Columns) -> Example:
    """Row ``index`` as an Example, refused when its schema is not the file's (``first``)."""
    schema = _row_schema(path, index, row, columns)
    if schema != first:
        raise DataError(
            f"{path}, row {index}{_id_note(row, columns)}: {schema} where row 0 has {first}; one file holds one "
            f"schema ({', '.join(SCHEMAS)}): split it into one file per schema"
        )
    return _MAKERS[schema](path, index, row, columns)


def _row_schema(path: str | Path, index: int, row: dict[str, Any], columns: Columns) -> str:
    """The schema of one row: messages, prompt + response (either key set), or text."""
    if row.get(columns.messages) is not None:
        return "messages"
    if row.get(columns.prompt) is not None or row.get(columns.response) is not None:
        return "prompt + response"
    if row.get(columns.text) is not None:
        return "text"
    raise DataError(f"{path}, row {index}{_id_note(row, columns)}: no {columns.text!r}, {columns.prompt!r} + "
                    f"{columns.response!r} or {columns.messages!r} value "
                    f"(keys {sorted(k for k, v in row.items() if v is not None)})")


def _id_note(row: dict[str, Any], columns: Columns) -> str:
    return f" (id {row[columns.id]!r})" if row.get(columns.id) is not None else ""


def _example_id(path: str | Path, index: int, row: dict[str, Any], columns: Columns) -> str:
    if columns.id not in row:
        return str(index)
    value = row[columns.id]
    if value is None or isinstance(value, (dict, list, tuple, bytes)):
        raise DataError(f"{path}, row {index}: {columns.id} must be a scalar, got {value!r}")
    return str(value)


def _string_field(path: str | Path, index: int, row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise DataError(
            f"{path}, row {index}: {name!r} must be a string, got {type(value).__name__}"
        )
    return value


def _text_example(path: str | Path, index: int, row: dict[str, Any], columns: Columns) -> Example:
    return Example(id=_example_id(path, index, row, columns), text=_string_field(path, index, row, columns.text))


def _prompt_response_example(path: str | Path, index: int, row: dict[str, Any], columns: Columns) -> Example:
    prompt = _string_field(path, index, row, columns.prompt)
    response = _string_field(path, index, row, columns.response)
    return Example(id=_example_id(path, index, row, columns), text=prompt + response, prompt=prompt)


def _messages_example(path: str | Path, index: int, row: dict[str, Any], columns: Columns) -> Example:
    messages = row[columns.messages]
    where = f"{path}, row {index}{_id_note(row, columns)}"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: {columns.messages!r} must be a non-empty list of {{'role', 'content'}}")
    turns = []
    for j, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: message {j} must be {{'role': str, 'content': str}}, got {turn!r}")
        turns.append((turn["role"], turn["content"]))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no 'assistant' message (the loss is on the assistant turns)")
    text = "\n".join(f"{role}: {content}" for role, content in turns)
    return Example(id=_example_id(path, index, row, columns), text=text, messages=tuple(turns))


_MAKERS = {"text": _text_example, "prompt + response": _prompt_response_example, "messages": _messages_example}
