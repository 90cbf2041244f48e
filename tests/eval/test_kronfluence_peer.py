"""The optional Kronfluence peer on the tiny setup (skipped when kronfluence is not installed)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorif_ray.eval.config import register_sweep_configs
from lorif_ray.eval.groundtruth import ensure_setup, ground_truth
from lorif_ray.eval.sweep import read_results

pytest.importorskip("kronfluence")

from lorif_ray.eval import kronfluence_peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def compose_cfg(cache_root, *overrides):
    register_sweep_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("sweep", overrides=["eval=tiny", f"eval.cache_root={cache_root}", "eval.threads=1", *overrides])
    return OmegaConf.to_object(cfg)


def test_kronfluence_scores_and_lds(tmp_path):
    cfg = compose_cfg(tmp_path)
    start = Counter(kronfluence_peer.RUNS)
    row = kronfluence_peer.run_kronfluence(cfg)
    gt = ground_truth(cfg.eval, ensure_setup(cfg.eval), progress=False)
    out = Path(row["run_dir"])
    scores = np.load(out / "scores.npy")
    assert scores.shape == (len(gt.query_ids), len(gt.train_ids))
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert json.loads((out / "scores.json").read_text())["train_ids"] == gt.train_ids
    assert row["method"] == "kronfluence-ekfac" and np.isfinite(row["lds"]) and -1 <= row["lds"] <= 1
    assert np.isfinite(row["tail_patch"]) and row["bytes_per_example"] is None and row["factor_bytes"] > 0
    assert row["curvature_seconds"] > 0 and row["query_seconds"] > 0
    # the recorded negated-score LDS is the mirror image: the sign is a real choice, checked on the facts setup
    lds = json.loads((out / "lds.json").read_text())
    assert lds["negated_scores"]["mean"] == pytest.approx(-row["lds"])

    # A damping variant reuses the fitted factors and adds its own row; a re-run recomputes nothing.
    other = kronfluence_peer.run_kronfluence(compose_cfg(tmp_path, "eval.kronfluence.damping=1e-8"))
    again = kronfluence_peer.run_kronfluence(cfg)
    made = Counter(kronfluence_peer.RUNS) - start
    assert made == Counter({"kronfluence_factors": 1, "kronfluence_scores": 2})
    assert again["lds"] == row["lds"] and other["run_dir"] != row["run_dir"]
    table = [r for r in read_results(cfg.eval.results_dir) if r["method"] == "kronfluence-ekfac"]
    assert sorted(r["damping"] is None for r in table) == [False, True]
