"""Stage 1 in one process reads its input shard by shard: any input kind gives the index of the JSON Lines
file, and a resumed run reads the rows of the missing shards only."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import lorif_ray.stages.inputs as inputs
from lorif_ray.stages.index import run_index
from lorif_ray.store import Manifest, read_ids
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
    assert read_ids(cfg.index_path) == read_ids(expected)
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
    assert read_ids(cfg.index_path) == [f"t{i}" for i in range(48)]
