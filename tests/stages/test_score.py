"""On-the-fly scoring (jobs/score.py, lorif_ray.stages.score): stage 3 over the training set streamed through the
model once gives the indexed run's scores, and writes no index."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lorif_ray.config import ClusterConfig, QueryConfig
from lorif_ray.errors import ConfigError
from lorif_ray.stages.score import run_score
from tests.conftest import QUERY_CONFIG, SHARD_SIZE
from tests.stages.helpers import make_config

NONE = ClusterConfig(backend="none")


def config(assets, output_dir, method, **overrides):
    return make_config(assets, output_dir, method=method, shard_size=SHARD_SIZE, query=QueryConfig(**QUERY_CONFIG),
                       cluster=NONE, **overrides)


@pytest.fixture(scope="module")
def dense_runs(tiny_assets, tmp_path_factory):
    """One dense index of the tiny model, queried with identity (graddot) and with K-FAC (logra curvature=kfac)."""
    from lorif_ray.outputs.folders import claim_output_dir
    from lorif_ray.stages.curvature import run_curvature
    from lorif_ray.stages.index import run_index
    from lorif_ray.stages.query import run_query

    root = tmp_path_factory.mktemp("score")
    identity = config(tiny_assets, root / "identity", "graddot")
    claim_output_dir(identity)
    run_index(identity)
    runs = {}
    for name, cfg in (("identity", identity),
                      ("kfac", config(tiny_assets, root / "kfac", "logra", curvature="kfac",
                                      index_dir=str(identity.index_path)))):
        claim_output_dir(cfg)
        run_curvature(cfg)
        runs[name] = run_query(cfg)
    return root, runs


def same_run(live: dict, indexed: dict) -> None:
    """Equal full scores (rel ≤ 1e-4) and the same top-k ids and texts."""
    a, b = np.load(live["scores_path"]), np.load(indexed["scores_path"])
    assert a.shape == b.shape == (6, 48)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    top_live, top_indexed = pq.read_table(live["topk_path"]), pq.read_table(indexed["topk_path"])
    for column in ("train_id", "train_text"):
        assert top_live.column(column).to_pylist() == top_indexed.column(column).to_pylist()
    assert all(top_live.column("train_text").to_pylist())


def no_index(output_dir) -> None:
    """No index of any kind under ``output_dir``: no manifest, no shard file, no row table left."""
    out = Path(output_dir)
    assert not (out / "index").exists()
    assert not list(out.rglob("_manifest.json")) and not list(out.rglob("shard-*")) and not list(out.rglob("_rows*"))


def test_identity_on_the_fly_equals_the_indexed_run_and_writes_no_shard(tiny_assets, dense_runs, tmp_path):
    root, runs = dense_runs
    live = run_score(config(tiny_assets, tmp_path / "live", "graddot"))
    same_run(live, runs["identity"])
    assert live["passes"] == 1 and live["rows"] == "live"
    for name in ("opponents_path", "report_path"):
        assert Path(live[name]).is_file()
    no_index(tmp_path / "live")


def test_kfac_on_the_fly_is_a_statistics_pass_then_a_scoring_pass_equal_to_the_indexed_run(tiny_assets, dense_runs,
                                                                                            tmp_path):
    root, runs = dense_runs
    live = run_score(config(tiny_assets, tmp_path / "live", "logra", curvature="kfac"))
    same_run(live, runs["kfac"])
    assert live["passes"] == 2
    no_index(tmp_path / "live")


def test_curvature_from_scores_like_the_indexed_run_with_that_curvature(tiny_assets, baseline, tmp_path):
    indexed = baseline["cfg"]  # method=lorif: factor rows, Woodbury fitted from the index
    live = run_score(config(tiny_assets, tmp_path / "live", "lorif", curvature_from=indexed.output_dir))
    a = np.load(live["scores_path"])
    b = np.load(Path(indexed.output_dir) / "scores.npy")
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    assert live["passes"] == 1
    no_index(tmp_path / "live")


def test_curvature_from_with_other_settings_is_refused_by_key(tiny_assets, baseline, tmp_path):
    from lorif_ray.errors import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="curvature_from=.*config.r"):
        run_score(config(tiny_assets, tmp_path / "live", "lorif", r=8, curvature_from=baseline["cfg"].output_dir))


@pytest.mark.parametrize("curvature", ["woodbury", "exact"])
def test_a_curvature_that_reads_the_rows_is_refused_before_any_work_pointing_to_curvature_from(tiny_assets, tmp_path,
                                                                                               curvature):
    with pytest.raises(ConfigError, match=f"curvature={curvature}: .*curvature_from=<that output_dir>"):
        run_score(config(tiny_assets, tmp_path / "live", "lorif", curvature=curvature))
    assert not (tmp_path / "live").exists()


def test_on_ray_it_is_refused_by_name(tiny_assets, tmp_path):
    cfg = make_config(tiny_assets, tmp_path / "live", method="graddot", cluster=ClusterConfig(backend="ray"))
    with pytest.raises(ConfigError, match="cluster.backend=ray: .*not yet available.*cluster=none"):
        run_score(cfg)
    assert not (tmp_path / "live").exists()
