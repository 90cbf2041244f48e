"""Case 4 of issue 21: a path taken from a manifest record, a header or a meta file must resolve inside its
folder, symlinks included; otherwise the run stops naming it (``lorif_ray.store.contained``)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from lorif_ray.config import QueryConfig
from lorif_ray.errors import UnsafePathError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from lorif_ray.store import CurvatureFolder, IndexFolder, Manifest, seal, unseal
from lorif_ray.store.curvature_folder import META_NAME
from tests.reliability.conftest import config


def _point_record_at(index_path, shard: int, name: str) -> None:
    manifest = Manifest.load(index_path)
    manifest.add(dataclasses.replace(manifest.record(shard), file=name))
    manifest.complete, manifest.num_rows = True, 48
    manifest.save(index_path)  # sealed anew: a hostile edit, not corruption


def test_a_record_pointing_outside_the_index_is_refused_by_every_stage(run_copy):
    """A record's ``file`` set to ``../../outside.parquet`` (a readable copy of the shard, so reading it would
    succeed): stage 1, 2 and 3 stop naming the record and where the path leads; nothing outside is read."""
    outside = run_copy.index_path.parent.parent / "outside.parquet"
    shutil.copyfile(run_copy.index_path / "shard-00003.parquet", outside)
    _point_record_at(run_copy.index_path, 3, "../../outside.parquet")
    message = r"record of shard 3 .* names '\.\./\.\./outside\.parquet', which resolves to .*outside\.parquet, outside"
    with pytest.raises(UnsafePathError, match=message):
        IndexFolder(run_copy.index_path).manifest()
    with pytest.raises(UnsafePathError, match=message):
        run_curvature(run_copy)
    with pytest.raises(UnsafePathError, match=message):
        run_query(run_copy)
    with pytest.raises(UnsafePathError, match=message):
        run_index(run_copy)
    assert outside.stat().st_size > 0  # neither read nor replaced


def test_a_symlink_out_of_the_index_is_not_followed(run_copy, tmp_path):
    """The record names the usual file, but the file is a symlink to one outside the index folder."""
    outside = tmp_path / "elsewhere.parquet"
    shard = run_copy.index_path / "shard-00001.parquet"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(UnsafePathError, match=r"'shard-00001\.parquet', which resolves to .*elsewhere\.parquet"):
        list(IndexFolder(run_copy.index_path).batches())
    os.unlink(shard)
    os.symlink("shard-00000.parquet", shard)  # inside the folder: followed (and then refused by its checksums)
    with pytest.raises(Exception, match="shard-00001.parquet") as caught:
        list(IndexFolder(run_copy.index_path).batches())
    assert not isinstance(caught.value, UnsafePathError)


def test_a_gt_meta_naming_a_file_outside_is_refused(run_copy, tiny_assets):
    """``curvature_coordinates/_meta.json`` naming ``../../outside.npy`` for a layer: the query stops naming it."""
    cfg = config(tiny_assets, run_copy.output_dir, query=QueryConfig(full_scores=True, top_k=5,
                                                                    store_coordinates=True))
    run_curvature(cfg)
    path = CurvatureFolder(cfg.curvature_path).coordinates_path / META_NAME
    meta = unseal(json.loads(path.read_text()), path, "")
    layer = next(iter(meta["layers"]))
    shutil.copyfile(CurvatureFolder(cfg.curvature_path).coordinates_path / meta["layers"][layer]["file"], run_copy.index_path.parent.parent / "x.npy")
    meta["layers"][layer]["file"] = "../../x.npy"
    path.write_text(json.dumps(seal(meta)))
    with pytest.raises(UnsafePathError, match=rf"layer '{layer}' of .*_meta\.json names '\.\./\.\./x\.npy'"):
        run_query(cfg)
