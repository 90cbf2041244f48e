"""The side-by-side latency bench on the tiny setup: a synthetic index with the point's layout and K-FAC
statistics, every curvature fitted and timed on it."""

from lorif_ray.eval import latency
from lorif_ray.store import IndexFolder

from tests.eval.test_sweep import compose_cfg


def test_bench_times_each_curvature_on_one_synthetic_index(tmp_path):
    cfg = compose_cfg(tmp_path / "cache", "method=lorif", "f=2", "c=1", "r=4")
    table = latency.bench(cfg, rows=300, curvatures=["woodbury", "ekfac"], repeats=2)
    assert [r["curvature"] for r in table] == ["woodbury", "ekfac"]
    assert all(len(r["score_seconds"]) == 2 and r["rows"] == 300 for r in table)
    (index,) = (tmp_path / "cache" / "latency").glob("*/index")
    _, shards = IndexFolder(index).folded_statistics()
    assert IndexFolder(index).manifest().num_rows == 300 and shards == {0}
    assert "| ekfac |" in latency.markdown(cfg, table)
