"""Human-readable summaries of stage reports, and the known-source check of queries with ``source_id``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lorif_ray.data import Columns, iter_examples, load_examples, read_rows
from lorif_ray.data.examples import DEFAULT_COLUMNS
from lorif_ray.store.artifacts import META_KEY
from lorif_ray.store.schema import BYTES_PER_VALUE


def describe_index(report: dict) -> str:
    rate = report.get("examples_per_second")
    lines = [
        f"index: {report['examples']} examples in {report['index_dir']} "
        f"({report['computed']} computed, {report['skipped_shards']} shards reused"
        + (f", {rate:.1f} examples/s" if rate else "") + ")",
        f"  stored {report['kind']} rows ({report['dtype']}): {report['bytes_per_example'] / 1024:.2f} KiB/example "
        f"on disk; payload {report['payload_bytes_per_example'] / 1024:.2f} KiB = sum over layers of "
        + ("c(d1+d2)" if report["kind"] == "factors" else "D" if report["kind"] == "dense" else "H")
        + f" x dtype size; file overhead {100 * report['overhead_fraction']:+.2f}%",
    ]
    size = BYTES_PER_VALUE[report["dtype"]]
    for formula, count in report.get("layer_shapes", {}).items():
        lines.append(f"    {count} layer(s) of {formula} floats x {size} B")
    return "\n".join(lines)


def expected_sources(path: Path, columns: Columns = DEFAULT_COLUMNS) -> dict[str, str]:
    """{query id: source id} from queries with id (``columns.id``) and ``source_id`` columns ({} otherwise); any
    input kind."""
    rows, _ = read_rows(path)
    return {str(r[columns.id]): str(r["source_id"]) for r in rows
            if r.get(columns.id) is not None and r.get("source_id") is not None}


def recorded_columns(table: pa.Table) -> Columns:
    """The data columns a results table was made with (its ``lorif.meta`` config's ``data.*_column``; the
    default names for a table without them)."""
    raw = (table.schema.metadata or {}).get(META_KEY.encode())
    data = (json.loads(raw).get("config") or {}).get("data") or {} if raw else {}
    names = {role: data[f"{role}_column"] for role in vars(DEFAULT_COLUMNS) if data.get(f"{role}_column")}
    return Columns(**names)


def with_texts(table: pa.Table, train_path: Path, queries_path: Path, columns: Columns | None = None) -> pa.Table:
    """A results table (``topk.parquet``: query_id, rank, train_id, score; or the per-token and self-influence
    tables) with ``query_text`` after ``query_id`` and ``train_text`` after ``train_id``, where it has them. A
    prompt + response query reads ``prompt`` + ``response`` as one text; a chat one "role: content" lines.
    ``columns``: the data's columns; None = those the table records (``recorded_columns``)."""
    columns = recorded_columns(table) if columns is None else columns
    for column, path in (("query_id", queries_path), ("train_id", train_path)):
        if column not in table.column_names:
            continue
        texts = texts_of(path, set(table.column(column).to_pylist()), columns)
        at = table.column_names.index(column) + 1
        table = table.add_column(at, column.replace("_id", "_text"),
                                 pa.array([texts[i] for i in table.column(column).to_pylist()], pa.string()))
    return table


def texts_of(path: Path, ids: set[str], columns: Columns = DEFAULT_COLUMNS) -> dict[str, str]:
    """{id: text} of the examples of a data file with the given ids, read in a stream: the texts of a top-k
    without holding the training set."""
    out = {}
    for _, examples in iter_examples(path, columns=columns):
        out.update((e.id, e.text) for e in examples if e.id in ids)
    return out


def source_hits(topk_path: Path, sources: dict[str, str], k: int) -> tuple[int, int]:
    """(queries whose known source is in their top-k, queries with a known source)."""
    table = pq.read_table(topk_path).to_pylist()
    found = {r["query_id"] for r in table if r["rank"] <= k and sources.get(r["query_id"]) == r["train_id"]}
    return len(found), len(sources)


def describe_proponents(topk_path: Path, train_path: Path, queries_path: Path, *, show: int = 3, k: int = 5,
                        columns: Columns = DEFAULT_COLUMNS) -> str:
    """The top-k proponents, with their text, of the first ``show`` queries (and the known-source hit rate);
    k is capped at the ranks ``topk.parquet`` holds (``query.top_k``)."""
    queries = {e.id: e for e in load_examples(queries_path, columns)}
    sources = expected_sources(queries_path, columns)
    rows = pq.read_table(topk_path).to_pylist()
    text = texts_of(train_path, {r["train_id"] for r in rows}, columns)
    k = min(k, max((r["rank"] for r in rows), default=k))
    lines = []
    for query_id in list(queries)[:show]:
        q = queries[query_id]
        prompt = q.prompt if q.prompt is not None else ""
        lines.append(f"query {query_id}: {prompt!r} -> {q.text[len(prompt):]!r}")
        for r in (r for r in rows if r["query_id"] == query_id and r["rank"] <= k):
            mark = "  <- known source" if sources.get(query_id) == r["train_id"] else ""
            lines.append(f"  {r['rank']}. {r['score']:+.4g}  [{r['train_id']}] {text[r['train_id']]}{mark}")
    if sources:
        for top in sorted({1, k}):
            hit, total = source_hits(topk_path, sources, top)
            lines.append(f"known source in the top-{top}: {hit}/{total} queries ({100 * hit / total:.0f}%)")
    return "\n".join(lines)
