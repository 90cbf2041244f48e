"""The curvature folder as one store class: what it writes it reads back, and a folder of another curvature (or
none) is refused by name."""

import json
import pickle
import shutil

import pytest
import torch

from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.curvature import Woodbury
from lorif_ray.store import CurvatureFolder
from lorif_ray.store.curvature_folder import HEADER_NAME, META_NAME, ranks, write_rows

LAYER = "transformer.h.0.mlp.c_fc"


def _meta(r: int) -> dict:
    return {"method": "lorif", "curvature": "woodbury", "config": {"r": r}, "precision": {}, "index": {}}


def _save(path, r: int = 3, rows: int = 5) -> tuple[CurvatureFolder, Woodbury, torch.Tensor]:
    """A folder holding one Woodbury layer of rank ``r`` and its stored g'_t of ``rows`` rows (blocks of 2)."""
    torch.manual_seed(r)
    curvature = Woodbury(0.1, torch.rand(r, dtype=torch.float64), torch.randn(8, r, dtype=torch.float64))
    folder = CurvatureFolder(path)
    with folder.lock():
        writer = folder.writer(_meta(r))
        writer.write(LAYER, curvature)
        writer.finish({"seconds": 1.5})
        coordinates = torch.randn(rows, r, dtype=torch.float32)
        stored = folder.coordinate_writer(rows, "float32", block_rows=2)
        file = stored.begin(LAYER, r)
        stored.commit(LAYER, write_rows(file, 0, coordinates, "float32", 2))
        stored.finish()
    return folder, curvature, coordinates


def test_save_exists_load_round_trip(tmp_path):
    path = tmp_path / "out" / "curvature"
    assert not CurvatureFolder(path).exists() and not CurvatureFolder(path).coordinates_match()
    folder, curvature, coordinates = _save(path)
    opened = CurvatureFolder.open(path)
    assert opened == folder and pickle.loads(pickle.dumps(opened)) == folder  # a path: travels to Ray actors as one
    assert opened.exists() and sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [HEADER_NAME, f"{LAYER}.safetensors"]
    assert opened.coordinates_path == tmp_path / "out" / "curvature_coordinates"  # beside the folder, as in format 2
    header = opened.header()
    assert header["layers"] == {LAYER: curvature.info()} and header["seconds"] == 1.5 and ranks(header) == {LAYER: 3}
    assert opened.corrupt_layers(header) == []
    tensors, info = opened.read_layer(LAYER, header, names=lambda field: field != "vectors")
    assert set(tensors) == {"values"} and info == curvature.info()  # V_r not asked for: never read
    assert torch.equal(Woodbury.from_saved(opened.read_layer(LAYER, header)[0], info).vectors, curvature.vectors)
    everything, same_header = opened.read_all()
    assert same_header == header and torch.equal(everything[f"{LAYER}.values"], curvature.values)
    assert opened.coordinates_match("float32") and opened.coordinates_match() and not opened.coordinates_match("bfloat16")
    stored = opened.stored_coordinates()
    stored.verify()
    assert torch.equal(stored.rows(1, 4)[LAYER], coordinates[1:4])
    again = opened.writer(_meta(3))  # a re-run with the same settings adopts the intact layer
    assert again.done(LAYER) and not opened.exists()  # its header is gone until it finishes
    assert not opened.writer(_meta(4)).done(LAYER)  # another curvature's file is refitted


def test_a_folder_without_curvature_or_of_another_curvature_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty" / "curvature"
    with pytest.raises(ConfigError, match=f"no curvature at {empty}"):
        CurvatureFolder.open(empty)
    with pytest.raises(ConfigError, match="no curvature at"):
        CurvatureFolder(empty).header()
    one, _, _ = _save(tmp_path / "one" / "curvature", r=3)
    other, _, _ = _save(tmp_path / "other" / "curvature", r=4)
    shutil.copyfile(one.layer_path(LAYER), other.layer_path(LAYER))  # one's layer file in the other's folder
    with pytest.raises(IndexMismatchError, match=f"belongs to another curvature than {other.path}"):
        other.read_layer(LAYER, other.header())
    assert other.corrupt_layers(other.header()) == [LAYER]
    shutil.copyfile(one.coordinates_meta_path, other.coordinates_meta_path)  # one's g'_t beside the other
    assert not other.coordinates_match()
    with pytest.raises(IndexMismatchError, match=f"belongs to another curvature than {other.path}"):
        other.stored_coordinates()
    old = json.loads(one.header_path.read_text())
    one.header_path.write_text(json.dumps({key: v for key, v in old.items() if key not in ("crc32", "format_version")}))
    with pytest.raises(IndexMismatchError, match=r"format version 1 \(before checksums\)"):
        one.header()  # a format-1 header (no checksums) is refused by name
    assert META_NAME == "_meta.json"
