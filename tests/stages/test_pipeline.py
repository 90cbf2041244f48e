"""The three stages in one process: resumption, reuse, errors, storage accounting."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray.config import ClusterConfig, Config, QueryConfig
from lorif_ray.errors import (ConfigError, CorruptShardError, DataError, IndexMismatchError, ModelMismatchError,
                              NoLossTokensError, NonFiniteGradientError)
from lorif_ray.stages.attribute import run_attribute
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from tests.conftest import write_tiny_model_dir
from tests.stages.helpers import make_config


def test_lost_shard_is_recomputed_and_nothing_else(tiny_assets, tmp_path):
    cfg = make_config(tiny_assets, tmp_path, shard_size=16)
    first = run_attribute(cfg)
    scores = np.load(tmp_path / "scores.npy")
    (tmp_path / "index" / "shard-00001.parquet").unlink()  # a crash lost it
    again = run_index(cfg)
    assert first["index"]["computed"] == 48 and again["computed"] == 16 and again["skipped_shards"] == 2
    run_curvature(cfg)
    run_query(cfg)
    assert np.allclose(np.load(tmp_path / "scores.npy"), scores, rtol=1e-6, atol=1e-9)
    # the index directory reads as a Parquet dataset without this package
    table = pq.read_table(tmp_path / "index")
    assert table.column("example_id").to_pylist() == [f"t{i}" for i in range(48)]


def test_a_failed_background_write_stops_stage_one_and_keeps_the_shards_before_it(tiny_assets, tmp_path,
                                                                                     monkeypatch):
    """Shards are written on a background thread while the next one is computed: a write that fails
    (here: the disk is full for shard 1) stops the run with that error, shard 0 stays committed, and the
    re-run computes only what is missing."""
    from lorif_ray.store import ShardWriter

    cfg = make_config(tiny_assets, tmp_path, shard_size=16)
    real_write = ShardWriter.write_file

    def disk_full_for_shard_one(self, shard, ids, arrays):
        if shard == 1:
            raise OSError(28, "No space left on device")
        return real_write(self, shard, ids, arrays)

    monkeypatch.setattr(ShardWriter, "write_file", disk_full_for_shard_one)
    with pytest.raises(OSError, match="No space left"):
        run_index(cfg)
    monkeypatch.setattr(ShardWriter, "write_file", real_write)
    from lorif_ray.store.manifest import Manifest

    committed = [s.index for s in Manifest.load(tmp_path / "index").shards]  # the manifest and its shard log
    assert committed[:1] == [0] and 1 not in committed
    again = run_index(cfg)
    assert again["computed"] == 48 - 16 * len(committed)
    assert pq.read_table(tmp_path / "index").column("example_id").to_pylist() == [f"t{i}" for i in range(48)]


def test_sweep_over_r_reuses_the_index(tiny_assets, tmp_path):
    index_dir = str(tmp_path / "shared_index")
    a = run_attribute(make_config(tiny_assets, tmp_path / "r4", r=4, index_dir=index_dir))
    b = run_attribute(make_config(tiny_assets, tmp_path / "r8", r=8, index_dir=index_dir))
    assert a["index"]["computed"] == 48 and b["index"]["computed"] == 0
    assert b["curvature"]["layers"]["transformer.h.0.attn.c_attn"]["rank"] == 8
    # a reused stage says so and reports the timing of the run that made it (issue 20, row 7: not 0 s)
    assert (a["index"]["reused"], b["index"]["reused"]) == (False, True)
    assert b["index"]["seconds"] == a["index"]["seconds"] > 0 and b["index"]["built_examples"] == 48
    again = run_curvature(make_config(tiny_assets, tmp_path / "r8", r=8, index_dir=index_dir))
    assert again["reused"] and again["seconds"] == b["curvature"]["seconds"] > 0
    saved = json.loads((tmp_path / "r8" / "report.json").read_text())
    assert saved["index"]["reused"] and saved["index"]["seconds"] == a["index"]["seconds"]


def test_other_config_on_an_existing_index_is_refused(tiny_assets, tmp_path):
    run_index(make_config(tiny_assets, tmp_path))
    with pytest.raises(IndexMismatchError, match="f"):
        run_index(make_config(tiny_assets, tmp_path, f=2))
    with pytest.raises(IndexMismatchError, match="factors"):
        run_curvature(make_config(tiny_assets, tmp_path, method="logra"))


def test_storage_is_c_times_d1_plus_d2_with_small_overhead(tmp_path):
    assets = write_tiny_model_dir(tmp_path / "data", n_train=1024)
    report = run_index(make_config(assets, tmp_path / "out", c=2, shard_size=1024))
    # tiny GPT-2 (n_embd 32), f=4: c_attn 32→96, attn c_proj 32→32, c_fc 32→128, mlp c_proj 128→32
    expected = {"attn.c_attn": 2 * (8 + 24), "attn.c_proj": 2 * (8 + 8), "mlp.c_fc": 2 * (8 + 32), "mlp.c_proj": 2 * (32 + 8)}
    for name, floats in report["bytes_per_example_per_layer"].items():
        assert floats == 4 * expected[name.split(".", 3)[-1]]
    assert report["payload_bytes_per_example"] == sum(report["bytes_per_example_per_layer"].values())
    assert report["overhead_fraction"] < 0.01, report


def test_model_mismatch_is_detected(tiny_assets, tmp_path):
    cfg = make_config(tiny_assets, tmp_path)
    run_index(cfg)
    run_curvature(cfg)
    other = write_tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(ModelMismatchError, match="weights_fingerprint"):
        run_query(make_config({**tiny_assets, "model": other["model"]}, tmp_path))


def test_corrupt_shard_is_named(tiny_assets, tmp_path):
    cfg = make_config(tiny_assets, tmp_path, shard_size=16)
    run_index(cfg)
    shard = tmp_path / "index" / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-00002"):
        run_curvature(cfg)


def test_nan_gradients_are_named(tmp_path):
    assets = write_tiny_model_dir(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(assets["model"])
    with pytest.raises(NonFiniteGradientError, match=r"layer transformer\.h\.\d.* examples \['t0'"):
        run_index(make_config(assets, tmp_path / "out"))


def test_bad_data_is_named(tiny_assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        run_index(make_config({**tiny_assets, "train": empty}, tmp_path / "a"))
    masked = tmp_path / "masked.jsonl"
    masked.write_text(json.dumps({"id": "long", "prompt": "the cat " * 40, "response": " sat"}) + "\n")
    with pytest.raises(NoLossTokensError, match="long"):
        run_index(make_config({**tiny_assets, "train": masked}, tmp_path / "b"))
    for bad in (dict(f=0), dict(c=0), dict(r=0), dict(damping=-1.0), dict(dtype="int8")):
        with pytest.raises(ConfigError):
            Config(**bad)


def test_normalized_scores_are_cosines_in_the_curvature_metric(tiny_assets, tmp_path):
    # queries = the first training examples, so each query's own example scores exactly 1
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": json.loads(line)["text"]}) + "\n"
                               for i, line in enumerate(tiny_assets["train"].read_text().splitlines()[:4])))
    for method in ("lorif", "logra", "graddot"):
        cfg = make_config({**tiny_assets, "queries": queries}, tmp_path / method, method=method, c=1000, r=1000,
                          query=QueryConfig(full_scores=True, normalize=True, top_k=3))
        run_attribute(cfg)
        scores = np.load(tmp_path / method / "scores.npy")
        assert np.all(np.abs(scores) <= 1 + 1e-5)
        assert np.allclose(scores[np.arange(4), np.arange(4)], 1.0, atol=1e-5)
        top = pq.read_table(tmp_path / method / "topk.parquet").to_pylist()
        assert [r["train_id"] for r in top if r["rank"] == 1] == ["t0", "t1", "t2", "t3"]


def test_topk_agrees_with_full_scores_on_a_llama(tmp_path):
    assets = write_tiny_model_dir(tmp_path, arch="llama")
    cfg = make_config(assets, tmp_path / "out", r=16, dtype="bfloat16", query=QueryConfig(full_scores=True, top_k=4))
    run_attribute(cfg)
    scores = np.load(tmp_path / "out" / "scores.npy")
    top = pq.read_table(tmp_path / "out" / "topk.parquet").to_pylist()
    for q in range(scores.shape[0]):
        expected = [f"t{i}" for i in np.argsort(-scores[q])[:4]]
        assert [r["train_id"] for r in top if r["query_id"] == f"q{q}"] == expected


def test_lorif_at_full_rank_equals_logra(tiny_assets, tmp_path):
    """c ≥ min(d1, d2) makes factors exact and r ≥ rank(G) makes the Woodbury inverse exact: LoRIF equals LoGRA
    (the key correctness test). Where the stages run changes no number (tests/distributed/test_distributed_paths.py);
    the jobs run on Ray in tests/user/test_readme.py."""
    scores = {}
    for method, extra in (("lorif", {"c": 1000, "r": 1000}), ("logra", {})):
        cfg = make_config(tiny_assets, tmp_path / method, method=method, f=4, seed=3, damping=0.01,
                          cluster=ClusterConfig(backend="none"), **extra)
        run_attribute(cfg)
        scores[method] = np.load(tmp_path / method / "scores.npy")
    assert scores["lorif"].shape == (6, 48) and scores["lorif"].dtype == np.float32
    assert np.linalg.norm(scores["lorif"] - scores["logra"]) / np.linalg.norm(scores["logra"]) <= 1e-4
    columns = pq.read_table(tmp_path / "lorif" / "topk.parquet").column_names
    assert columns == ["query_id", "query_text", "rank", "train_id", "train_text", "score"]
