"""`ray job submit` against a real head node started for the test (not the session's ray.init)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.fixture
def head_node():
    """`ray start --head --num-cpus 2` on free ports and its own temp dir; every process it started
    is killed afterwards (`ray stop` would also stop the test session's own Ray)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(_free_port()),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         # the session's own Ray already holds the default agent ports on this machine
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{dashboard}/api/version", 120)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        mine = [p for p in psutil.process_iter(["pid", "cmdline"])
                if p.info["pid"] == head.pid or temp_dir in " ".join(p.info["cmdline"] or [])]
        for process in mine:
            process.kill()
        psutil.wait_procs(mine, timeout=30)


def _submit(head_node, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (the dashboard answers first)."""
    command = [str(BIN / "ray"), "job", "submit", "--address", head_node["address"], "--working-dir", str(ROOT),
               "--", *entrypoint]
    deadline = time.time() + 120
    while True:
        result = subprocess.run(command, env=head_node["env"], capture_output=True, text=True, timeout=400)
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


def test_attribute_job_through_ray_job_submit(head_node, tiny_assets, tmp_path):
    out = tmp_path / "submitted"
    result = _submit(head_node, sys.executable, "jobs/attribute.py", "cluster.address=auto",
                     f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}", "data.max_length=32",
                     f"data.queries={tiny_assets['queries']}", "model.device=cpu", "query.full_scores=true",
                     "progress=false", f"output_dir={out}")
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in log, log[-3000:]
    assert "Connecting to existing Ray cluster" in log  # joined the head node, did not start its own
    topk = pq.read_table(out / "topk.parquet")
    assert topk.num_rows == 6 * 10 and set(topk.column("train_id").to_pylist()) <= {f"t{i}" for i in range(48)}
    scores = np.load(out / "scores.npy")
    assert scores.shape == (6, 48) and np.isfinite(scores).all()
