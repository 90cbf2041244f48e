"""Fast stage 2 (resident rows, stored g'_t) and fast stage 3 (resident, batched) against the reference stages."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from lorif_ray.config import QueryConfig
from lorif_ray.errors import IndexMismatchError
from lorif_ray.stages.curvature import layer_specs, load_curvature, run_curvature
from lorif_ray.stages.coordinates import coordinates_match, load_coordinates
from lorif_ray.stages.fast_curvature import run_curvature_fast
from lorif_ray.stages.fast_query import ResidentIndex, run_query_fast
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.store import iter_batches, load_tensors, open_index
from tests.conftest import QUERY_CONFIG


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_resident_curvature_and_coordinates_equal_the_streamed_path(baseline):
    ref = baseline["cfg"]
    cfg = baseline["config"]("fast_curv")
    report = run_curvature_fast(cfg, store_coordinates=True, chunk_rows=7)
    expected, _ = load_tensors(ref.curvature_path)
    got, _ = load_tensors(cfg.curvature_path)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        if name.endswith(".vectors"):  # V diag(σ²) Vᵀ (vectors of zero eigenvalues are arbitrary)
            values = expected[name.replace("vectors", "values")]
            assert _rel((got[name] * values) @ got[name].T, (tensor * values) @ tensor.T) < 1e-10, name
        else:
            assert _rel(got[name], tensor) < 1e-10, name
    manifest = open_index(cfg.index_path)
    curvature = load_curvature(cfg, manifest, "cpu", torch.float64)
    rows = {k: torch.cat([c[k] for _, c in iter_batches(cfg.index_path, out_dtype=torch.float64, manifest=manifest)])
            for k in manifest.columns}
    blocks = blocks_from_columns(layer_specs(manifest), manifest.kind, rows)
    coords = load_coordinates(cfg, dtype=torch.float64)
    ranks = 0
    for name, block in blocks.items():
        exact = block.dense() @ curvature[name].vectors
        assert coords[name].shape == exact.shape
        assert _rel(coords[name], exact) < 1e-6  # stored as float32
        ranks += exact.shape[1]
    assert report["coordinates"]["bytes_per_example"] == ranks * 4
    assert run_curvature_fast(cfg, store_coordinates=True)["reused"]


@pytest.mark.parametrize("coordinates", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_fast_query_equals_run_query(baseline, coordinates, normalize, tmp_path):
    from lorif_ray.stages.query import run_query
    name = f"fast_q_{coordinates}_{normalize}"
    query = QueryConfig(**{**QUERY_CONFIG, "normalize": normalize})
    cfg = replace(baseline["config"](name, with_curvature=not coordinates), query=query)
    if coordinates:
        run_curvature_fast(cfg, store_coordinates=True)
    ref_cfg = replace(baseline["config"](name + "_ref", with_curvature=True), query=query)
    run_query(ref_cfg)
    report = run_query_fast(cfg, chunk_rows=9)
    assert report["used_coordinates"] == coordinates
    got = np.load(f"{cfg.output_dir}/scores.npy")
    expected = np.load(f"{ref_cfg.output_dir}/scores.npy")
    assert np.abs(got - expected).max() / np.abs(expected).max() < (1e-6 if coordinates else 1e-10)
    import pyarrow.parquet as pq
    a, b = pq.read_table(f"{cfg.output_dir}/topk.parquet"), pq.read_table(f"{ref_cfg.output_dir}/topk.parquet")
    assert a.column("train_id").to_pylist() == b.column("train_id").to_pylist()


def test_resident_index_round_trips_and_stale_coordinates_are_refused(baseline, tmp_path):
    cfg = baseline["config"]("fast_resident")
    run_curvature_fast(cfg, store_coordinates=True)
    manifest = open_index(cfg.index_path)
    from lorif_ray.math.scoring import ScoreLayout
    layout = ScoreLayout.build(layer_specs(manifest), manifest.kind, load_curvature(cfg, manifest, "cpu", torch.float64))
    resident = ResidentIndex.from_index(cfg.index_path, manifest, layout, device="cpu", dtype=torch.float64,
                                        coordinates=load_coordinates(cfg, dtype=torch.float64), batch_rows=7)
    resident.save(tmp_path / "resident.safetensors")
    again = ResidentIndex.load(tmp_path / "resident.safetensors")
    assert again.ids == resident.ids and torch.equal(again.block.coordinates, resident.block.coordinates)
    assert all(torch.equal(a, b) for pa, pb in zip(again.block.factors, resident.block.factors) for a, b in zip(pa, pb))
    run_curvature(baseline["config"]("fast_resident", r=8))  # another curvature in the same output dir
    assert not coordinates_match(cfg)
    with pytest.raises(IndexMismatchError):
        load_coordinates(cfg)


def test_config_keys_select_the_resident_paths(baseline):
    """query.store_coordinates (stage 2 writes g'_t) + query.resident (stage 3 batched, resident) through
    the stage dispatcher the jobs use: the same top-k and scores as the streaming stages."""
    from lorif_ray.config import ClusterConfig
    from lorif_ray.distributed.stages import run_stage

    cfg = baseline["config"]("keys", cluster=ClusterConfig(backend="none"),
                             query=QueryConfig(**QUERY_CONFIG, resident=True, store_coordinates=True))
    assert "coordinates" in run_stage("curvature", cfg)
    report = run_stage("query", cfg)
    assert report["used_coordinates"]
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    scores = np.load(cfg.output_dir + "/scores.npy")
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()


def test_stage_two_holds_a_layer_resident_only_when_it_fits(baseline):
    """The one-process stage 2 picks the resident path by the largest layer's rows (N · c(d1+d2) numbers
    in the math dtype) against a fraction of the device's memory."""
    from lorif_ray.stages.fast_curvature import fits_resident, resident_bytes

    cfg = baseline["cfg"]
    manifest = open_index(cfg.index_path)
    widest = max(s.c * (s.d1 + s.d2) for s in layer_specs(manifest))
    assert resident_bytes(manifest, torch.float64) == manifest.num_rows * widest * 8
    assert fits_resident(cfg) and not fits_resident(cfg, fraction=1e-12)
