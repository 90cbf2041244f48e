"""Precision on a spiked spectrum (σ₁²/λ ≥ 500): the default policy keeps every path next to the float64
reference, with float32 and with bfloat16 storage of the factors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lorif_ray.math.blocks import dense_from_factors
from lorif_ray.math.curvature import FitSettings, Woodbury
from lorif_ray.math.rsvd import GramOperator, TensorRows
from lorif_ray.stages.curvature import load_curvature, run_curvature
from lorif_ray.stages.query import LocalScorer
from lorif_ray.outputs.query_outputs import output_files
from lorif_ray.store import CurvatureFolder, IndexFolder
from lorif_ray.store.schema import factor_columns
from tests.oracles import oracle_scores, woodbury_inverse
from tests.stages.spiked import LAYERS, spiked_config, with_output, write_spiked_index


def _dense(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {s.name: dense_from_factors(*(columns[c][:, :, None] for c in factor_columns(s.name))) for s in LAYERS}


def reference_scores(cfg, train: dict, queries: dict) -> torch.Tensor:
    """Float64 from the exact (never rounded) rows: the same randomized SVD, H⁻¹ formed explicitly."""
    settings = FitSettings(rank=cfg.r, oversample=cfg.oversample, power_iters=cfg.svd_power_iters, seed=cfg.seed,
                           damping_scale=cfg.damping_scale)
    train, queries = _dense(train), _dense(queries)
    inverses = {}
    for s in LAYERS:
        fitted = Woodbury.fit(GramOperator(TensorRows(train[s.name])), s.dim, s.name, settings)
        inverses[s.name] = woodbury_inverse(fitted.vectors, fitted.values, fitted.damping)
    return oracle_scores(queries, train, inverses)


def path_scores(cfg, queries: dict) -> dict[str, np.ndarray]:
    """Full scores of every one-process path: rows streamed or resident × the three curvature-term routes."""
    manifest = IndexFolder(cfg.index_path).manifest()
    out = {}
    for resident in (False, True):
        for route in ("recompute", "query", "stored"):
            run = replace(cfg, query=replace(cfg.query, resident=resident))
            scorer = LocalScorer(run, manifest, CurvatureFolder(run.curvature_path), stored=route == "stored")
            with output_files(run, manifest, 12) as files:
                scorer.score(queries, route, 10, files)
            out[f"{'resident' if resident else 'streamed'}/{route}"] = np.load(f"{run.output_dir}/scores.npy")
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def spiked(request, tmp_path_factory):
    cfg = spiked_config(tmp_path_factory.mktemp(f"spiked_{request.param}"), request.param)
    train, queries = write_spiked_index(cfg)
    cfg = with_output(cfg, "out", store_coordinates=True)
    run_curvature(cfg)
    return cfg, reference_scores(cfg, train, queries).numpy(), {k: v.float() for k, v in queries.items()}


def test_the_spectrum_is_spiked(spiked):
    cfg, _, _ = spiked
    folder = CurvatureFolder(cfg.curvature_path)
    header = folder.header()

    curvature = load_curvature(folder, cfg, IndexFolder(cfg.index_path).manifest(), "cpu", torch.float64)
    ratios = [float(c.values[0]) / c.damping for c in curvature.values()]
    assert min(ratios) >= 500, ratios
    assert header["precision"]["coordinates"] == "float32" and header["precision"]["storage"] == cfg.dtype


def test_every_path_ranks_like_the_float64_reference(spiked):
    cfg, reference, queries = spiked
    scores = path_scores(cfg, queries)
    first = next(iter(scores.values()))
    for name, got in scores.items():
        relative = np.abs(got - reference).max() / np.abs(reference).max()
        spearman = np.mean([_spearman(got[q], reference[q]) for q in range(len(got))])
        overlap = np.mean([len(set(np.argsort(-got[q])[:10]) & set(np.argsort(-reference[q])[:10])) / 10
                           for q in range(len(got))])
        print(f"{cfg.dtype} {name}: relative error {relative:.2e}, Spearman {spearman:.4f}, top-10 overlap {overlap:.3f}")
        if cfg.dtype == "float32":
            assert relative <= 1e-5, name
        else:
            assert spearman >= 0.99 and overlap >= 0.95, name
        # the paths agree with each other to float32 rounding (stored g'_t are float32)
        assert np.abs(got - first).max() <= 1e-5 * np.abs(first).max(), name


@pytest.mark.parametrize("coordinates,math", [("bfloat16", "auto"), ("float16", "auto"), ("float32", "float32")])
def test_policy_overrides_measured(tmp_path, coordinates, math):
    """What the defaults protect against, measured on the same spectrum (float32 storage): g'_t stored in 16
    bits (rounded apart from the factors) — and the GPU policy (math float32) for comparison."""
    from lorif_ray.config import PrecisionConfig

    cfg = spiked_config(tmp_path, "float32", precision=PrecisionConfig(coordinates=coordinates, math=math))
    train, queries = write_spiked_index(cfg)
    cfg = with_output(cfg, "out", store_coordinates=True)
    run_curvature(cfg)
    reference = reference_scores(cfg, train, queries).numpy()
    scores = path_scores(cfg, {k: v.float() for k, v in queries.items()})
    errors = {name: np.abs(got - reference).max() / np.abs(reference).max() for name, got in scores.items()}
    print(f"coordinates={coordinates} math={math}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if coordinates == "float32":  # float32 arithmetic throughout: still float32-rounding-sized errors
        assert max(errors.values()) <= 1e-4
    else:  # 16-bit g'_t: the stored route is far off, the other routes are not
        assert errors["resident/stored"] > 30 * errors["resident/recompute"]
