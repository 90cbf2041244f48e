"""Case 13 of issue 12: the driver's own raylet killed mid-stage. Before: the driver waited in ray.get and
ended with Ray's log noise only. Now one ``ClusterLostError`` line says what happened and that a re-run
resumes. A driver of its own (a subprocess with its own local Ray instance) is used, so the session's
cluster is untouched; only the raylet that subprocess started is killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import os, signal, subprocess, time
import ray
from lorif_ray.distributed.cluster import node_watch
from lorif_ray.errors import ClusterLostError

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
table = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True).stdout.splitlines()[1:]
raylet = next(int(row.split()[0]) for row in table if "raylet" in row and int(row.split()[1]) == os.getpid())

@ray.remote
def shard():
    time.sleep(600)

try:
    with node_watch("index", interval_s=1.0):
        ref = shard.remote()
        time.sleep(2)
        os.kill(raylet, signal.SIGKILL)
        ray.get(ref, timeout=120)
except ClusterLostError as error:
    print("LOST:", error, flush=True)
    os._exit(3)
"""


def test_a_dead_raylet_is_reported_in_one_line_that_says_a_rerun_resumes():
    result = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = [line for line in result.stdout.splitlines() if line.startswith("LOST:")]
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and "raylet died" in lines[0] and "during stage index" in lines[0]
    assert "re-run the same command to resume" in lines[0]
