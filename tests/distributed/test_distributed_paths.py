"""One path per stage: streaming, resident and Ray (2 query actors) give the same scores for LoRIF (with and
without stored g'_t), LoGRA and GradDot; queries are featurized from the index's manifest on Ray too; and on a
spiked spectrum the Ray query service ranks like the float64 reference, as the one-process paths do."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from lorif_ray.config import QueryConfig
from lorif_ray.distributed.gram import RayGram
from lorif_ray.distributed.query_gradients import RemoteQueryFeaturizer
from lorif_ray.distributed.query_pool import QueryPool, ray_query
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import query_config, resolve_inputs
from lorif_ray.stages.query import run_query
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.outputs.query_outputs import output_files
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.distributed.conftest import NUM_WORKERS
from tests.stages.helpers import make_config
from tests.stages.spiked import spiked_config, with_output, write_spiked_index
from tests.stages.test_precision import path_scores, reference_scores

QUERY = dict(full_scores=True, top_k=5, train_batch_rows=7)


@pytest.mark.parametrize("method", ["lorif", "logra", "graddot"])
def test_streaming_resident_and_ray_give_the_same_scores(tiny_assets, tmp_path, ray_cluster, method):
    index_dir = str(tmp_path / "index")
    run_index(make_config(tiny_assets, tmp_path / "build", method=method, shard_size=10, index_dir=index_dir))
    for stored in ((False, True) if method == "lorif" else (False,)):
        cfg = make_config(tiny_assets, tmp_path / f"run_{stored}", method=method, shard_size=10, index_dir=index_dir,
                          query=QueryConfig(**QUERY, store_coordinates=stored))
        run_curvature(cfg)
        scores, routes = {}, {}
        for name, run, backend in (("streamed", cfg, None),
                                   ("resident", replace(cfg, query=replace(cfg.query, resident=True)), None),
                                   ("ray", cfg, partial(ray_query, num_workers=NUM_WORKERS))):
            report = run_query(run) if backend is None else run_query(run, backend)
            routes[name] = report["route"]
            scores[name] = np.load(f"{cfg.output_dir}/scores.npy")
        assert len(set(routes.values())) == 1, routes  # one plan, whatever the backend
        reference = scores["streamed"]
        for name, got in scores.items():
            assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max(), (method, stored, name)


def test_ray_stage_two_equals_one_process_on_a_dense_index(tiny_assets, tmp_path, ray_cluster):
    """LoGRA's exact inverse from Gram workers (D×D partial sums) equals the one-process one."""

    index_dir = str(tmp_path / "index")
    one = make_config(tiny_assets, tmp_path / "one", method="logra", shard_size=10, index_dir=index_dir)
    run_index(one)
    run_curvature(one)
    ray = make_config(tiny_assets, tmp_path / "ray", method="logra", shard_size=10, index_dir=index_dir)
    run_curvature(ray, partial(RayGram, num_workers=NUM_WORKERS))
    expected, _ = CurvatureFolder(one.curvature_path).read_all()
    got, _ = CurvatureFolder(ray.curvature_path).read_all()
    for name, tensor in expected.items():
        assert (got[name] - tensor).norm() <= 1e-9 * tensor.norm(), name


def test_queries_follow_the_index_manifest_on_ray(tiny_assets, tmp_path, ray_cluster):
    """An index built with factor_iters=3, queried with factor_iters unset: the query factors are those of 3
    iterations in one process and on a Ray gradient replica alike (Ray used the query's own default before)."""
    built = make_config(tiny_assets, tmp_path, factor_iters=3, shard_size=10)
    run_index(built)
    cfg = replace(built, factor_iters=None)
    manifest = IndexFolder(cfg.index_path).manifest()
    assert query_config(cfg, manifest).factor_iters == 3
    rows = featurize_queries(cfg, manifest)
    ids, local = rows.ids, rows.columns
    with RemoteQueryFeaturizer(cfg, manifest) as featurize:
        remote_rows = featurize(resolve_inputs(cfg).queries_path)
    remote_ids, remote = remote_rows.ids, remote_rows.columns
    assert ids == remote_ids and set(local) == set(remote)
    for column, values in local.items():
        torch.testing.assert_close(remote[column], values, rtol=1e-5, atol=1e-6)
    from lorif_ray.errors import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="factor_iters: index 3 vs config 8"):
        featurize_queries(replace(built, factor_iters=8), manifest)


def test_the_ray_service_ranks_like_the_float64_reference_on_a_spiked_spectrum(tmp_path, ray_cluster):
    """bfloat16 storage, default policy, σ₁²/λ ≥ 500: 2 query actors agree with the one-process paths to
    float32 rounding on every route, and so rank like the float64 reference."""
    cfg = spiked_config(tmp_path, "bfloat16")
    train, queries = write_spiked_index(cfg)
    cfg = with_output(cfg, "out", store_coordinates=True)
    run_curvature(cfg, partial(RayGram, num_workers=NUM_WORKERS))
    queries = {k: v.float() for k, v in queries.items()}
    local = path_scores(cfg, queries)
    reference = reference_scores(cfg, train, queries).numpy()
    manifest = IndexFolder(cfg.index_path).manifest()
    for route in ("recompute", "query", "stored"):
        folder = CurvatureFolder(cfg.curvature_path)
        with QueryPool(cfg, folder, num_workers=NUM_WORKERS, stored=route == "stored") as pool, \
                output_files(cfg, manifest, 12) as files:
            pool.score(queries, route, 10, files)
        got = np.load(f"{cfg.output_dir}/scores.npy")
        expected = local[f"streamed/{route}"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), route
        overlap = np.mean([len(set(np.argsort(-got[q])[:10]) & set(np.argsort(-reference[q])[:10])) / 10
                           for q in range(len(got))])
        assert overlap >= 0.95, route
