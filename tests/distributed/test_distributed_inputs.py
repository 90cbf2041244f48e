"""A Hub id, a DatasetDict split and mapped column names reach the Ray actors (issue 20, row 9).

The driver resolves the Hub id in the Hugging Face cache it sees (``HF_HUB_CACHE``, set in this process after
the session's Ray workers started, so they never see it): the actors load the snapshot folder they are handed.
The gradient actors read their shards' rows with the mapped columns (``InputShard.columns``) and the Ray query
featurizer reads the queries with them: the scores are the one-process baseline's.
"""

from __future__ import annotations

import numpy as np

from lorif_ray.config import ClusterConfig, DataConfig, QueryConfig
from lorif_ray.store import IndexFolder
from tests.conftest import QUERY_CONFIG, SHARD_SIZE, write_hub_cache
from tests.stages.helpers import make_config
from tests.user.test_hf_conventions import renamed_splits, save_dataset_dict


def test_hub_id_split_and_columns_on_ray_equal_the_baseline(tiny_assets, baseline, tmp_path, ray_cluster,
                                                            monkeypatch):
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.stages.attribute import run_local_stage

    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, "org/tiny", tiny_assets["model"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = tmp_path / "dataset"
    save_dataset_dict(data, renamed_splits(tiny_assets))
    cfg = make_config(tiny_assets, tmp_path / "out", shard_size=SHARD_SIZE, query=QueryConfig(**QUERY_CONFIG),
                      cluster=ClusterConfig(gradient_actors=1, query_actors=2))
    cfg.model.path = "org/tiny"
    cfg.data = DataConfig(train=str(data), split="train", queries=str(data), query_split="test", max_length=32,
                          text_column="content", prompt_column="question", response_column="answer",
                          id_column="doc_id")
    report = run_stage("index", cfg)
    assert report["examples"] == 48
    manifest = IndexFolder(cfg.index_path).manifest()
    assert manifest.meta["data"]["columns"]["text"] == "content"
    run_local_stage("curvature", cfg)
    query = run_stage("query", cfg)
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    scores = np.load(query["topk_path"].replace("topk.parquet", "scores.npy"))
    assert np.abs(scores - expected).max() <= 1e-4 * np.abs(expected).max()
    # the actors, which do not see HF_HUB_CACHE, loaded the folder the driver resolved
    assert (snapshot / "config.json").is_file() and cfg.model.path == "org/tiny"
