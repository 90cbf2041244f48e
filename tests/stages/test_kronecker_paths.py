"""curvature=kfac / ekfac through the three stages: the statistics stage 1 collects, the fit, and the scores
against explicit float64 inverses; factor and dense indexes agree where the factors are exact."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.data import load_examples
from lorif_ray.errors import IndexMismatchError
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.model.loading import load_tokenizer
from lorif_ray.stages.curvature import load_curvature, run_curvature
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.query import run_query
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.oracles import kronecker_inverse, oracle_scores
from tests.stages.helpers import make_config

QUERY = QueryConfig(full_scores=True, top_k=5)


def _config(assets, root, name, method, **overrides):
    return make_config(assets, root / name, method=method, shard_size=16, query=QUERY,
                       cluster=ClusterConfig(backend="none"), **overrides)


@pytest.fixture(scope="module")
def indexes(tiny_assets, tmp_path_factory):
    """A dense index (LoGRA's rows) and a factor index with c = min(d1, d2) = 8 (exact factors) of the tiny
    model, f = 4."""
    root = tmp_path_factory.mktemp("kronecker")
    dense, factors = _config(tiny_assets, root, "dense", "logra"), _config(tiny_assets, root, "factors", "lorif", c=8)
    run_index(dense)
    run_index(factors)
    return {"dense": dense, "factors": factors, "root": root}


def _statistics(cfg, shards, layers) -> dict[str, KroneckerStats]:
    stored = IndexFolder(cfg.index_path).read_statistics(shards, layers)
    return {name: KroneckerStats.from_tensors(tensors) for name, tensors in stored.items()}


def _dense_rows(cfg) -> dict[str, torch.Tensor]:
    manifest = IndexFolder(cfg.index_path).manifest()
    specs = layer_specs(manifest)
    parts = [blocks_from_columns(specs, manifest.kind, {k: v.double() for k, v in columns.items()})
             for _, columns in IndexFolder(cfg.index_path).batches(batch_rows=1000)]
    return {s.name: torch.cat([p[s.name].dense() for p in parts]) for s in specs}


def test_stage_one_counts_every_token_of_every_example_once(indexes, tiny_assets):
    cfg = indexes["dense"]
    manifest = IndexFolder(cfg.index_path).manifest()
    shards = [r.index for r in manifest.shards]
    stats = _statistics(cfg, shards, [s.name for s in layer_specs(manifest)])
    tokenizer = load_tokenizer(tiny_assets["model"])
    tokens = sum(min(len(tokenizer(e.text)["input_ids"]), 32) for e in load_examples(tiny_assets["train"]))
    assert {(s.tokens, s.examples) for s in stats.values()} == {(tokens, 48)}
    factor_stats = _statistics(indexes["factors"], shards, list(stats))
    for name, s in stats.items():  # the statistics do not depend on what is stored
        torch.testing.assert_close(factor_stats[name].activations, s.activations, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_dense_kronecker_scores_equal_the_explicit_inverse(indexes, kind):
    """LoGRA's rows with curvature=kfac/ekfac: scores.npy equals g_q (H + λI)⁻¹ g_t with H formed explicitly:
    (Ã ⊗ S̃)/N_tok (torch.kron) for K-FAC, and for EK-FAC the basis of the stats with Λ* = diag(QᵀGᵀGQ)."""
    cfg = replace(indexes["dense"], curvature=kind, output_dir=str(indexes["root"] / f"dense-{kind}"),
                  index_dir=str(indexes["dense"].index_path))
    fitted = run_curvature(cfg)
    report = run_query(cfg)
    assert report["route"] == "none"
    manifest = IndexFolder(cfg.index_path).manifest()
    numbers = sum(s.d1 * s.d1 + s.d2 * s.d2 + s.d1 * s.d2 for s in layer_specs(manifest))  # Q_A, Q_S, Λ per layer
    assert fitted["kind"] == kind and 8 * numbers <= fitted["bytes"] <= 8 * numbers + 4096 * len(layer_specs(manifest))
    names = [s.name for s in layer_specs(manifest)]
    stats = _statistics(cfg, [r.index for r in manifest.shards], names)
    curvature = load_curvature(CurvatureFolder(cfg.curvature_path), cfg, manifest, "cpu", torch.float64)
    train = _dense_rows(cfg)
    inverses = {}
    for name in names:
        if kind == "kfac":
            s = stats[name]
            inverses[name] = kronecker_inverse(s.activations, s.gradients, s.tokens, curvature[name].damping)
        else:
            basis = torch.kron(curvature[name].basis_a.double(), curvature[name].basis_s.double())
            rotated = train[name] @ basis  # rows in the eigenbasis: Λ* is their summed square
            values = (rotated ** 2).sum(dim=0) + curvature[name].damping
            inverses[name] = (basis / values) @ basis.T
    query = blocks_from_columns(layer_specs(manifest), "dense", featurize_queries(cfg, manifest).columns)
    expected = oracle_scores({n: b.dense().double() for n, b in query.items()}, train, inverses)
    scores = np.load(f"{cfg.output_dir}/scores.npy")
    assert np.abs(scores - expected.numpy()).max() <= 1e-5 * np.abs(expected.numpy()).max()


def test_exact_factors_and_dense_rows_give_the_same_ekfac_scores(indexes):
    """method=lorif curvature=ekfac at c = min(d1, d2) equals method=logra curvature=ekfac: EK-FAC's pass and the
    scorer read the factors as the matrices they are."""
    out = {}
    for store in ("dense", "factors"):
        cfg = replace(indexes[store], curvature="ekfac", output_dir=str(indexes["root"] / f"{store}-ekfac-cmp"),
                      index_dir=str(indexes[store].index_path))
        run_curvature(cfg)
        run_query(cfg)
        out[store] = np.load(f"{cfg.output_dir}/scores.npy")
    assert np.abs(out["factors"] - out["dense"]).max() <= 1e-4 * np.abs(out["dense"]).max()


def test_an_index_without_statistics_is_named(indexes, tmp_path):
    cfg = replace(indexes["dense"], curvature="kfac", output_dir=str(tmp_path), index_dir=str(tmp_path / "index"))
    import shutil

    shutil.copytree(indexes["dense"].index_path, cfg.index_path)
    (cfg.index_path / "_kronecker.safetensors").unlink()
    with pytest.raises(IndexMismatchError, match="holds no K-FAC statistics"):
        run_curvature(cfg)
