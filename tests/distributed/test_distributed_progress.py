"""Progress that moves on Ray (issue 20, row 6): the actors report every batch / row block to the driver's
board (fire-and-forget), the driver's bar ends at exactly the rows done and never shows more, also when an
actor restarts and redoes its pass. Stage 1 (a gradient actor killed, its shards redone; with progress off
nothing reported) and stage 2 (a Gram actor restarted mid-pass) are tested with the kill itself, in
test_distributed_index.py and test_distributed_curvature.py."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from lorif_ray.distributed.progress import ActorProgress, progress_board
from lorif_ray.distributed.query_pool import ray_query
from lorif_ray.stages.query import run_query
from tests.distributed.conftest import NUM_WORKERS


def reports(ray) -> int:
    """Reports the driver's board has received so far."""
    return ray.get(progress_board().received.remote())


def only_bar(bars: dict, desc: str):
    (bar,) = bars[desc]
    return bar


def assert_exact(bar, total: int) -> None:
    """The bar ended at its total and never showed more."""
    assert bar.total == total and bar.n == total and bar.peak == total


def test_stage_three_query_actors_report_each_row_block(baseline, ray_cluster, recording_bars):
    """The replica reports each batch of query gradients, each query actor each block of rows it loads and each
    block of rows it scores (7 rows: 5 blocks of its 30 rows, 3 of 18)."""
    cfg = baseline["config"]("progress_ray_query", with_curvature=True)
    before = reports(ray_cluster)
    run_query(replace(cfg, progress=True), partial(ray_query, num_workers=NUM_WORKERS))
    assert_exact(only_bar(recording_bars, "stage 3: query gradients (ray)"), 6)
    assert_exact(only_bar(recording_bars, "stage 3: load rows (ray)"), 48)  # the actors read their shards once
    assert_exact(only_bar(recording_bars, "stage 3: score (ray)"), 48)
    assert reports(ray_cluster) - before >= 1 + NUM_WORKERS + 5 + 3


def test_progress_off_makes_no_board():
    progress = ActorProgress(None)
    assert progress.board is None and progress.wait_s is None and progress.start("shard 0", 10) is None
    progress.poll()
    progress.finish("shard 0")
