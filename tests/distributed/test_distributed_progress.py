"""Progress that moves on Ray (issue 20, row 6): the actors report every batch / row block to the driver's
board (fire-and-forget), the driver's bar ends at exactly the rows done and never shows more, also when an
actor restarts and redoes its pass. Stage 1 (a gradient actor killed, its shards redone; with progress off
nothing reported) is tested with the kill itself, in test_distributed_index.py."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from lorif_ray.config import QueryConfig
from lorif_ray.distributed.curvature import RayGram, RemoteLayerGram
from lorif_ray.distributed.progress import ActorProgress, progress_board
from lorif_ray.distributed.query_service import ray_query
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.query import run_query
from tests.conftest import QUERY_CONFIG
from tests.distributed.conftest import NUM_WORKERS


def _reports(ray) -> int:
    """Reports the driver's board has received so far."""
    return ray.get(progress_board().received.remote())


def _only(bars: dict, desc: str):
    (bar,) = bars[desc]
    return bar


def _assert_exact(bar, total: int) -> None:
    """The bar ended at its total and never showed more."""
    assert bar.total == total and bar.n == total and bar.peak == total


def test_stage_two_counts_rows_of_every_pass_when_a_gram_actor_restarts(baseline, ray_cluster, recording_bars,
                                                                        monkeypatch):
    """Gram actors report their row blocks per pass; a pass Ray retries on a restarted actor counts from 0 again:
    the bar ends at (4 fit passes + 1 g'_t pass) x 48 rows and never shows more."""
    from lorif_ray.distributed.cluster import actor_options

    calls, real = [], RemoteLayerGram.__call__

    def crash_on_the_second_pass(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            ray_cluster.kill(self.workers[0], no_restart=False)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RemoteLayerGram, "__call__", crash_on_the_second_pass)
    cfg = baseline["config"]("progress_gram", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True))
    before = _reports(ray_cluster)
    options = actor_options(cfg.cluster, gpu=False, restartable=True)
    run_curvature(replace(cfg, progress=True), partial(RayGram, num_workers=NUM_WORKERS, actor_options=options))
    bar = _only(recording_bars, "stage 2: curvature")
    _assert_exact(bar, 5 * 48)
    assert len([n for n in bar.updates if n]) > 1  # more than once for the one layer group
    assert _reports(ray_cluster) - before >= 5 * NUM_WORKERS  # at least a row block per worker per pass


def test_stage_three_query_actors_report_each_row_block(baseline, ray_cluster, recording_bars):
    """The replica reports each batch of query gradients, each query actor each block of rows it loads and each
    block of rows it scores (7 rows: 5 blocks of its 30 rows, 3 of 18)."""
    cfg = baseline["config"]("progress_ray_query", with_curvature=True)
    before = _reports(ray_cluster)
    run_query(replace(cfg, progress=True), partial(ray_query, num_workers=NUM_WORKERS))
    _assert_exact(_only(recording_bars, "stage 3: query gradients (ray)"), 6)
    _assert_exact(_only(recording_bars, "stage 3: load rows (ray)"), 48)  # the actors read their shards once
    _assert_exact(_only(recording_bars, "stage 3: score (ray)"), 48)
    assert _reports(ray_cluster) - before >= 1 + NUM_WORKERS + 5 + 3


def test_progress_off_makes_no_board():
    progress = ActorProgress(None)
    assert progress.board is None and progress.wait_s is None and progress.start("shard 0", 10) is None
    progress.poll()
    progress.finish("shard 0")
