"""Hugging Face conventions (issue 20, row 9, and the per-run log of row 7), as a user meets them.

A Hub id resolved through a pre-filled local Hugging Face cache (these machines have no network), a
`DatasetDict` saved with `save_to_disk` (written here with pyarrow in the layout `datasets` writes: it is not
installed), columns named `content` / `question` / `answer` / `doc_id`, a bf16 model object, an iterable of rows:
each gives the same numbers as the plain files of the baseline, or is refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
import torch

from lorif_ray import Attributor
from lorif_ray.errors import ConfigError, DataError
from lorif_ray.store import IndexFolder
from tests.conftest import write_hub_cache
from tests.stages.helpers import index_columns
from tests.user.conftest import job_env, ray_started, run

HUB_ID = "tiny-org/tiny-gpt2"


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save_dataset_dict(folder, splits: dict[str, pa.Table]) -> None:
    """A `DatasetDict.save_to_disk` folder: dataset_dict.json, and per split an Arrow stream file with
    state.json and dataset_info.json, as `datasets` writes them."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, table in splits.items():
        (folder / name).mkdir()
        with pa.OSFile(str(folder / name / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (folder / name / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": name, "_format_columns": None,
            "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": name}))
        (folder / name / "dataset_info.json").write_text(json.dumps({"features": {}, "splits": {}}))


def renamed_splits(assets) -> dict[str, pa.Table]:
    """The baseline's training and query rows with the columns of another dataset: content, question, answer,
    doc_id."""
    train, queries = _rows(assets["train"]), _rows(assets["queries"])
    return {"train": pa.table({"doc_id": [r["id"] for r in train], "content": [r["text"] for r in train]}),
            "test": pa.table({"doc_id": [r["id"] for r in queries], "question": [r["prompt"] for r in queries],
                              "answer": [r["response"] for r in queries]})}


def test_a_hub_id_a_dataset_dict_and_other_column_names_through_the_job(tiny_assets, baseline, tmp_path):
    """`model.path=<Hub id>` (found in the cache, nothing downloaded), `data.train=<DatasetDict> data.split=train`,
    `data.queries=<the same> data.query_split=test` and the column keys give the baseline's scores; each run
    logs to its own file, `attribute.log` is the newest, and `.hydra/` records what the user typed."""
    cache = tmp_path / "hf-cache"
    write_hub_cache(cache, HUB_ID, tiny_assets["model"])
    data = tmp_path / "dataset"
    save_dataset_dict(data, renamed_splits(tiny_assets))
    env, out = job_env(tmp_path, HF_HUB_CACHE=str(cache)), tmp_path / "out"
    args = [f"model.path={HUB_ID}", f"data.train={data}", "data.split=train", f"data.queries={data}",
            "data.query_split=test", "data.text_column=content", "data.prompt_column=question",
            "data.response_column=answer", "data.id_column=doc_id", "data.max_length=32", "data.batch_size=8",
            "cluster=none", "progress=false", "model.device=cpu", "query.full_scores=true", f"output_dir={out}"]
    first = run("attribute", *args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = np.load(baseline["cfg"].output_dir + "/scores.npy")
    scores = np.load(out / "scores.npy")
    assert scores.shape == expected.shape == (6, 48)
    assert np.abs(scores - expected).max() <= 1e-4 * np.abs(expected).max()
    ids = json.loads((out / "scores.json").read_text())
    assert ids["query_ids"] == [f"q{i}" for i in range(6)] and ids["train_ids"] == [f"t{i}" for i in range(48)]
    meta = IndexFolder(out / "index").manifest().meta
    assert meta["data"]["columns"] == {"text": "content", "prompt": "question", "response": "answer", "id": "doc_id"}
    assert "query q0: " in first.stdout  # the proponents' texts come from the mapped columns
    second = run("attribute", *args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    logs = sorted((out / "logs").iterdir())
    assert [p.name.split("-")[0] for p in logs] == ["attribute", "attribute"]
    assert (out / "attribute.log").resolve() == logs[-1].resolve()
    assert "nothing to compute" in logs[-1].read_text() and "nothing to compute" not in logs[0].read_text()
    assert f"model.path={HUB_ID}" in (out / ".hydra" / "overrides.yaml").read_text()
    assert not ray_started(tmp_path)


def test_a_dataset_dict_without_a_split_or_an_unknown_column_is_one_line(tiny_assets, tmp_path):
    data = tmp_path / "dataset"
    save_dataset_dict(data, renamed_splits(tiny_assets))
    env = job_env(tmp_path)
    common = [f"model.path={tiny_assets['model']}", "cluster=none", "data.max_length=32",
              f"output_dir={tmp_path / 'out'}"]
    no_split = run("index", *common, f"data.train={data}", env=env)
    assert no_split.returncode == 2 and no_split.stderr.strip() == (
        f"error: {data} is a DatasetDict with splits train, test: choose one with data.split=train")
    columns = run("index", *common, f"data.train={data}", "data.split=train", env=env)
    assert columns.returncode == 2
    assert columns.stderr.strip().startswith(f"error: {data / 'train'}: expected a 'text' column, 'prompt' and "
                                             "'response' columns, or a 'messages' column; found ['content', 'doc_id']")
    assert "data.text_column" in columns.stderr and not (tmp_path / "out").exists()


def test_the_api_takes_a_dataset_dict_an_iterable_and_keeps_a_bf16_model(tiny_assets, baseline, tmp_path):
    """A mapping of splits (what a `datasets.DatasetDict` is) with `split=`, a generator of rows (written once to
    Parquet in shard-size row groups), and a bf16 model object that stays bf16 (it ran in float32) or is refused
    by name when `model_dtype` says otherwise."""
    from transformers import AutoModelForCausalLM

    from lorif_ray.model.loading import load_tokenizer

    splits = renamed_splits(tiny_assets)
    columns = {"text": "content", "prompt": "question", "response": "answer", "id": "doc_id"}
    attributor = Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "dict", max_length=32, device="cpu",
                            columns=columns, shard_size=10)
    with pytest.raises(DataError, match=r"a dict with splits train, test: choose one, e\.g\. index\(\.\.\., "
                                        r"split='train'\)"):
        attributor.index(splits)
    attributor.index(splits, split="train")
    expected = index_columns(baseline["cfg"].index_path)
    for name, values in index_columns(tmp_path / "dict" / "index").items():
        assert torch.allclose(values, expected[name], rtol=1e-4, atol=1e-6), name
    attributor.fit_curvature()
    results = attributor.query(splits, split="test")
    queries = _rows(tiny_assets["queries"])
    assert results.query_ids == [q["id"] for q in queries]
    first = results.topk.filter(pa.compute.equal(results.topk.column("query_id"), "q0"))
    assert set(first.column("query_text").to_pylist()) == {queries[0]["prompt"] + queries[0]["response"]}
    texts = {r["id"]: r["text"] for r in _rows(tiny_assets["train"])}
    assert all(p["train_text"] == texts[p["train_id"]] for p in results.proponents("q0"))

    streamed = Attributor(str(tiny_assets["model"]), output_dir=tmp_path / "stream", max_length=32, device="cpu",
                          shard_size=10)
    streamed.index(row for row in _rows(tiny_assets["train"]))
    written = next((tmp_path / "stream" / "inputs").glob("train-*.parquet"))
    assert pq.ParquetFile(written).metadata.num_row_groups == 5  # 48 rows, 10 a group: one group held at a time
    for name, values in index_columns(tmp_path / "stream" / "index").items():
        assert torch.allclose(values, expected[name], rtol=1e-4, atol=1e-6), name

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).to(torch.bfloat16)
    tokenizer = load_tokenizer(tiny_assets["model"])
    with pytest.raises(ConfigError, match=r"model_dtype='float32': the model object holds bfloat16 weights"):
        Attributor(model, tokenizer, output_dir=tmp_path / "refused", model_dtype="float32")
    assert not (tmp_path / "refused").exists()
    bf16 = Attributor(model, tokenizer, output_dir=tmp_path / "bf16", max_length=32, device="cpu", shard_size=48)
    assert bf16.config.model.dtype == "bfloat16"
    bf16.index(tiny_assets["train"])
    assert IndexFolder(tmp_path / "bf16" / "index").manifest().meta["config"]["model_dtype"] == "bfloat16"
