"""Case 5 of issue 12: a writer killed (SIGKILL) mid-shard leaves a temporary file that dataset readers
skip, and the next writer removes it; a temporary file that a live writer holds is left alone."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq

from lorif_ray.store import ShardWriter

COLUMNS = {"h.0.u": 256, "h.0.v": 256}
LAYOUT = dict(kind="factors", columns=COLUMNS, dtype="float32", shard_size=20000, meta={"seed": 0})

WRITER = textwrap.dedent(f"""
    import sys, torch
    from lorif_ray.store import ShardWriter
    writer = ShardWriter(sys.argv[1], **{LAYOUT!r})
    rows = lambda n: {{c: torch.randn(n, w) for c, w in {COLUMNS!r}.items()}}
    writer.write_shard(0, [f"t{{i}}" for i in range(10)], rows(10))   # committed
    print("committed", flush=True)
    for shard in range(1, 1000):                                   # large shards, until killed
        writer.write_shard(shard, [f"t{{shard}}-{{i}}" for i in range(20000)], rows(20000))
""")


def temporaries(directory):
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_killed_writer_leaves_a_readable_directory_and_its_temporary_is_removed(tmp_path):
    index = tmp_path / "index"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(index)], stdout=subprocess.PIPE, text=True,
                             cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert child.stdout.readline().strip() == "committed"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in temporaries(index)) and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)  # in the middle of writing shard 1 (or a later one)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    stale = temporaries(index)
    assert stale and all(p.name.startswith(".shard-") for p in stale), stale
    table = pq.read_table(index)  # the directory still reads as a Parquet dataset: temporaries are skipped
    assert table.num_rows == 10 + 20000 * (len(list(index.glob("shard-*.parquet"))) - 1)
    # an older writer's name (no leading dot) and a temporary that a live writer holds
    (index / "shard-00007.parquet.tmp-0123456789ab").write_bytes(b"PAR1 partial")
    live = index / ".shard-00008.parquet.tmp-feedfeedfeed"
    with open(live, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ShardWriter(index, **LAYOUT)  # a new writer starts: removes what nobody holds
        assert temporaries(index) == [live]
    ShardWriter(index, **LAYOUT)
    assert temporaries(index) == []
