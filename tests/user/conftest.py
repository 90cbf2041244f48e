"""Helpers of the user-facing tests: the jobs run as subprocesses with the arguments a user types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def job_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a job: this checkout importable, torch pinned to one thread, Ray's session folders
    under ``tmp_path/raytmp`` (Ray puts them under ``$RAY_TMPDIR/ray``: a job that starts Ray leaves one there),
    and an empty Hugging Face cache unless ``extra`` names another."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "RAY_TMPDIR": str(tmp_path / "raytmp"), "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("LORIF_RAY_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, **extra}


def start(job: str, *args: str, env: dict) -> subprocess.Popen:
    """``python jobs/<job>.py args...`` from the repository root, started (several may run at once)."""
    return subprocess.Popen([sys.executable, f"jobs/{job}.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(job: str, *args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start(job, *args, env=env), timeout)


def ray_started(tmp_path: Path) -> bool:
    """Whether a job with ``job_env(tmp_path)`` started a Ray instance (it left a session folder)."""
    return (tmp_path / "raytmp" / "ray").exists()


@pytest.fixture
def env(tmp_path):
    return job_env(tmp_path)
