"""The jobs through their command line, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lorif_ray.store import read_table_meta

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_stages_as_separate_jobs_and_a_multirun(tiny_assets, tmp_path):
    common = [f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}", "data.max_length=32",
              f"data.queries={tiny_assets['queries']}", "progress=false", "cluster=none", f"output_dir={tmp_path / 'out'}"]
    assert "index: 48 examples" in _run("jobs/index.py", *common)
    again = _run("jobs/index.py", *common)  # a reused stage says so, with the timing of the run that built it
    assert "index: 48 examples" in again and "reused: complete and intact, nothing computed; built by an" in again
    assert "curvature:" in _run("jobs/curvature.py", *common, "r=8")
    assert "curvature: reused (fitted by an earlier run in" in _run("jobs/curvature.py", *common, "r=8")
    out = _run("jobs/query.py", *common, "r=8")
    assert "scored 6 queries x 48" in out and f"results: {tmp_path / 'out' / 'report.html'}" in out
    assert pq.read_table(tmp_path / "out" / "topk.parquet").num_rows == 6 * 10
    out = _run("jobs/attribute.py", "-m", "method=graddot,repsim", *common[:-1],
               f"output_dir={tmp_path}/sweep_${{method.name}}", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    assert "#1 : method=repsim" in out
    for m in ("graddot", "repsim"):
        assert (tmp_path / f"sweep_{m}" / "topk.parquet").exists()
    out = _run("jobs/attribute.py", "-m", "method=lorif", "curvature=kfac,ekfac", *common[:-1],
               f"output_dir={tmp_path}/sweep_${{curvature}}", f"hydra.sweep.dir={tmp_path / 'multirun_curvature'}")
    assert "#1 : method=lorif curvature=ekfac" in out
    for kind in ("kfac", "ekfac"):
        meta = read_table_meta(tmp_path / f"sweep_{kind}" / "topk.parquet")
        assert meta["config"]["curvature"] == kind and f"H_{kind.upper()}" in meta["score"]


def test_invalid_values_fail_at_start_up(tiny_assets, tmp_path):
    for bad, message in (("c=0", "c=0"), ("method=lorf", "lorf"), ("dtype=int8", "int8"), ("nonexistent_key=1", "nonexistent_key")):
        result = subprocess.run([sys.executable, "jobs/attribute.py", bad, f"model.path={tiny_assets['model']}",
                                 f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stdout + result.stderr, (bad, result.stderr[-500:])


def test_query_measurement_through_the_jobs_and_the_job_log(tiny_assets, tmp_path):
    """query.measurement=mean_loss through jobs/attribute.py gives each query's loss scores over its target-token
    count, is recorded in topk.parquet, and the job's log file holds the stage summaries (logging, not print).
    On Ray the measurement reaches the gradient replica with the same scores: tests/api/test_api_ray.py."""
    common = [f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}", "data.max_length=32",
              f"data.queries={tiny_assets['queries']}", "r=8", "query.full_scores=true", "progress=false",
              "model.device=cpu", "cluster=none", f"output_dir={tmp_path / 'one'}"]
    out = _run("jobs/attribute.py", *common, "query.measurement=mean_loss")
    one = np.load(tmp_path / "one" / "scores.npy")
    assert read_table_meta(tmp_path / "one" / "topk.parquet")["config"]["query"]["measurement"] == "mean_loss"
    log = (tmp_path / "one" / "attribute.log").read_text()
    assert "index: 48 examples" in log and "query: 6 queries x 48 training examples" in log
    assert "index: 48 examples" in out
    _run("jobs/query.py", *common)  # the loss, same index
    loss = np.load(tmp_path / "one" / "scores.npy")
    assert read_table_meta(tmp_path / "one" / "topk.parquet")["config"]["query"]["measurement"] == "loss"
    assert one.shape == loss.shape == (6, 48)
    counts = (loss * one).sum(1) / (one * one).sum(1)  # each query's target-token count (a row-wise fit)
    assert np.allclose(counts, np.round(counts), rtol=1e-4) and counts.max() > 1
    assert np.linalg.norm(loss - counts[:, None] * one) <= 1e-5 * np.linalg.norm(loss)
