"""Distributed Gram products and stage 2 equal the one-process results."""

from __future__ import annotations

import torch

from lorif_ray.distributed.rsvd import (
    GramWorker,
    distributed_gram,
    distributed_gram_apply,
    run_curvature_distributed,
    shard_groups,
    start_gram_workers,
)
from lorif_ray.math.rsvd import gram_from_batches
from lorif_ray.stages.curvature import layer_specs
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.store import iter_batches, load_tensors, open_index
from tests.distributed.conftest import NUM_WORKERS


def test_shard_groups_are_contiguous_balanced_and_cover_every_shard(baseline):
    manifest = open_index(baseline["cfg"].index_path)
    assert shard_groups(manifest, 2) == [[0, 1, 2], [3, 4]]
    assert shard_groups(manifest, 9) == [[0], [1], [2], [3], [4]]


def test_gram_workers_partial_sums_add_up_without_ray(baseline):
    cfg = baseline["cfg"]
    manifest = open_index(cfg.index_path)
    spec = layer_specs(manifest)[0]
    q = torch.randn(spec.dim, 5, dtype=torch.float64)
    workers = [GramWorker(cfg.index_path, g, batch_rows=4) for g in shard_groups(manifest, NUM_WORKERS)]
    whole = GramWorker(cfg.index_path, [r.index for r in manifest.shards])
    torch.testing.assert_close(sum(w.apply(spec.name, q) for w in workers), whole.apply(spec.name, q))
    torch.testing.assert_close(sum(w.gram(spec.name) for w in workers), whole.gram(spec.name))


def test_distributed_gram_equals_one_process(baseline, ray_cluster):
    cfg = baseline["cfg"]
    manifest = open_index(cfg.index_path)
    spec = layer_specs(manifest)[1]
    rows = (blocks_from_columns([spec], manifest.kind, cols)[spec.name].dense()
            for _, cols in iter_batches(cfg.index_path, [f"{spec.name}.u", f"{spec.name}.v"], out_dtype=torch.float64))
    expected = gram_from_batches(rows, spec.dim)
    workers = start_gram_workers(cfg.index_path, manifest, NUM_WORKERS, batch_rows=7)
    try:
        torch.testing.assert_close(distributed_gram(workers, spec.name), expected, rtol=1e-10, atol=1e-12)
        q = torch.randn(spec.dim, 4, dtype=torch.float64)
        torch.testing.assert_close(distributed_gram_apply(workers, spec.name)(q), expected @ q, rtol=1e-10, atol=1e-10)
    finally:
        for w in workers:
            ray_cluster.kill(w)


def test_distributed_curvature_equals_run_curvature(baseline, ray_cluster):
    one = baseline["cfg"]
    dist = baseline["config"]("dist_curvature")
    report = run_curvature_distributed(dist, num_workers=NUM_WORKERS)
    assert not report["reused"] and report["workers"] == NUM_WORKERS
    expected, expected_meta = load_tensors(one.curvature_path)
    actual, actual_meta = load_tensors(dist.curvature_path)
    assert {k: v for k, v in actual_meta.items() if k != "layers"} == \
        {k: v for k, v in expected_meta.items() if k != "layers"}
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
    assert run_curvature_distributed(dist, num_workers=NUM_WORKERS)["reused"]
