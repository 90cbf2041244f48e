"""Progress that moves (issue 20, row 6), in one process: every stage's bar moves once per batch or row block,
and ends at exactly what it counted (stage 2: rows over every pass of every layer group, known up front)."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.stages.curvature import LocalGram, run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from lorif_ray.store import IndexFolder
from tests.conftest import QUERY_CONFIG, SHARD_SIZE
from tests.stages.helpers import counting_shard_reads, make_config


def _only(bars: dict, desc: str):
    (bar,) = bars[desc]
    return bar


def _moves(bar) -> list[int]:
    return [n for n in bar.updates if n]


def _assert_exact(bar, total: int) -> None:
    """The bar ended at its total and never showed more."""
    assert bar.total == total and bar.n == total and bar.peak == total and sum(bar.updates) == total


def test_stage_one_moves_once_per_batch(tiny_assets, tmp_path, recording_bars):
    cfg = replace(make_config(tiny_assets, tmp_path / "index", shard_size=SHARD_SIZE,
                              cluster=ClusterConfig(backend="none")), progress=True)
    run_index(cfg)
    bar = _only(recording_bars, "stage 1: index")
    batch = cfg.data.batch_size
    batches = sum(math.ceil(min(SHARD_SIZE, 48 - start) / batch) for start in range(0, 48, SHARD_SIZE))
    moves = _moves(bar)  # (the first update adds the rows of shards already done: none)
    assert len(moves) == batches == 9 and max(moves) <= batch
    _assert_exact(bar, 48)


@pytest.mark.parametrize("curvature", ["woodbury", "ekfac", "exact"])
def test_stage_two_counts_rows_over_every_pass_it_makes(baseline, recording_bars, curvature):
    """Streamed rows (7-row blocks): the bar moves per row block, many times per layer group (all 8 layers are one
    group here), and its total, fixed before the first pass, is the rows the passes read (shard files opened)."""
    cfg = replace(baseline["config"](f"progress_{curvature}", curvature=curvature), progress=True)
    with counting_shard_reads() as opened:
        run_curvature(cfg, partial(LocalGram, resident=False))
    bar = _only(recording_bars, "stage 2: curvature")
    manifest = IndexFolder(cfg.index_path).manifest()
    passes = len(opened) // len(manifest.shards)
    assert len(opened) == passes * len(manifest.shards) and passes == {"woodbury": 4, "ekfac": 1, "exact": 1}[curvature]
    _assert_exact(bar, passes * manifest.num_rows)
    blocks_per_pass = sum(math.ceil(r.rows / QUERY_CONFIG["train_batch_rows"]) for r in manifest.shards)
    assert len(_moves(bar)) == passes * blocks_per_pass > 1


def test_stage_two_counts_the_coordinates_pass(baseline, recording_bars):
    """With query.store_coordinates g'_t is written by one more pass over the rows, counted too."""
    cfg = baseline["config"]("progress_coordinates", query=replace(baseline["cfg"].query, store_coordinates=True))
    run_curvature(replace(cfg, progress=True))
    _assert_exact(_only(recording_bars, "stage 2: curvature"), (4 + 1) * 48)


@pytest.mark.parametrize("resident", [False, True])
def test_stage_three_moves_per_batch_of_queries_and_block_of_rows(baseline, recording_bars, resident):
    """Streamed rows are scored as they are read; resident ones (query.resident) are read first, with a bar too."""
    query = QueryConfig(**QUERY_CONFIG, resident=resident)
    cfg = replace(baseline["config"](f"progress_query_{resident}", with_curvature=True, query=query), progress=True)
    run_query(cfg)
    queries = _only(recording_bars, "stage 3: query gradients")
    _assert_exact(queries, 6)
    score = _only(recording_bars, "stage 3: score")
    _assert_exact(score, 48)
    assert len(_moves(score)) >= math.ceil(48 / QUERY_CONFIG["train_batch_rows"])
    assert ("stage 3: load rows" in recording_bars) == resident
    if resident:
        _assert_exact(_only(recording_bars, "stage 3: load rows"), 48)


def test_progress_off_draws_no_bar(baseline, recording_bars):
    run_query(baseline["config"]("progress_off", with_curvature=True))
    assert recording_bars and not any(bar.enabled for bars in recording_bars.values() for bar in bars)
