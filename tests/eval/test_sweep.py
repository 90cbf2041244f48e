"""The sweep on a tiny setup: one row per point, nothing recomputed, factors derived from a dense index,
the Hydra multirun, and the report. Uses conf/eval/tiny.yaml (seconds on a CPU)."""

import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorif_ray.eval import groundtruth, sweep
from lorif_ray.eval.config import register_sweep_configs
from lorif_ray.eval.groundtruth import ensure_setup
from lorif_ray.math.curvature import EKFAC, ExactInverse, Woodbury
from lorif_ray.eval import index_cache

ROOT = Path(__file__).resolve().parents[2]


def compose_cfg(cache_root, *overrides):
    register_sweep_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("sweep", overrides=["eval=tiny", f"eval.cache_root={cache_root}", "eval.threads=1",
                                          *overrides])
    return OmegaConf.to_object(cfg)


def counts():
    return Counter(groundtruth.RUNS) + Counter(index_cache.RUNS) + Counter(sweep.RUNS)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")


POINTS = [  # (overrides, what must run the first time)
    (["method=lorif", "f=2", "c=1", "r=4"], {"index": 1, "factors_from_dense": 1}),  # dense f2 built, factors derived
    (["method=lorif", "f=2", "c=1", "r=8"], {}),  # differs only in r: same index
    (["method=lorif", "f=2", "c=2", "r=8"], {"factors_from_dense": 1}),  # differs in c: from the cached dense rows
    (["method=logra", "f=2"], {}),  # the dense index made above
    (["method=graddot", "f=2"], {}),
    (["method=repsim"], {"index": 1}),
    (["method=lorif", "f=2", "c=1", "r=4", "curvature=ekfac"], {}),  # the first point's rows, another curvature
]


def test_sweep_rows_and_caching(cache_root):
    torch.manual_seed(0)
    before = counts()
    rows = []
    for i, (overrides, expected) in enumerate(POINTS):
        start = counts()
        rows.append(sweep.run_point(compose_cfg(cache_root, *overrides)))
        made = counts() - start
        if i == 0:  # the setup and its ground truth: attributed model + M × seeds retrains
            assert made["setup"] == 1 and made["retrain"] == 4 * 2
        for stage in ("index", "factors_from_dense"):
            assert made[stage] == expected.get(stage, 0), (overrides, made)
        assert made["retrain"] == (8 if i == 0 else 0)
        assert made["query"] == 1 and made["curvature"] == 1
    table = sweep.read_results(compose_cfg(cache_root).eval.results_dir)
    assert len(table) == len(POINTS)
    for row in table:
        assert np.isfinite(row["lds"]) and -1 <= row["lds"] <= 1 and row["bytes_per_example"] > 0
    lorif = {(r["c"], r["r"]): r for r in table if r["method"] == "lorif" and r["curvature"] == "woodbury"}
    ekfac, = (r for r in table if r["curvature"] == "ekfac")
    assert ekfac["index_dir"] == lorif[(1, 4)]["index_dir"] and ekfac["run_dir"] != lorif[(1, 4)]["run_dir"]
    assert ekfac["r"] is None and ekfac["damping_scale"] == EKFAC.default_damping_scale
    assert lorif[(1, 4)]["damping_scale"] == Woodbury.default_damping_scale
    assert lorif[(1, 4)]["index_dir"] == lorif[(1, 8)]["index_dir"] != lorif[(2, 8)]["index_dir"]
    assert lorif[(1, 4)]["index_source"] == "dense"
    assert lorif[(1, 8)]["index_source"] == "cache" and lorif[(1, 8)]["index_made_by"] == "dense"

    # A second pass recomputes nothing and gives the same rows.
    start = counts()
    again = [sweep.run_point(compose_cfg(cache_root, *o)) for o, _ in POINTS]
    assert +(counts() - start) == Counter()
    assert [r["lds"] for r in again] == [r["lds"] for r in rows]
    assert len(sweep.read_results(compose_cfg(cache_root).eval.results_dir)) == len(POINTS)
    assert counts() - before  # sanity: the first pass did run


def test_factors_from_dense_equal_the_model_path(cache_root):
    """A LoRIF index derived from the dense rows matches the one stage 1 makes from the model."""
    from lorif_ray.stages.featurize import blocks_from_columns
    from lorif_ray.stages.index import run_index
    from lorif_ray.stages.inputs import layer_specs
    from lorif_ray.store import IndexFolder

    cfg = compose_cfg(cache_root, "method=lorif", "f=2", "c=2")
    point = sweep.point_config(cfg, ensure_setup(cfg.eval))
    cache = index_cache.IndexCache(Path(cache_root) / "index", budget_bytes=1e9)
    derived, info = cache.ensure(point)
    assert info["source"] in ("dense", "cache")
    direct = Path(cache_root) / "direct"
    run_index(replace(point, index_dir=str(direct)))
    (ids_a, a), = IndexFolder(derived).batches(batch_rows=10**6)
    (ids_b, b), = IndexFolder(direct).batches(batch_rows=10**6)
    assert ids_a == ids_b and a.keys() == b.keys()
    specs = layer_specs(IndexFolder(direct).manifest())
    dense_a, dense_b = (blocks_from_columns(specs, "factors", columns) for columns in (a, b))
    for name, gb in dense_b.items():  # G̃ = u vᵀ is what scoring uses (u, v are unique only up to sign/rotation)
        assert torch.allclose(dense_a[name].dense(), gb.dense(), atol=1e-4 * gb.dense().abs().max().item())


def test_hydra_multirun_writes_one_row_per_point(cache_root, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "-m", "method=lorif", "f=2", "c=1", "r=2,4,6",
           "eval=tiny", f"eval.cache_root={cache_root}", f"eval.results_dir={results}", "eval.threads=1"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    rows = sweep.read_results(results)
    assert sorted(r["r"] for r in rows) == [2, 4, 6]
    assert (results / "results.csv").read_text().count("\n") == 4  # header + 3 rows


def test_results_table_keeps_columns_added_later(tmp_path):
    sweep.append_row(tmp_path, {k: 1 for k in sweep.KEY_COLUMNS} | {"lds": 0.5})
    sweep.append_row(tmp_path, {k: 2 for k in sweep.KEY_COLUMNS} | {"lds": 0.1, "new": "x"})
    rows = sweep.read_results(tmp_path)
    assert [r["new"] for r in rows] == [None, "x"]


def test_rows_from_before_the_curvature_column_keep_their_key(tmp_path):
    """A row written before ``curvature`` and ``damping_scale`` were columns reads as its method's preset at the
    default scale, and a new row of that point replaces it; another curvature is another row."""
    old = {"setup": "s", "method": "logra", "f": 4, "c": None, "r": None, "damping": None, "dtype": "float32",
           "seed": 0, "lds": 0.3}
    sweep.append_row(tmp_path, old)
    (read,) = sweep.read_results(tmp_path)
    assert read["curvature"] == "exact" and read["damping_scale"] == ExactInverse.default_damping_scale
    new = old | {"curvature": "exact", "damping_scale": ExactInverse.default_damping_scale, "lds": 0.4}
    sweep.append_row(tmp_path, new)
    sweep.append_row(tmp_path, new | {"curvature": "ekfac", "damping_scale": EKFAC.default_damping_scale, "lds": 0.5})
    sweep.append_row(tmp_path, new | {"curvature": "ekfac", "damping_scale": 0.1, "lds": 0.45})
    rows = sweep.read_results(tmp_path)
    assert sorted((r["curvature"], r["lds"]) for r in rows) == [("ekfac", 0.45), ("ekfac", 0.5), ("exact", 0.4)]


def test_kfac_labels_are_part_of_the_row_and_run_keys(tmp_path):
    """A K-FAC/EK-FAC row from before the ``kfac_labels`` column reads as the training labels; a sampled-label row
    is another row (and another run dir); the other curvatures do not depend on the labels (None)."""
    from lorif_ray.config import Config, MethodConfig

    old = {"setup": "s", "method": "lorif", "curvature": "ekfac", "f": 4, "c": 4, "r": None, "damping": None,
           "damping_scale": EKFAC.default_damping_scale, "dtype": "float32", "seed": 0, "lds": 0.46}
    sweep.append_row(tmp_path, old)
    assert sweep.read_results(tmp_path)[0]["kfac_labels"] == "training"
    sweep.append_row(tmp_path, old | {"kfac_labels": "sampled", "lds": 0.49})
    sweep.append_row(tmp_path, old | {"kfac_labels": "training", "lds": 0.47})  # replaces the old row
    rows = sweep.read_results(tmp_path)
    assert sorted((r["kfac_labels"], r["lds"]) for r in rows) == [("sampled", 0.49), ("training", 0.47)]
    assert sweep.row_kfac_labels("woodbury", "sampled") is None
    cfg = Config(method=MethodConfig(name="lorif"), curvature="ekfac")
    index = Path("index/factors-f4-c4-0123")
    assert sweep.run_dir(cfg, index, tmp_path) != sweep.run_dir(replace(cfg, kfac_labels="sampled"), index, tmp_path)


def test_report_writes_markdown_and_plot(cache_root, tmp_path):
    pytest.importorskip("matplotlib")
    from lorif_ray.eval.report import write_report

    cfg = compose_cfg(cache_root)
    text = write_report(cfg.eval.results_dir, tmp_path / "quality.md", tmp_path / "lds.png")
    assert "| lorif |" in text and "| logra |" in text and "Noise ceiling" in text
    assert (tmp_path / "lds.png").read_bytes()[:4] == b"\x89PNG"
    assert "Top proponents" in text and "| 1 |" in text
    assert "| lorif+ekfac | ekfac |" in text and "## Kronecker curvatures" in text
