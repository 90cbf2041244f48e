"""Case 11 of issue 12: a complete index on read-only storage is re-used by stage 1 without writing
anything (no `.manifest.lock`, no report, no manifest update)."""

from __future__ import annotations

import subprocess

import pytest

from lorif_ray.store.shards import LOCK_NAME
from tests.reliability.conftest import config


@pytest.fixture
def read_only_view(run_copy, tmp_path):
    """A read-only bind mount of the copied index (needs root); None where mounting is refused."""
    view = tmp_path / "read-only-index"
    view.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(run_copy.index_path), str(view)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)


def _snapshot(directory):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_finished_index_is_reused_without_writing(run_copy, tiny_assets, read_only_view, tmp_path):
    from lorif_ray.stages.index import run_index

    (run_copy.index_path / LOCK_NAME).unlink()
    before = _snapshot(run_copy.index_path)
    index_dir = read_only_view or run_copy.index_path
    if read_only_view is not None:
        with pytest.raises(OSError):  # really read-only
            (read_only_view / "probe").write_text("x")
    report = run_index(config(tiny_assets, tmp_path / "elsewhere", index_dir=str(index_dir)))
    assert report["computed"] == 0 and report["skipped_shards"] == 5 and report["examples"] == 48
    assert _snapshot(run_copy.index_path) == before  # no lock file, nothing rewritten
