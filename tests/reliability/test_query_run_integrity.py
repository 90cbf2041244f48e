"""The query run's own files are verified as they are read, like every other artifact (issue 21, item 1): a
byte changed in a table, a sidecar or the page, or in the sealed run record, is a QueryRunError naming the
file, never a result read silently."""

from __future__ import annotations

import shutil

import pytest

from lorif_ray import Results
from lorif_ray.errors import QueryRunError
from tests.reliability.layout import flipped


@pytest.fixture
def run_dir(baseline, tmp_path):
    """A copy of the baseline's query run (its index is not needed to read the run)."""
    out = tmp_path / "run"
    out.mkdir()
    source = baseline["cfg"].output_dir
    for name in ("query_run.json", "topk.parquet", "opponents.parquet", "queries.parquet", "report.html",
                 "scores.npy", "scores.json"):
        shutil.copy2(f"{source}/{name}", out / name)
    return out


@pytest.mark.parametrize("name", ["topk.parquet", "opponents.parquet", "queries.parquet", "scores.json"])
def test_a_changed_byte_of_a_run_file_is_named_when_the_run_is_read(run_dir, name):
    Results.open(run_dir)  # intact: reads
    path = run_dir / name
    with flipped(path, path.stat().st_size // 2, 3):
        with pytest.raises(QueryRunError, match=name):
            Results.open(run_dir)


def test_a_changed_run_record_is_named(run_dir):
    record = run_dir / "query_run.json"
    text = record.read_text()
    record.write_text(text.replace('"queries": 6', '"queries": 7', 1))
    with pytest.raises(QueryRunError, match="query_run.json"):
        Results.open(run_dir)
