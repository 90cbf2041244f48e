"""Stage 1 on Ray: gradient actors + factorization pool write the one-process index, survive dead
actors, and the whole Ray pipeline gives the one-process top-k and scores."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lorif_ray.data.examples as examples_module
from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.data import load_examples
from lorif_ray.errors import ConfigError
from lorif_ray.distributed.featurize import RayFeaturize
from lorif_ray.distributed.backends import run_stage
from lorif_ray.stages.attribute import run_attribute
from lorif_ray.stages.index import run_index
from lorif_ray.store import IndexFolder, Manifest
from tests.conftest import QUERY_CONFIG, SHARD_SIZE
from tests.stages.helpers import index_columns, make_config


def _config(tiny_assets, root, name, **cluster):
    options = dict(backend="ray", gradient_actors=2, writer_actors=1, gram_actors=2, query_actors=2)
    return make_config(tiny_assets, root / name, shard_size=SHARD_SIZE, query=QueryConfig(**QUERY_CONFIG),
                       cluster=ClusterConfig(**{**options, **cluster}))


def _after_each_commit(hook):
    """``RayFeaturize`` calling ``hook(record, backend)`` once the driver has committed each record (the fault
    tests kill actors from it)."""

    class Hooked(RayFeaturize):
        def shards(self, *args):
            for record in super().shards(*args):
                yield record  # the driver commits it before it asks for the next
                hook(record, self)

    return Hooked


def _assert_same_index(actual_dir, expected_dir, rtol=1e-6, same_bytes=True):
    """Same rows (within ``rtol``; ``same_bytes``: every shard file byte for byte), ids, row table and K-FAC
    statistics (within ``rtol``: folded in another order)."""
    if same_bytes:
        actual, expected = (IndexFolder(d).manifest() for d in (actual_dir, expected_dir))
        assert [r.sha256 for r in actual.shards] == [r.sha256 for r in expected.shards]
    actual, expected = index_columns(actual_dir), index_columns(expected_dir)
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max())
        assert float((actual[name] - expected[name]).abs().max()) <= rtol * scale, name
    assert IndexFolder(actual_dir).ids() == IndexFolder(expected_dir).ids()
    rows = [pq.read_table(IndexFolder(d).row_table_path) for d in (actual_dir, expected_dir)]  # by the plan's task
    assert rows[0].equals(rows[1]) and rows[0].column("example_id").to_pylist() == IndexFolder(expected_dir).ids()
    _assert_same_statistics(actual_dir, expected_dir, rtol)


def _assert_same_statistics(actual_dir, expected_dir, rtol):
    """The K-FAC statistics: every shard's exactly once (same shards, same token counts), same sums."""
    (actual, shards), (expected, expected_shards) = (IndexFolder(d).folded_statistics()
                                                     for d in (actual_dir, expected_dir))
    assert shards == expected_shards == {r.index for r in IndexFolder(expected_dir).manifest().shards}
    assert actual.keys() == expected.keys() and expected
    assert not list(IndexFolder(actual_dir).statistics_dir.glob("*.safetensors"))  # every shard's file folded
    for layer, stats in expected.items():
        assert all(actual[layer][count].equal(stats[count]) for count in ("tokens", "examples"))
        for name in ("activations", "gradients"):
            value, reference = actual[layer][name], stats[name]
            assert float((value - reference).abs().max()) <= rtol * float(reference.abs().max()), (layer, name)


def test_ray_pipeline_equals_the_one_process_pipeline(tiny_assets, baseline, ray_cluster):
    """2 gradient actors, 2 Gram actors, 2 query actors: same top-k ids, scores within 1e-5."""
    cfg = _config(tiny_assets, baseline["root"], "ray_pipeline")
    report = run_attribute(cfg, run_stage)
    assert report["index"]["gradient_actors"] == 2 and report["query"]["workers"] == 2
    one = baseline["cfg"]
    expected = pq.read_table(one.output_dir + "/topk.parquet").to_pydict()
    actual = pq.read_table(cfg.output_dir + "/topk.parquet").to_pydict()
    for column in ("query_id", "rank", "train_id"):
        assert actual[column] == expected[column], column
    scores, expected_scores = np.load(cfg.output_dir + "/scores.npy"), np.load(one.output_dir + "/scores.npy")
    assert np.abs(scores - expected_scores).max() <= 1e-5 * np.abs(expected_scores).max()
    _assert_same_index(cfg.index_path, one.index_path)


def test_factorization_pool_gives_the_fused_factors(tiny_assets, baseline, ray_cluster):
    """Not fused: gradient actors ship the captured (A, B) and two pool actors factorize and write."""
    cfg = _config(tiny_assets, baseline["root"], "pool", fused=False, writer_actors=2)
    report = run_index(cfg, RayFeaturize)
    assert (report["fused"], report["writer_actors"], report["computed"]) == (False, 2, 48)
    _assert_same_index(cfg.index_path, baseline["cfg"].index_path)


_OPENED: list[str] | None = None  # what this process opens while ``opened_by_the_driver`` records
_HOOKED = False


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None:
        _OPENED.append(str(args[0]))


@contextmanager
def opened_by_the_driver():
    """The paths this process (the driver; Ray's actors and tasks are others) opens through Python inside the
    block. An audit hook stays for the session, so one is added once and records only inside a block."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record_open)
        _HOOKED = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.mark.parametrize("kind", ["jsonl"])  # "parquet" holds too; its shard reads are tested in one process
def test_the_driver_never_reads_the_training_input(tiny_assets, baseline, ray_cluster, tmp_path, monkeypatch, kind):
    """A Ray task plans the shards (hash, checks, row ranges) and each replica reads and tokenizes its own
    rows: the driver opens no byte of the input (audited opens: the hash and JSON Lines reads go through
    Python) and reads no row (pyarrow's opens are not audited: every row reader goes through
    ``examples.iter_rows``, patched in the driver only), and the index is the one-process one."""
    train = tmp_path / f"train.{kind}"
    if kind == "jsonl":
        train.write_bytes(Path(tiny_assets["train"]).read_bytes())
    else:
        rows = [json.loads(line) for line in Path(tiny_assets["train"]).read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), train, row_group_size=7)
    read_by_driver, real = [], examples_module.iter_rows
    monkeypatch.setattr(examples_module, "iter_rows",
                        lambda path, *args: read_by_driver.append(path) or real(path, *args))
    cfg = _config({**tiny_assets, "train": train}, tmp_path, "driver")
    with opened_by_the_driver() as opened:
        report = run_index(cfg, RayFeaturize)
    assert not [path for path in opened if path.startswith(str(train))], opened
    assert read_by_driver == [] and report["computed"] == 48
    _assert_same_index(cfg.index_path, baseline["cfg"].index_path)


def _expected_ids(tiny_assets) -> list[str]:
    return [e.id for e in load_examples(tiny_assets["train"])]


@pytest.mark.parametrize("which", ["gradient", "writer"])
def test_an_actor_killed_mid_index_loses_and_duplicates_nothing(tiny_assets, baseline, ray_cluster, which,
                                                                 recording_bars):
    """Kill an actor for good after the first committed shard: the driver requeues its work on a
    replacement; every training id is in the store exactly once. With progress (the gradient case) the actors
    report every batch and the bar never counts a requeued shard twice: it ends at 48 and never shows more; without
    (the writer case) nothing is reported."""
    from lorif_ray.distributed.progress import progress_board

    progress = which == "gradient"
    cfg = replace(_config(tiny_assets, baseline["root"], f"killed_{which}", inflight_per_actor=1), progress=progress)
    reports = lambda: ray_cluster.get(progress_board().received.remote())  # noqa: E731
    before, killed = reports(), []

    def kill_first(record, backend):
        if not killed:
            actor = (backend.gradient_actors if which == "gradient" else backend.writer_actors)[0]
            ray_cluster.kill(actor, no_restart=True)
            killed.append(record.index)

    report = run_index(cfg, _after_each_commit(kill_first))
    assert killed and report["replaced_actors"] >= 1
    ids = IndexFolder(cfg.index_path).ids()
    assert sorted(ids) == sorted(_expected_ids(tiny_assets)) and len(ids) == len(set(ids)) == 48
    assert ids == _expected_ids(tiny_assets)  # in input order: shard i holds rows [10 i, 10 i + 10)
    _assert_same_index(cfg.index_path, baseline["cfg"].index_path)
    (bar,) = recording_bars["stage 1: index (ray)"]
    if progress:
        assert (bar.total, bar.n, bar.peak) == (48, 48, 48)
        assert reports() - before >= 4 * 2 + 1  # a report per batch: 2 batches of 8 per shard of 10, 1 of the last 8
    else:
        assert not bar.enabled and reports() == before


def test_ray_restarts_a_crashed_actor_and_retries_its_calls(tiny_assets, baseline, ray_cluster):
    """A crash Ray may restart (``no_restart=False``): the in-flight calls are retried by Ray itself."""
    cfg = _config(tiny_assets, baseline["root"], "restarted")
    crashed = []

    def crash_once(record, backend):
        if not crashed:
            ray_cluster.kill(backend.gradient_actors[1], no_restart=False)
            crashed.append(record.index)

    report = run_index(cfg, _after_each_commit(crash_once))
    assert crashed and report["computed"] == 48
    assert IndexFolder(cfg.index_path).ids() == _expected_ids(tiny_assets)


def test_a_rerun_recomputes_only_the_missing_shards(tiny_assets, baseline, ray_cluster):
    cfg = _config(tiny_assets, baseline["root"], "resumed", gradient_actors=1)
    run_index(cfg, RayFeaturize)
    manifest = Manifest.load(cfg.index_path)  # as if the run had died before committing shard 3
    manifest.shards = [s for s in manifest.shards if s.index != 3]
    manifest.complete, manifest.num_rows = False, None
    manifest.save(cfg.index_path)
    report = run_index(cfg, RayFeaturize)
    assert (report["computed"], report["skipped_shards"]) == (SHARD_SIZE, 4)
    assert IndexFolder(cfg.index_path).manifest(verify=True).num_rows == 48
    _assert_same_index(cfg.index_path, baseline["cfg"].index_path)


def test_a_pipeline_a_joined_cluster_cannot_place_fails_after_the_placement_timeout(tiny_assets, baseline,
                                                                                    ray_cluster):
    """A joined cluster may still be booting nodes, so it is waited for (cluster.placement_timeout_s), then
    refused in one line: what was asked, what the cluster has."""
    cfg = _config(tiny_assets, baseline["root"], "too_big", cpus_per_actor=3.0, placement_timeout_s=2.0)
    cfg = replace(cfg, cluster=replace(cfg.cluster, address="auto"))  # as under `ray job submit` (already connected)
    with pytest.raises(ConfigError, match=r"cannot place a model replica .*\(3 CPUs, 0 GPUs in 1 bundle.*within 2 s: "
                                          r"the cluster has 2 CPUs"):
        run_index(cfg, RayFeaturize)


def test_ray_pipeline_with_a_lora_adapter_equals_the_one_process_pipeline(tiny_assets, baseline, ray_cluster,
                                                                           tmp_path):
    """model.adapter through gradient actors, Gram actors and query actors (the query gradients on a
    replica that attaches it too): the one-process index and top-k."""
    from transformers import AutoModelForCausalLM

    from tests.model.test_adapters import TARGETS, write_adapter

    write_adapter(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), tmp_path / "adapter", TARGETS["gpt2"])
    ray_cfg = _config(tiny_assets, baseline["root"], "ray_lora")
    ray_cfg = replace(ray_cfg, model=replace(ray_cfg.model, adapter=str(tmp_path / "adapter")))
    one = replace(ray_cfg, output_dir=str(baseline["root"] / "one_lora"), cluster=ClusterConfig(backend="none"))
    run_attribute(one)
    run_attribute(ray_cfg, run_stage)
    _assert_same_index(ray_cfg.index_path, one.index_path)
    assert all(name.endswith((".lora_A", ".lora_B")) for name in IndexFolder(ray_cfg.index_path).settings.layer_names)
    expected = pq.read_table(one.output_dir + "/topk.parquet").to_pydict()
    actual = pq.read_table(ray_cfg.output_dir + "/topk.parquet").to_pydict()
    assert actual["train_id"] == expected["train_id"]
    np.testing.assert_allclose(actual["score"], expected["score"], rtol=1e-5)
