"""Where the rows live changes the speed, never the numbers: stage 2 with rows streamed or resident
writes the same curvature, stage 3 streaming or resident gives the same scores, on every route."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.errors import IndexMismatchError
from lorif_ray.precision import Precision
from lorif_ray.stages.curvature import LocalGram, load_curvature, run_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.query import run_query
from lorif_ray.stages.rows import ParquetRows, ResidentRows, layer_rows
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.conftest import QUERY_CONFIG
from tests.stages.helpers import counting_shard_reads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _same_curvature(path, ref_path, tolerance):
    expected, _ = CurvatureFolder(ref_path).read_all()
    got, _ = CurvatureFolder(path).read_all()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        if name.endswith(".vectors"):  # V diag(σ²) Vᵀ (vectors of zero eigenvalues are arbitrary)
            values = expected[name.replace("vectors", "values")]
            assert _rel((got[name] * values) @ got[name].T, (tensor * values) @ tensor.T) < tolerance, name
        else:
            assert _rel(got[name], tensor) < tolerance, name


def _resident_gram(resident):
    return lambda cfg, manifest, precision, device: LocalGram(cfg, manifest, precision, device, resident=resident)


def test_stage_two_streamed_and_resident_write_the_same_curvature_and_coordinates(baseline):
    ref = baseline["cfg"]  # the baseline ran with the default choice: resident, since the rows fit
    streamed = baseline["config"]("curv_streamed", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True))
    report = run_curvature(streamed, _resident_gram(False))
    _same_curvature(streamed.curvature_path, ref.curvature_path, 1e-10)
    resident = baseline["config"]("curv_resident", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True))
    run_curvature(resident, _resident_gram(True))
    _same_curvature(resident.curvature_path, ref.curvature_path, 1e-10)
    manifest = IndexFolder(streamed.index_path).manifest()
    rows = {k: torch.cat([c[k] for _, c in IndexFolder(streamed.index_path).batches(out_dtype=torch.float64,
                                                        manifest=manifest)]) for k in manifest.columns}
    blocks = blocks_from_columns(layer_specs(manifest), manifest.kind, rows)
    width = 0
    for cfg in (streamed, resident):  # each against its own V_r (eigenvector signs are arbitrary)
        curvature = load_curvature(CurvatureFolder(cfg.curvature_path), cfg, manifest, "cpu", torch.float64)
        stored = CurvatureFolder(cfg.curvature_path).stored_coordinates().rows(dtype=torch.float64)
        for name, block in blocks.items():
            exact = block.dense() @ curvature[name].vectors
            assert stored[name].shape == exact.shape and _rel(stored[name], exact) < 1e-6  # float32 files
            width += exact.shape[1] if cfg is streamed else 0
    assert report["coordinates"]["bytes_per_example"] == width * 4  # precision.coordinates = float32
    assert run_curvature(streamed)["reused"]


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_stage_three_streamed_and_resident_give_the_same_scores(baseline, stored, normalize):
    name = f"paths_{stored}_{normalize}"
    query = QueryConfig(**{**QUERY_CONFIG, "normalize": normalize}, store_coordinates=stored)
    ref = baseline["config"](name + "_ref", with_curvature=True, query=replace(query, store_coordinates=False))
    expected = run_query(ref)
    cfg = baseline["config"](name, query=query)
    run_curvature(cfg)
    scores = {}
    for resident in (False, True):
        run = replace(cfg, query=replace(query, resident=resident))
        report = run_query(run)
        assert report["route"] == ("stored" if stored else "recompute" if normalize else "query")
        scores[resident] = np.load(f"{cfg.output_dir}/scores.npy")
        assert pq.read_table(f"{cfg.output_dir}/topk.parquet").column("train_id").to_pylist() == \
            pq.read_table(f"{ref.output_dir}/topk.parquet").column("train_id").to_pylist()
    reference = np.load(f"{ref.output_dir}/scores.npy")
    assert expected["route"] == ("recompute" if normalize else "query")
    for got in scores.values():
        assert np.abs(got - reference).max() <= (1e-5 if stored else 1e-10) * np.abs(reference).max()
    assert np.array_equal(scores[False], scores[True]) or \
        np.abs(scores[False] - scores[True]).max() <= 1e-12 * np.abs(reference).max()
    meta = pq.read_schema(f"{cfg.output_dir}/topk.parquet").metadata
    assert b"route" in next(iter(meta.values()))


def test_config_keys_select_the_paths_through_the_stage_dispatcher(baseline):
    from lorif_ray.distributed.backends import run_stage

    cfg = baseline["config"]("keys", cluster=ClusterConfig(backend="none"),
                             query=QueryConfig(**QUERY_CONFIG, resident=True, store_coordinates=True))
    assert "coordinates" in run_stage("curvature", cfg)
    report = run_stage("query", cfg)
    assert report["route"] == "stored" and report["resident_bytes"] > 0
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    assert np.abs(np.load(cfg.output_dir + "/scores.npy") - expected).max() <= 1e-5 * np.abs(expected).max()


def test_stale_coordinates_are_not_used(baseline):
    cfg = baseline["config"]("stale", query=QueryConfig(**QUERY_CONFIG, store_coordinates=True))
    run_curvature(cfg)
    assert CurvatureFolder(cfg.curvature_path).coordinates_match()
    other = baseline["config"]("stale", r=8)  # another curvature in the same output dir, no g'_t
    run_curvature(other)
    assert not CurvatureFolder(other.curvature_path).coordinates_match()
    with pytest.raises(IndexMismatchError):
        CurvatureFolder(other.curvature_path).stored_coordinates()
    assert run_query(other)["route"] == "query"  # 6 queries < r = 8


def test_stage_two_holds_a_layer_resident_only_when_it_fits(baseline):
    """N · Σ c(d1+d2) numbers in the math dtype against a fraction of the device's memory."""
    cfg = baseline["cfg"]
    index = IndexFolder(cfg.index_path)
    manifest = index.manifest()
    specs = layer_specs(manifest)
    assert isinstance(layer_rows(index, manifest, specs, dtype=torch.float64), ResidentRows)
    assert isinstance(layer_rows(index, manifest, specs, dtype=torch.float64, fraction=1e-12), ParquetRows)
    assert Precision.of(cfg, torch.device("cpu")).math == torch.float64


def test_layers_fitted_in_groups_or_resumed_give_the_same_curvature(baseline, monkeypatch):
    """One layer per group (a tiny budget) writes the curvature of all layers in one group; a stage 2 that
    stopped part-way (header and three layer files lost) fits only the missing layers on re-run."""
    import lorif_ray.stages.curvature as stage

    ref = baseline["cfg"]
    cfg = baseline["config"]("groups")
    monkeypatch.setattr(stage, "GROUP_BYTES", 1)
    assert all(len(g) == 1 for g in stage.layer_groups(layer_specs(IndexFolder(cfg.index_path).manifest()), cfg))
    assert run_curvature(cfg)["fitted_layers"] == 8
    _same_curvature(cfg.curvature_path, ref.curvature_path, 1e-10)
    (cfg.curvature_path / "_curvature.json").unlink()
    for path in sorted(cfg.curvature_path.glob("*.safetensors"))[:3]:
        path.unlink()
    report = run_curvature(cfg)
    assert report["fitted_layers"] == 3 and len(report["layers"]) == 8
    _same_curvature(cfg.curvature_path, ref.curvature_path, 1e-10)


def test_a_streamed_stage_two_reads_each_shard_once_per_pass(baseline):
    """Rows streamed (not resident): every pass reads each shard once for all 8 layers of the group."""
    cfg = baseline["config"]("streamed_passes")
    with counting_shard_reads() as opened:
        run_curvature(cfg, _resident_gram(False))
    # 5 shards; passes: 3 power iterations + the last (one of which also forms D×D GᵀG for the small layers)
    assert len(opened) == 5 * (cfg.svd_power_iters + 1)
