"""jobs/serve.py: one service answers several query files from stdin, loading its shards once."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq

from tests.jobs.test_ray_job_submit import ROOT


def test_serve_answers_query_files_from_stdin_without_reloading(baseline, tiny_assets, tmp_path):
    one = baseline["cfg"]
    bad = tmp_path / "missing.jsonl"
    stdin = f"{tiny_assets['queries']}\n{bad}\n{tiny_assets['queries']}\n"
    result = subprocess.run(
        [sys.executable, "jobs/serve.py", f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}",
         "model.device=cpu", "data.max_length=32", "query.top_k=5", "progress=false", "cluster.num_cpus=2",
         f"index_dir={one.index_path}", f"output_dir={one.output_dir}"],
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["batch"] for a in answers] == [0, 1, 2]
    assert "error" in answers[1] and "missing.jsonl" in answers[1]["error"]
    expected = pq.read_table(one.output_dir + "/topk.parquet").select(["query_id", "rank", "train_id"])
    for answer in (answers[0], answers[2]):
        assert pq.read_table(answer["topk_path"]).select(["query_id", "rank", "train_id"]).equals(expected)
    assert answers[0]["shard_loads"] == answers[2]["shard_loads"] == 2  # one load per query actor, ever
