"""A small local Ray cluster for the session (the one-process baseline lives in tests/conftest.py)."""

from __future__ import annotations

import pytest

NUM_WORKERS = 2


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
