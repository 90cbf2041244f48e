"""Stage 2 on Ray: Gram workers' partial sums add up to the one-process pass, and the one driver with the Ray
backend writes the one-process curvature; streamed workers read each shard once per pass for all layers."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from lorif_ray.config import QueryConfig
from lorif_ray.distributed.gram import GramWorker, RayGram, RemoteLayerGram, shard_groups
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.rows import ParquetRows
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.conftest import QUERY_CONFIG
from tests.distributed.conftest import NUM_WORKERS
from tests.distributed.test_distributed_progress import assert_exact, only_bar, reports
from tests.stages.helpers import counting_shard_reads


def test_shard_groups_are_contiguous_balanced_and_cover_every_shard(baseline):
    manifest = IndexFolder(baseline["cfg"].index_path).manifest()
    assert shard_groups(manifest, 2) == [[0, 1, 2], [3, 4]]
    assert shard_groups(manifest, 9) == [[0], [1], [2], [3], [4]]


def test_gram_workers_partial_sums_add_up_without_ray(baseline):
    cfg = baseline["cfg"]
    manifest = IndexFolder(cfg.index_path).manifest()
    spec = layer_specs(manifest)[0]
    other = layer_specs(manifest)[2]
    q = torch.randn(spec.dim, 5, dtype=torch.float64)
    layers = [spec.name, other.name]
    for resident in (False, True):
        workers = [GramWorker(cfg, g, resident=resident) for g in shard_groups(manifest, NUM_WORKERS)]
        whole = GramWorker(cfg, [r.index for r in manifest.shards], resident=resident)
        parts = [w.run(layers, {spec.name: q}, {other.name: torch.float64}) for w in workers]
        expected = whole.run(layers, {spec.name: q}, {other.name: torch.float64})
        for name in layers:
            torch.testing.assert_close(sum(p[name] for p in parts), expected[name])


def test_streamed_workers_read_each_shard_once_per_pass_for_all_layers(baseline):
    """A worker whose rows are streamed reads each of its shards once per pass, whatever the number of layers
    it fits (the files it opens are counted); resident rows are read once."""
    cfg = baseline["cfg"]
    manifest = IndexFolder(cfg.index_path).manifest()
    specs = layer_specs(manifest)
    layers = [s.name for s in specs]
    with counting_shard_reads() as opened:
        worker = GramWorker(cfg, [0, 1, 2], resident=False)
        queries = {s.name: torch.randn(s.dim, 4, dtype=torch.float64) for s in specs}
        for _ in range(3):
            worker.run(layers, queries)
        assert isinstance(worker.current[1].rows, ParquetRows) and worker.passes() == 3 and len(layers) == 8
        assert sorted(opened) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        opened.clear()
        resident = GramWorker(cfg, [0, 1, 2], resident=True)
        for _ in range(3):
            resident.run(layers, queries)
        assert sorted(opened) == [0, 1, 2]


def test_distributed_gram_equals_one_process(baseline, ray_cluster):
    cfg = baseline["cfg"]
    manifest = IndexFolder(cfg.index_path).manifest()
    spec = layer_specs(manifest)[1]
    whole = GramWorker(cfg, [r.index for r in manifest.shards])
    backend = RayGram(cfg, manifest, None, "cpu", num_workers=NUM_WORKERS)
    try:
        remote = backend.layers([spec])
        assert isinstance(remote, RemoteLayerGram)
        q = torch.randn(spec.dim, 4, dtype=torch.float64)
        got = remote({spec.name: q})[spec.name]
        torch.testing.assert_close(got, whole.run([spec.name], {spec.name: q})[spec.name], rtol=1e-10, atol=1e-10)
        gram = remote(grams={spec.name: torch.float64})[spec.name]
        torch.testing.assert_close(gram, whole.run([spec.name], grams={spec.name: torch.float64})[spec.name],
                                   rtol=1e-10, atol=1e-12)
    finally:
        backend.close()


def test_the_ray_backend_writes_the_one_process_curvature(baseline, ray_cluster, monkeypatch):
    """With a group budget of one layer (the driver holds one layer's iterates, and writes its file before the next
    layer's fit starts: never more than one group's V_r), the Ray Gram actors give the one-process curvature."""
    import lorif_ray.stages.curvature as stage
    from lorif_ray.store.curvature_folder import CurvatureWriter

    events, real_fit, real_write = [], stage.fit_layers, CurvatureWriter.write
    monkeypatch.setattr(stage, "GROUP_BYTES", 1)
    monkeypatch.setattr(stage, "fit_layers", lambda steps, *a: events.append(("fit", list(steps))) or real_fit(steps, *a))
    monkeypatch.setattr(CurvatureWriter, "write", lambda self, name, c: events.append(("write", name)) or
                        real_write(self, name, c))
    one = baseline["cfg"]
    dist = baseline["config"]("dist_curvature")
    report = run_curvature(dist, partial(RayGram, num_workers=NUM_WORKERS))
    assert not report["reused"]
    layers = [s.name for s in layer_specs(IndexFolder(dist.index_path).manifest())]
    assert events == [e for name in layers for e in (("fit", [name]), ("write", name))]
    expected, expected_meta = CurvatureFolder(one.curvature_path).read_all()
    actual, actual_meta = CurvatureFolder(dist.curvature_path).read_all()
    assert {k: v for k, v in actual_meta.items() if k not in ("layers", "seconds")} == \
        {k: v for k, v in expected_meta.items() if k not in ("layers", "seconds")}  # same settings, policy, index
    for layer, want in expected_meta["layers"].items():
        got = actual_meta["layers"][layer]
        assert (got["kind"], got["rank"]) == (want["kind"], want["rank"])
        assert abs(got["damping"] - want["damping"]) <= 1e-6 * want["damping"]
    assert set(actual) == set(expected)
    for layer in expected_meta["layers"]:
        values, want_values = actual[f"{layer}.values"], expected[f"{layer}.values"]
        assert (values - want_values).norm() <= 1e-6 * want_values.norm(), layer
        # r = 64 exceeds rank(G) ≤ N = 48, so the trailing vectors span G's null space in an arbitrary
        # basis (their Woodbury weights are ~0): compare V diag(σ²) Vᵀ, which fixes the top subspace.
        vectors, want_vectors = actual[f"{layer}.vectors"], expected[f"{layer}.vectors"]
        operator, want_operator = (vectors * values) @ vectors.T, (want_vectors * want_values) @ want_vectors.T
        assert (operator - want_operator).norm() <= 1e-6 * want_operator.norm(), layer
        # where the spectrum is well separated the vectors themselves agree (up to sign)
        top = 8
        signs = torch.sign((vectors[:, :top] * want_vectors[:, :top]).sum(dim=0))
        assert (vectors[:, :top] * signs - want_vectors[:, :top]).norm() <= 1e-6 * top ** 0.5, layer
    assert run_curvature(dist, partial(RayGram, num_workers=NUM_WORKERS))["reused"]


def test_ekfac_on_ray_equals_one_process(baseline, ray_cluster):
    """method=lorif curvature=ekfac: the Gram actors' partial Λ* add up to the one-process pass over the rows."""
    one = baseline["config"]("ekfac_one", curvature="ekfac")
    dist = baseline["config"]("ekfac_ray", curvature="ekfac")
    run_curvature(one)
    run_curvature(dist, partial(RayGram, num_workers=NUM_WORKERS))
    expected, expected_meta = CurvatureFolder(one.curvature_path).read_all()
    actual, actual_meta = CurvatureFolder(dist.curvature_path).read_all()
    assert {v["kind"] for v in actual_meta["layers"].values()} == {"ekfac"}
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        assert (actual[name] - want).abs().max() <= 1e-10 * want.abs().max(), name


def test_a_gram_actor_killed_mid_stage_two_is_restarted_and_the_curvature_and_its_bar_are_exact(
        baseline, ray_cluster, recording_bars, monkeypatch):
    """Ray restarts a crashed Gram actor (the stage's actor options) and retries its pass: a pure function of its
    shards' rows and Q, so the curvature equals the one-process one. The actors report their row blocks per pass
    and a retried pass counts from 0 again: the bar ends at (4 fit passes + 1 g'_t pass) x 48 rows and never shows
    more (issue 20, row 6)."""
    from lorif_ray.distributed.cluster import actor_options

    calls, real = [], RemoteLayerGram.__call__

    def crash_on_the_second_pass(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            ray_cluster.kill(self.workers[0], no_restart=False)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RemoteLayerGram, "__call__", crash_on_the_second_pass)
    cfg = baseline["config"]("gram_killed", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True))
    before = reports(ray_cluster)
    options = actor_options(cfg.cluster, gpu=False, restartable=True)
    run_curvature(replace(cfg, progress=True), partial(RayGram, num_workers=NUM_WORKERS, actor_options=options))
    expected, _ = CurvatureFolder(baseline["cfg"].curvature_path).read_all()
    actual, _ = CurvatureFolder(cfg.curvature_path).read_all()
    assert len(calls) > 2 and actual.keys() == expected.keys()
    for name in (n for n in expected if n.endswith(".values")):
        assert (actual[name] - expected[name]).norm() <= 1e-6 * expected[name].norm(), name
    bar = only_bar(recording_bars, "stage 2: curvature")
    assert_exact(bar, 5 * 48)
    assert len([n for n in bar.updates if n]) > 1  # more than once for the one layer group
    assert reports(ray_cluster) - before >= 5 * NUM_WORKERS  # at least a row block per worker per pass
