"""Case 5 of issue 21: two runs at once into one output_dir. Each stage now holds an exclusive writer lock on the
folder it writes (stage 1: the index folder, stage 2: the curvature folder, stage 3: the query outputs in
output_dir), so a second run fails at once naming the holder; readers take none. And the dead end it led to
(an index marked complete with K-FAC statistics for 4 of its 5 shards, which stage 2 refused and stage 1
reused as it was) cannot happen: a shard with a committed record has its statistics, or it is not done."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import pytest

from lorif_ray.errors import FolderLockedError, IndexMismatchError, MissingShardError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.store.index_folder import STATISTICS_NAME
from lorif_ray.stages.query import run_query
from lorif_ray.store import IndexFolder, Manifest
from tests.reliability.conftest import config

HOLDER = textwrap.dedent("""
    import sys
    from lorif_ray.store.locks import writer_lock
    with writer_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


@contextmanager
def another_run_holding(folder, name: str, purpose: str):
    """A second process that holds ``folder``'s writer lock ``name`` (as a run of that stage does) for the body;
    yields its pid."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name, purpose], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=60)


@pytest.mark.parametrize("stage", ["index", "curvature", "query"])
def test_a_second_writer_fails_at_once_naming_the_holder(run_copy, stage):
    if stage == "index":  # a complete index is reused without any lock: make it need work
        (run_copy.index_path / "shard-00004.parquet").unlink()
        folder, run = run_copy.index_path, run_index
    elif stage == "curvature":
        folder, run = run_copy.curvature_path, run_curvature
    else:
        run_curvature(run_copy)
        folder, run = run_copy.output_dir, run_query
    purpose = {"index": "stage 1 (jobs/index.py)", "curvature": "stage 2 (jobs/curvature.py)",
               "query": "stage 3 (jobs/query.py)"}[stage]
    with another_run_holding(folder, stage, purpose) as pid:
        start = time.perf_counter()
        with pytest.raises(FolderLockedError, match=rf"{folder} is being written by another run: {re.escape(purpose)}, "
                                                    rf"pid {pid} on host {socket.gethostname()} since .* ago") as caught:
            run(run_copy)
        assert time.perf_counter() - start < 30 and "\n" not in str(caught.value)  # at once, in one line
    if stage == "index":
        assert not (run_copy.index_path / "shard-00004.parquet").exists()  # nothing was done
        assert run_index(run_copy)["computed"] == 8  # the lock went with its holder


def test_readers_need_no_lock(run_copy):
    """Stage 2 reads an index whose writer lock is held, stage 3 a curvature whose writer lock is held."""
    with another_run_holding(run_copy.index_path, "index", "stage 1 (jobs/index.py)"):
        assert not run_curvature(run_copy)["reused"]
    with another_run_holding(run_copy.curvature_path, "curvature", "stage 2 (jobs/curvature.py)"):
        assert run_query(run_copy)["queries"] == 6


def test_a_shard_without_its_statistics_is_not_done(run_copy, tiny_assets, monkeypatch):
    """The statistics of shard 4 get lost (as two runs folding at once lost them): the index can no longer be
    marked complete; the state the race left (complete, statistics of 4 of 5 shards) is refused by stage 2 as
    before, but re-running stage 1 now recomputes shard 4 alone, and the statistics are the clean run's."""

    kfac = config(tiny_assets, run_copy.output_dir, curvature="kfac")
    layers = [layer["name"] for layer in Manifest.load(run_copy.index_path).meta["layers"]]
    clean = IndexFolder(run_copy.index_path).read_statistics(range(5), layers)
    (run_copy.index_path / STATISTICS_NAME).unlink()  # every shard now lacks its statistics: all are redone
    write = IndexFolder.write_shard_statistics
    monkeypatch.setattr(IndexFolder, "write_shard_statistics",
                        lambda folder, shard, stats: shard == 4 or write(folder, shard, stats))
    with pytest.raises(MissingShardError, match=r"shards \[4\] of 0\.\.4 are not written"):
        run_index(run_copy)  # shard 4 has a committed record but no statistics: not done, not finalized
    monkeypatch.undo()
    assert not Manifest.load(run_copy.index_path).complete
    IndexFolder(run_copy.index_path).fold_statistics(lambda shard: shard < 4)  # the race's dead end: 4 of 5 shards
    manifest = Manifest.load(run_copy.index_path)
    manifest.complete, manifest.num_rows = True, 48
    manifest.save(run_copy.index_path)
    with pytest.raises(IndexMismatchError, match="cover 4 of its 5 shards; re-run stage 1"):
        run_curvature(kfac)
    report = run_index(run_copy)  # before: "0 computed, 5 reused", and the index stayed unusable for K-FAC
    assert report["computed"] == 8 and report["skipped_shards"] == 4  # shard 4: rows 40-47
    healed = IndexFolder(run_copy.index_path).read_statistics(range(5), layers)
    assert all(healed[n][field].equal(clean[n][field]) for n in layers
               for field in ("activations", "gradients", "tokens"))
    assert not run_curvature(kfac)["reused"]
