"""Human-readable summaries of stage reports, and the known-source check of queries with ``source_id``."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from lorif_ray.data import Columns, load_examples, read_rows
from lorif_ray.data.examples import DEFAULT_COLUMNS
from lorif_ray.store.schema import BYTES_PER_VALUE


def describe_index(report: dict) -> str:
    rate = report.get("examples_per_second")
    if report.get("reused"):
        seconds = report.get("seconds")
        built = (f"built by an earlier run in {seconds:.1f}s" + (f", {rate:.1f} examples/s" if rate else "")
                 if seconds is not None else "its build time was not recorded")
        done = f"reused: complete and intact, nothing computed; {built}"
    else:
        done = (f"{report['computed']} computed, {report['skipped_shards']} shards reused"
                + (f", {rate:.1f} examples/s" if rate else ""))
    lines = [
        f"index: {report['examples']} examples in {report['index_dir']} ({done})",
        f"  stored {report['kind']} rows ({report['dtype']}): {report['bytes_per_example'] / 1024:.2f} KiB/example "
        f"on disk; payload {report['payload_bytes_per_example'] / 1024:.2f} KiB = sum over layers of "
        + ("c(d1+d2)" if report["kind"] == "factors" else "D" if report["kind"] == "dense" else "H")
        + f" x dtype size; file overhead {100 * report['overhead_fraction']:+.2f}%",
    ]
    size = BYTES_PER_VALUE[report["dtype"]]
    for formula, count in report.get("layer_shapes", {}).items():
        lines.append(f"    {count} layer(s) of {formula} floats x {size} B")
    return "\n".join(lines)


def describe_curvature(report: dict) -> str:
    """One line: the curvature fitted now (its seconds), or reused (and the seconds of the run that fitted it)."""
    if not report.get("reused"):
        return f"curvature: {report['seconds']:.1f}s -> {report['path']}"
    seconds = report.get("seconds")
    built = f"fitted by an earlier run in {seconds:.1f}s" if seconds is not None else "its fit time was not recorded"
    return f"curvature: reused ({built}) -> {report['path']}"


def describe_results(report: dict) -> str:
    """Where a query run's results are: the page to open and the tables."""
    return (f"results: {report['report_path']} (open it in a browser); tables with texts: {report['topk_path']} "
            f"(proponents) and {report['opponents_path']} (opponents); "
            "in Python: lorif_ray.Results.open(output_dir)")


def expected_sources(path: Path, columns: Columns = DEFAULT_COLUMNS) -> dict[str, str]:
    """{query id: source id} from queries with id (``columns.id``) and ``source_id`` columns ({} otherwise); any
    input kind."""
    rows, _ = read_rows(path)
    return {str(r[columns.id]): str(r["source_id"]) for r in rows
            if r.get(columns.id) is not None and r.get("source_id") is not None}


def source_hits(topk_path: Path, sources: dict[str, str], k: int) -> tuple[int, int]:
    """(queries whose known source is in their top-k, queries with a known source)."""
    table = pq.read_table(topk_path).to_pylist()
    found = {r["query_id"] for r in table if r["rank"] <= k and sources.get(r["query_id"]) == r["train_id"]}
    return len(found), len(sources)


def describe_proponents(topk_path: Path, queries_path: Path, *, show: int = 3, k: int = 5,
                        columns: Columns = DEFAULT_COLUMNS) -> str:
    """The top-k proponents, with their text (``topk.parquet``'s ``train_text``), of the first ``show`` queries
    (and the known-source hit rate); k is capped at the ranks ``topk.parquet`` holds (``query.top_k``)."""
    queries = {e.id: e for e in load_examples(queries_path, columns)}
    sources = expected_sources(queries_path, columns)
    rows = pq.read_table(topk_path).to_pylist()
    k = min(k, max((r["rank"] for r in rows), default=k))
    lines = []
    for query_id in list(queries)[:show]:
        q = queries[query_id]
        prompt = q.prompt if q.prompt is not None else ""
        lines.append(f"query {query_id}: {prompt!r} -> {q.text[len(prompt):]!r}")
        for r in (r for r in rows if r["query_id"] == query_id and r["rank"] <= k):
            mark = "  <- known source" if sources.get(query_id) == r["train_id"] else ""
            lines.append(f"  {r['rank']}. {r['score']:+.4g}  [{r['train_id']}] {r.get('train_text') or ''}{mark}")
    if sources:
        for top in sorted({1, k}):
            hit, total = source_hits(topk_path, sources, top)
            lines.append(f"known source in the top-{top}: {hit}/{total} queries ({100 * hit / total:.0f}%)")
    return "\n".join(lines)
