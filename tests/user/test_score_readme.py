"""notes/README-live.md's run block (jobs/score.py, on-the-fly scoring) runs as written, in a folder of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.user.conftest import ROOT, job_env

NOTES = ROOT / "notes" / "README-live.md"
BLOCK = re.compile(r"^<!-- readme-test: run -->\n```bash\n(.*?)^```", re.M | re.S)


def test_the_on_the_fly_block_runs_as_written_and_writes_a_query_run_without_an_index(tmp_path):
    [block] = BLOCK.findall(NOTES.read_text())
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=job_env(tmp_path), text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for out in ("out-live", "out-live-kfac"):
        topk = pq.read_table(tmp_path / out / "topk.parquet")
        assert topk.num_rows > 0 and all(topk.column("train_text").to_pylist())
        assert (tmp_path / out / "report.html").is_file() and not (tmp_path / out / "index").exists()
    assert "2 passes, no index" in (tmp_path / "out-live-kfac" / "score.log").read_text()
