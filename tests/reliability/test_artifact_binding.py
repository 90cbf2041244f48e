"""Case 3 of issue 12: a query whose curvature settings differ from the saved curvature's (r, damping, the
precision policy) is refused naming the keys, on one process and on Ray; the outputs record the config that
made them. Case 10: an output_dir this tool did not create is refused (overwrite=true takes it), and an
index folder holds nothing but an index."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lorif_ray.config import PrecisionConfig
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.query import run_query
from tests.reliability.conftest import config


@pytest.mark.parametrize("overrides,keys", [
    ({"r": 32, "damping": 5.0}, "config.damping, config.r"),
    ({"precision": PrecisionConfig(matmul="float32")}, "precision.matmul"),
])
def test_a_curvature_made_with_other_settings_is_refused_by_name(run_copy, tiny_assets, overrides, keys):
    run_curvature(run_copy)  # r = 64, damping by the rule
    with pytest.raises(IndexMismatchError, match=keys):
        run_query(config(tiny_assets, run_copy.output_dir, **overrides))


def test_outputs_record_the_config_that_made_them(run_copy):
    run_curvature(run_copy)
    report = run_query(run_copy)
    meta = json.loads(pq.read_schema(report["topk_path"]).metadata[b"lorif.meta"])
    assert meta["config"]["r"] == run_copy.r and meta["config"]["factor_iters"] == 8  # pinned from the index
    assert meta["route"] == report["route"] and meta["precision"]["coordinates"] == "float32"


def test_an_output_dir_of_someone_else_is_refused(tiny_assets, tmp_path):
    from lorif_ray.distributed.backends import run_stage

    mine = tmp_path / "my_results"
    mine.mkdir()
    (mine / "report.json").write_text("{\"mine\": true}")
    cfg = config(tiny_assets, mine)
    with pytest.raises(ConfigError, match="already holds files this tool did not write.*overwrite=true"):
        run_stage("index", cfg)
    assert (mine / "report.json").read_text() == "{\"mine\": true}" and not (mine / "index").exists()
    from dataclasses import replace

    run_stage("index", replace(cfg, overwrite=True))  # taken knowingly
    run_stage("index", cfg)  # now marked as this tool's: re-runs need no flag
    assert (mine / "index" / "_manifest.json").exists()


def test_an_index_folder_with_other_files_is_refused(tiny_assets, tmp_path):
    from lorif_ray.distributed.backends import run_stage

    index = tmp_path / "index"
    index.mkdir()
    (index / "mine.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="holds files but no index"):
        run_stage("index", config(tiny_assets, tmp_path / "out", index_dir=str(index)))
