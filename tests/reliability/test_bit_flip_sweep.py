"""Bit-flip sweep of issue 21: single-bit flips spread over every region of a shard, a curvature layer file, a
stored g'_t file and the K-FAC statistics, each read back by the code that reads it in a run. Every flip is
either detected on read (a CorruptArtifactError or IndexMismatchError naming the file) or provably harmless:
what the reader hands on is bit-for-bit what was written, and the scores (both the stored-g'_t and the
recompute route) are identical. Zero silent changes.

(An exhaustive sweep of every bit of the header and footer regions of these files found none either: 3,792
page-header, 78,592 footer, 4,800 curvature-header, 944 g'_t-header and 52,288 statistics-header flips.)"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from lorif_ray.config import QueryConfig
from lorif_ray.errors import CorruptArtifactError, IndexMismatchError
from lorif_ray.stages.curvature import load_curvature, run_curvature
from lorif_ray.stages.inputs import query_config
from lorif_ray.store.index_folder import STATISTICS_NAME
from lorif_ray.stages.query import LocalScorer
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.store import CurvatureFolder, IndexFolder
from tests.reliability.conftest import config
from tests.reliability.layout import flipped, npy_regions, parquet_regions, safetensors_regions

LAYER = "transformer.h.0.attn.c_proj"  # the smallest layer: its curvature file and g'_t file
FLIPS = {  # flips per region (sampled byte and bit, seeded)
    "shard": {"magic": 8, "page headers": 60, "pages": 30, "footer": 60, "tail": 16},
    "curvature": {"length": 16, "header": 60, "tensors": 40},
    "coordinates": {"preamble": 16, "header": 50, "rows": 40},
    "statistics": {"length": 16, "header": 60, "tensors": 40},
}
HARMLESS_REGIONS = {("shard", "magic")}  # no reader looks at the leading PAR1: its flips must all be harmless


@pytest.fixture(scope="module")
def stored(finished_run, tiny_assets, tmp_path_factory):
    """A finished run with a curvature and stored g'_t, its manifest and featurized queries."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    shutil.copytree(finished_run.output_dir, out)
    cfg = config(tiny_assets, out, query=QueryConfig(store_coordinates=True))
    run_curvature(cfg)
    manifest = IndexFolder(cfg.index_path).manifest()
    cfg = query_config(cfg, manifest)
    return cfg, manifest, featurize_queries(cfg, manifest).columns


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _readers(cfg, manifest, columns):
    """{artifact: (file, its regions, read: () -> what the run's reader hands on, scored: whether scores use it)}."""
    layers = [layer["name"] for layer in manifest.meta["layers"]]

    def shard():
        return list(IndexFolder(cfg.index_path).batches(manifest=IndexFolder(cfg.index_path).manifest(), shards=[2]))

    def curvature():
        loaded = load_curvature(CurvatureFolder(cfg.curvature_path), cfg, manifest, "cpu", torch.float64)
        return {name: (c.damping, c.tensors()) for name, c in loaded.items()}

    def coordinates():
        return CurvatureFolder(cfg.curvature_path).stored_coordinates().rows(dtype=torch.float64)

    def statistics():
        return {name: (s["activations"], s["gradients"], s["tokens"], s["examples"])
                for name, s in IndexFolder(cfg.index_path).read_statistics(range(len(manifest.shards)), layers).items()}

    return {
        "shard": (cfg.index_path / "shard-00002.parquet", parquet_regions, shard, True),
        "curvature": (cfg.curvature_path / f"{LAYER}.safetensors", safetensors_regions, curvature, True),
        "coordinates": (CurvatureFolder(cfg.curvature_path).coordinates_path / f"{LAYER}.npy", npy_regions, coordinates, True),
        # stage 2's K-FAC fit is a function of the statistics it reads: identical statistics, identical curvature
        "statistics": (cfg.index_path / STATISTICS_NAME, safetensors_regions, statistics, False),
    }


def _scores(cfg, manifest, columns) -> list:
    """Every training row's score for every query, sorted, on the stored-g'_t and the recompute route."""
    scorer = LocalScorer(cfg, manifest, CurvatureFolder(cfg.curvature_path), stored=True)
    ends = [scorer.score(columns, route, manifest.num_rows) for route in ("stored", "recompute")]
    return [(e.scores, e.index, e.low_scores, e.low_index) for e in ends]


def test_every_single_bit_flip_is_detected_on_read_or_harmless(stored):
    cfg, manifest, columns = stored
    rng = np.random.default_rng(21)
    clean_scores = _scores(cfg, manifest, columns)
    outcome, silent = {}, []
    logging.disable(logging.WARNING)  # each detected flip would log its own warning
    try:
        for artifact, (path, regions, read, scored) in _readers(cfg, manifest, columns).items():
            clean = read()
            for region, spans in regions(path).items():
                positions = np.concatenate([np.arange(start, stop) for start, stop in spans])
                counts = outcome.setdefault((artifact, region), {"detected": 0, "harmless": 0})
                for byte in rng.choice(positions, FLIPS[artifact][region]):
                    bit = int(rng.integers(8))
                    with flipped(path, int(byte), bit):
                        try:
                            same = _equal(read(), clean) and (not scored or _equal(_scores(cfg, manifest, columns),
                                                                                   clean_scores))
                        except (CorruptArtifactError, IndexMismatchError) as error:
                            assert path.name in str(error) or str(path.parent) in str(error), error
                            counts["detected"] += 1
                            continue
                    if same:
                        counts["harmless"] += 1
                    else:
                        silent.append((artifact, region, int(byte), bit))
    finally:
        logging.disable(logging.NOTSET)
    summary = {f"{a} {r}": c for (a, r), c in outcome.items()}
    assert not silent, f"silent changes at {silent}; {summary}"
    assert sum(c["detected"] + c["harmless"] for c in outcome.values()) >= 300, summary
    for key, counts in outcome.items():  # every region is reached, and damage is found in each one that is read
        assert counts["detected"] + counts["harmless"] == FLIPS[key[0]][key[1]], (key, counts)
        assert (counts["detected"] == 0) if key in HARMLESS_REGIONS else counts["detected"] > 0, (key, counts)
