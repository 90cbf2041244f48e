"""Stage 1 in one process reads its input shard by shard: any input kind gives the index of the JSON Lines
file, a resumed run reads the rows of the missing shards only, and the same pass writes the row table."""

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lorif_ray.stages.inputs as inputs
from lorif_ray.data import TrainTexts
from lorif_ray.errors import IndexMismatchError
from lorif_ray.stages.index import run_index
from lorif_ray.store import IndexFolder, Manifest
from lorif_ray.store.index_folder import ROWS_NAME
from tests.conftest import SHARD_SIZE
from tests.stages.helpers import index_columns, make_config


def test_a_parquet_input_gives_the_index_of_its_jsonl_twin(tiny_assets, baseline, tmp_path):
    """Row groups of 7 rows never align with shards of 10: each shard is cut out of two row groups."""
    rows = [json.loads(line) for line in Path(tiny_assets["train"]).read_text().splitlines()]
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train, row_group_size=7)
    cfg = make_config({**tiny_assets, "train": train}, tmp_path / "out", shard_size=SHARD_SIZE)
    assert run_index(cfg)["computed"] == 48
    expected = baseline["cfg"].index_path
    assert IndexFolder(cfg.index_path).ids() == IndexFolder(expected).ids()
    actual, wanted = index_columns(cfg.index_path), index_columns(expected)
    assert all(torch.equal(actual[name], wanted[name]) for name in wanted)


def test_a_resumed_run_reads_only_the_missing_shards_rows(tiny_assets, tmp_path, monkeypatch):
    cfg = make_config(tiny_assets, tmp_path, shard_size=SHARD_SIZE)
    run_index(cfg)
    manifest = Manifest.load(cfg.index_path)  # as if the run had died before committing shard 3
    manifest.shards = [s for s in manifest.shards if s.index != 3]
    manifest.complete, manifest.num_rows = False, None
    manifest.save(cfg.index_path)
    read, real = [], inputs.read_shard
    monkeypatch.setattr(inputs, "read_shard", lambda shard: read.append(shard.rows) or real(shard))
    report = run_index(cfg)
    assert (report["computed"], report["skipped_shards"]) == (SHARD_SIZE, 4)
    assert [(r.start, r.stop) for r in read] == [(30, 40)]
    assert IndexFolder(cfg.index_path).ids() == [f"t{i}" for i in range(48)]


def test_stage_1_writes_the_row_table_beside_the_shards(tiny_assets, tmp_path):
    """Stage 1 writes ``_rows.parquet`` (the ids in index order; the dataset reader still sees the shards only); a
    finished index without it gets it on the next run, and a run refused for another input leaves it alone."""
    cfg = make_config(tiny_assets, tmp_path, shard_size=SHARD_SIZE)
    run_index(cfg)
    table = cfg.index_path / ROWS_NAME
    assert pq.read_table(table).column("example_id").to_pylist() == IndexFolder(cfg.index_path).ids()
    assert pq.read_table(cfg.index_path).num_rows == 48 and "example_id" in pq.read_table(cfg.index_path).column_names
    last = json.loads(tiny_assets["train"].read_text().splitlines()[47])["text"]
    assert TrainTexts(cfg.index_path).texts([47]) == {47: last}
    table.unlink()
    assert run_index(cfg)["computed"] == 0 and table.is_file()  # reused, and the table written again
    before = table.read_bytes()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": "the cat"}) + "\n" for i in range(48)))
    with pytest.raises(IndexMismatchError):
        run_index(replace(cfg, data=replace(cfg.data, train=str(other))))
    assert table.read_bytes() == before
    assert sorted(p.name for p in cfg.index_path.iterdir() if "_rows" in p.name) == [ROWS_NAME]  # no temporary
