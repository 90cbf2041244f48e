"""The Python API (its README block runs as it stands in tests/user/test_readme.py): it gives the CLI path's scores, reads
every data kind, and applies the query measurement (a name or a function) and records it."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lorif_ray import Attributor, Results
from lorif_ray.config import ClusterConfig
from lorif_ray.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


def test_api_scores_equal_the_cli_path(tiny_assets, tmp_path, recording_bars):
    """Attributor and run_attribute (what jobs/attribute.py cluster=none runs) on the same config and files; the
    API draws its bars by default (the config here has them off)."""
    from lorif_ray.stages.attribute import run_attribute
    from tests.stages.helpers import make_config

    cfg = make_config(tiny_assets, tmp_path / "cli", cluster=ClusterConfig(backend="none"), r=16)
    run_attribute(cfg)
    attributor = Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "api", r=16, max_length=32,
                            device="cpu", top_k=5)
    assert attributor.config.to_dict() == {**cfg.to_dict(), "output_dir": str(tmp_path / "api"), "progress": True,
                                           "data": {**cfg.to_dict()["data"], "train": None, "queries": None,
                                                    "batch_size": 8}}
    attributor.index(tiny_assets["train"])
    attributor.fit_curvature()
    results = attributor.query(tiny_assets["queries"])
    cli = np.load(tmp_path / "cli" / "scores.npy")
    assert results.scores.shape == cli.shape == (6, 48)
    assert np.abs(results.scores - cli).max() <= 1e-10 * np.abs(cli).max()
    assert results.topk.column_names == ["query_id", "query_text", "rank", "train_id", "train_text", "score"]
    assert results.measurement == "loss" and results.meta["config"]["query"]["measurement"] == "loss"
    first = results.proponents("q0")
    assert [p["rank"] for p in first] == [1, 2, 3, 4, 5]
    assert first[0]["train_id"] == results.train_ids[int(np.argmax(cli[0]))]
    for stage in ("stage 1: index", "stage 2: curvature", "stage 3: score"):
        cli_bar, api_bar = recording_bars[stage]
        assert not cli_bar.enabled and api_bar.enabled and api_bar.n == api_bar.total > 0, stage


def test_in_memory_model_lists_and_measurements(tiny_assets, tmp_path):
    """A model object (saved under output_dir), lists of strings and dicts, logprob = loss, a function = its name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    train = [json.loads(line)["text"] for line in tiny_assets["train"].read_text().splitlines()]
    attributor = Attributor(model, tokenizer, output_dir=tmp_path / "run", r=8, max_length=32, device="cpu", top_k=3)
    assert Path(attributor.config.model.path) == tmp_path / "run" / "model"
    attributor.index(train)
    attributor.fit_curvature()
    queries = [{"id": "x", "prompt": "the cat", "response": " sat on"},
               {"id": "y", "prompt": "a dog", "response": " ran"}]
    loss = attributor.query(queries)
    assert loss.topk.column("query_text").to_pylist()[:3] == ["the cat sat on"] * 3
    assert loss.proponents("x")[0]["train_text"] in train
    logprob = attributor.query(queries, measurement="logprob")
    assert logprob.measurement == "logprob" and np.array_equal(np.asarray(logprob.scores), np.asarray(loss.scores))

    def mean_of_loss(outputs, batch):
        from lorif_ray.math.capture import mean_loss

        return mean_loss(outputs, batch)

    custom = attributor.query(queries, measurement=mean_of_loss)
    builtin = attributor.query(queries, measurement="mean_loss")
    assert custom.measurement.startswith("custom:") and custom.measurement.endswith("mean_of_loss")
    assert np.allclose(custom.scores, builtin.scores, rtol=1e-6, atol=0)
    counts = np.array([2, 1])  # target tokens of "sat on" and "ran"
    assert np.allclose(np.asarray(builtin.scores) * counts[:, None], loss.scores, rtol=1e-4, atol=1e-6)
    more = attributor.query(queries, self_influence=True, per_layer=True, per_token=True)
    assert more.token_topk.column("token").to_pylist()[::3] == ["sat", "on", "ran"]  # a word tokenizer
    assert more.token_topk.column("query_text").to_pylist()[0] == "the cat sat on"
    assert more.self_influence.column_names == ["train_id", "train_text", "self_influence"]
    assert more.self_influence.column("train_text").to_pylist() == train
    assert more.layer_scores.shape == (len(more.layers), 2, 48)  # the queries' (token rows have their own table)
    assert more.query_ids == ["x", "y"] and more.token_ids == ["x@3", "x@4", "y@3"]
    assert more.token_scores.shape == (3, 48) and more.tokens.column("token").to_pylist() == ["sat", "on", "ran"]


def test_errors_and_pandas(tiny_assets, tmp_path):
    attributor = Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "run", max_length=32, device="cpu")
    with pytest.raises(DataError, match=r"row 1: prompt \+ response where row 0 has text"):
        attributor.index([{"text": "the cat"}, {"prompt": "a", "response": " dog"}])
    with pytest.raises(ConfigError, match="measurement='margin'"):
        Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "other", measurement="margin")
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        Attributor(object(), output_dir=tmp_path / "third")
    with pytest.raises(ConfigError, match="runs with cluster=None"):
        Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "ray", cluster="local").query(
            ["the cat"], measurement=lambda outputs, batch: outputs.logits.sum((1, 2)))
    results = Results.__new__(Results)
    results.topk = pa.table({"query_id": ["q"]})
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            results.to_pandas()
    else:
        assert len(results.to_pandas()) == 1


def test_summary_counts_known_sources_within_the_stored_ranks(tmp_path):
    """With query.top_k=3 the summary reports the top-3, not a top-5 it does not have."""
    import pyarrow.parquet as pq

    from lorif_ray.outputs.summary import describe_proponents

    query = {"id": "q", "prompt": "a", "response": " b", "source_id": "t2"}
    (tmp_path / "q.jsonl").write_text(json.dumps(query) + "\n")
    pq.write_table(pa.table({"query_id": ["q"] * 3, "rank": [1, 2, 3], "train_id": ["t0", "t1", "t2"],
                             "train_text": ["w0", "w1", "w2"], "score": [3.0, 2.0, 1.0]}), tmp_path / "topk.parquet")
    text = describe_proponents(tmp_path / "topk.parquet", tmp_path / "q.jsonl")
    assert "known source in the top-3: 1/1" in text and "top-5" not in text
    assert "3. +1  [t2] w2  <- known source" in text  # the text from topk.parquet
    assert "known source in the top-1: 0/1" in text


class _FakeDataset:
    """What the API uses of a ``datasets.Dataset`` (not installed here): ``column_names`` and
    ``with_format("arrow")[:]``, the rows in the dataset's order."""

    def __init__(self, table):
        self.table, self.column_names = table, table.column_names

    def with_format(self, kind):
        assert kind == "arrow"
        return self

    def __getitem__(self, key):
        return self.table[key] if isinstance(key, str) else self.table.slice(0, self.table.num_rows)


def test_chat_queries_and_a_dataset_object(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} . {% endfor %}"
                               "{% if add_generation_prompt %}{% endif %}")
    train = pa.table({"text": [json.loads(line)["text"] for line in tiny_assets["train"].read_text().splitlines()]})
    attributor = Attributor(model, tokenizer, output_dir=tmp_path / "chat", r=8, max_length=32, device="cpu", top_k=2)
    attributor.index(_FakeDataset(train))
    attributor.fit_curvature()
    results = attributor.query([{"id": "c", "messages": [{"role": "user", "content": "the cat"},
                                                         {"role": "assistant", "content": "sat on the mat"}]}])
    assert results.topk.column("query_text").to_pylist() == ["user: the cat\nassistant: sat on the mat"] * 2
    assert results.proponents("c")[0]["train_text"] in train.column("text").to_pylist()
    assert results.scores.shape == (1, 48)


def test_score_without_an_index_equals_index_then_query(tiny_assets, tmp_path):
    """Attributor.score (the training set streamed once, nothing indexed) gives the Results of index + fit + query
    for the same method (graddot: identity), with the texts; on Ray it is refused by name before any work."""
    indexed = Attributor(str(tiny_assets["model"]), method="graddot", output_dir=tmp_path / "indexed",
                         max_length=32, device="cpu", top_k=5, cluster="none", progress=False)
    indexed.index(tiny_assets["train"])
    indexed.fit_curvature()
    want = indexed.query(tiny_assets["queries"])
    live = Attributor(str(tiny_assets["model"]), method="graddot", output_dir=tmp_path / "live", max_length=32,
                      device="cpu", top_k=5, cluster="none", progress=False)
    got = live.score(tiny_assets["queries"], tiny_assets["train"])
    assert got.scores.shape == want.scores.shape
    assert np.abs(got.scores - want.scores).max() <= 1e-4 * np.abs(want.scores).max()
    assert got.topk.column("train_id").to_pylist() == want.topk.column("train_id").to_pylist()
    assert all(got.topk.column("train_text").to_pylist()) and not (tmp_path / "live" / "index").exists()
    on_ray = Attributor(str(tiny_assets["model"]), method="graddot", output_dir=tmp_path / "ray", max_length=32,
                        device="cpu", progress=False, cluster="local")
    with pytest.raises(ConfigError, match="cluster=none"):
        on_ray.score(tiny_assets["queries"], tiny_assets["train"])
