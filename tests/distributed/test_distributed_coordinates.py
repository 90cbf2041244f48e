"""Stored g'_t on Ray: stage-2 workers write their own rows, and query actors score against them holding
no V_r for scoring (each projects queries for a share of the layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.distributed.gram import GramWorker, shard_groups
from lorif_ray.distributed.query_pool import QueryPool
from lorif_ray.distributed.backends import run_stage
from lorif_ray.math.rsvd import randomized_spectrum
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs, query_config
from lorif_ray.stages.query import run_query
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.outputs.query_outputs import OutputFiles
from lorif_ray.stages.curvature import load_curvature
from lorif_ray.store import CurvatureFolder, IndexFolder
from lorif_ray.store.curvature_folder import ranks, write_rows
from lorif_ray.store.schema import factor_columns
from tests.conftest import QUERY_CONFIG
from tests.distributed.conftest import NUM_WORKERS


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _exact_coordinates(cfg) -> dict[str, torch.Tensor]:
    """G V_r per low-rank layer in float64, from the stored rows and the saved curvature."""
    index = IndexFolder(cfg.index_path)
    manifest = index.manifest()
    curvature = load_curvature(CurvatureFolder(cfg.curvature_path), cfg, manifest, "cpu", torch.float64)
    rows = {k: torch.cat([c[k] for _, c in index.batches(out_dtype=torch.float64, manifest=manifest)])
            for k in manifest.columns}
    blocks = blocks_from_columns(layer_specs(manifest), manifest.kind, rows)
    return {n: blocks[n].dense() @ curvature[n].vectors for n in blocks}


def test_gram_workers_write_their_own_rows_in_one_pass(baseline, tmp_path):
    """Each worker writes g'_t of its rows with one more pass over them."""
    cfg = baseline["cfg"]
    manifest = IndexFolder(cfg.index_path).manifest()
    spec = next(s for s in layer_specs(manifest) if s.dim > 64 + 10)  # a layer on the randomized path
    workers = [GramWorker(cfg, group, resident=False) for group in shard_groups(manifest, NUM_WORKERS)]
    apply = lambda q: sum(w.run([spec.name], {spec.name: q})[spec.name] for w in workers)  # noqa: E731
    spectrum = randomized_spectrum(apply, spec.dim, 16, oversample=4, power_iters=2, seed=0, name=spec.name,
                                   dtype=torch.float64)
    before = [w.passes() for w in workers]
    writer = CurvatureFolder(tmp_path / "curvature").coordinate_writer(manifest.num_rows, "float32", manifest.shard_size)
    path = writer.begin(spec.name, 16)
    parts = [w.write_coordinates([spec.name], {spec.name: spectrum.vectors}, {spec.name: path}, "float32",
                                 manifest.shard_size) for w in workers]
    checksums = {block: crc for part in parts for block, crc in part[spec.name].items()}
    assert sorted(checksums) == [r.index for r in manifest.shards]  # each worker wrote its whole shards: a block each
    writer.commit(spec.name, checksums)
    assert [w.passes() - b for w, b in zip(workers, before)] == [1] * NUM_WORKERS
    rows = {k: torch.cat([c[k] for _, c in IndexFolder(cfg.index_path).batches([k], out_dtype=torch.float64,
                                                          manifest=manifest)])
            for k in factor_columns(spec.name)}
    exact = blocks_from_columns([spec], "factors", rows)[spec.name].dense() @ spectrum.vectors
    stored = torch.from_numpy(np.load(tmp_path / "curvature_coordinates" / f"{spec.name}.npy")).double()
    assert _rel(stored, exact) < 1e-6  # float32 file


def test_query_actors_hold_only_their_share_of_v(baseline, ray_cluster):
    cfg = baseline["config"]("ray_coords_share", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True),
                             cluster=ClusterConfig(backend="ray", gram_actors=NUM_WORKERS))
    report = run_stage("curvature", cfg)
    assert report["coordinates"]["bytes_per_example"] == 4 * sum(ranks(CurvatureFolder(cfg.curvature_path).header()).values())
    stored = CurvatureFolder(cfg.curvature_path).stored_coordinates().rows(dtype=torch.float64)
    for name, exact in _exact_coordinates(cfg).items():
        assert _rel(stored[name], exact) < 1e-6, name
    manifest = IndexFolder(cfg.index_path).manifest()
    columns = featurize_queries(cfg, manifest).columns
    layers = set(ranks(CurvatureFolder(cfg.curvature_path).header()))
    with QueryPool(query_config(cfg, manifest), CurvatureFolder(cfg.curvature_path), num_workers=NUM_WORKERS,
                      stored=True) as pool:
        shares = [set(s["vectors"]) for s in pool.stats()]
        pool.score(columns, "stored", 5)
        assert [set(s["vectors"]) for s in pool.stats()] == shares  # the stored route reads no more V_r
    assert all(shares) and not set.intersection(*shares) and set.union(*shares) == layers
    assert run_stage("curvature", cfg)["reused"]  # curvature and g'_t both match: nothing recomputed


def test_a_stale_coordinate_file_is_not_used(baseline, ray_cluster):
    """Stage 2 run again with other settings and without storing g'_t: the old g'_t belong to another
    curvature, so the query does not score with them."""
    query = QueryConfig(**QUERY_CONFIG, store_coordinates=True)
    cfg = baseline["config"]("ray_coords_stale", query=query, cluster=ClusterConfig(backend="ray"))
    run_stage("curvature", cfg)
    assert (CurvatureFolder(cfg.curvature_path).coordinates_path / "_meta.json").exists()
    other = baseline["config"]("ray_coords_stale", r=8, cluster=ClusterConfig(backend="ray"))
    run_stage("curvature", other)
    assert not CurvatureFolder(other.curvature_path).coordinates_match()
    assert run_stage("query", other)["route"] == "query"  # 6 queries < r = 8, no stored g'_t


@pytest.mark.parametrize("normalize", [False, True])
def test_without_stored_coordinates_actors_read_all_of_v_only_to_recompute(baseline, ray_cluster, normalize):
    """No stored g'_t: 6 queries < r = 64 take the query side (h_q from each actor's share of V_r, nothing
    more read); normalized scores need g'_t, so the actors read every V_r once and recompute it. Both
    equal the one-process scores."""
    query = QueryConfig(**{**QUERY_CONFIG, "normalize": normalize})
    cfg = baseline["config"](f"ray_routes_{normalize}", with_curvature=True, query=query)
    ref = baseline["config"](f"ray_routes_{normalize}_ref", with_curvature=True, query=query)
    run_query(ref)
    manifest = IndexFolder(cfg.index_path).manifest()
    columns = featurize_queries(cfg, manifest).columns
    route = "recompute" if normalize else "query"
    with QueryPool(query_config(cfg, manifest), CurvatureFolder(cfg.curvature_path), num_workers=NUM_WORKERS) as pool:
        full = np.zeros((6, manifest.num_rows), dtype=np.float32)
        np.save(f"{cfg.output_dir}-full.npy", full)
        pool.score(columns, route, 5, OutputFiles(scores=f"{cfg.output_dir}-full.npy"))
        held = [set(s["vectors"]) for s in pool.stats()]
    everything = set(ranks(CurvatureFolder(cfg.curvature_path).header()))
    if normalize:
        assert held == [everything] * NUM_WORKERS
    else:
        assert all(held) and not set.intersection(*held) and set.union(*held) == everything
    expected = np.load(f"{ref.output_dir}/scores.npy")
    got = np.load(f"{cfg.output_dir}-full.npy")
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


def test_a_worker_that_cannot_see_the_coordinate_file_says_output_dir_must_be_shared(tmp_path):
    """On a node without the driver's output_dir (not shared storage) a worker's write fails by name."""
    from lorif_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="shared by every node"):
        write_rows(tmp_path / "elsewhere" / "layer.npy.tmp-0", 0, torch.zeros(2, 3), "float32", 2)
