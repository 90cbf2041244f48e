"""Fixtures for the reliability tests: a finished tiny index (real model, real Parquet shards), copied per test."""

from __future__ import annotations

import shutil

import pytest

from lorif_ray.config import ClusterConfig
from tests.stages.helpers import make_config

SHARD_SIZE = 10  # 48 training examples -> 5 shards


def config(assets, output_dir, **overrides):
    """A one-process (no Ray) config of the tiny model; shards of SHARD_SIZE examples."""
    overrides.setdefault("shard_size", SHARD_SIZE)
    return make_config(assets, output_dir, cluster=ClusterConfig(backend="none"), **overrides)


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """Output dir with a complete index of the tiny model (stage 1 runs once per module)."""
    from lorif_ray.stages.index import run_index

    cfg = config(tiny_assets, tmp_path_factory.mktemp("finished") / "out")
    run_index(cfg)
    return cfg


@pytest.fixture
def run_copy(finished_run, tiny_assets, tmp_path):
    """A private copy of `finished_run`'s outputs and its config."""
    out = tmp_path / "out"
    shutil.copytree(finished_run.output_dir, out)
    return config(tiny_assets, out)


def flip_bytes(path, count: int = 16, at: float = 0.5) -> int:
    """Inverts `count` bytes of a file starting at fraction `at` of its size; returns the offset."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return start
