"""Fixtures for the store tests."""

import pytest
from store_helpers import write_index


@pytest.fixture
def index_dir(tmp_path):
    """A complete float32 index of 10 rows in 3 shards of 4."""
    directory = tmp_path / "index"
    write_index(directory, num_rows=10, shard_size=4)
    return directory
