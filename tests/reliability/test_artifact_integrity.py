"""Cases 1-3 of issue 21: what the page CRCs do not cover (a data-page header), the artifacts that carried no
checksum (stored g'_t, curvature layers, K-FAC statistics), and a shard of another model copied in with its
record. Each is now found by the pass that reads it, named, and rebuilt by re-running the stage that owns it."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from lorif_ray.config import QueryConfig
from lorif_ray.errors import CorruptArtifactError, CorruptShardError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.store.index_folder import STATISTICS_NAME
from lorif_ray.stages.query import run_query
from lorif_ray.store import CurvatureFolder, IndexFolder, Manifest
from tests.reliability.conftest import config
from tests.reliability.layout import flipped, parquet_regions

SMALL_LAYER = "transformer.h.0.attn.c_proj"


def _scores(cfg) -> np.ndarray:
    return np.load(cfg.output_dir + "/scores.npy")


def test_a_flipped_bit_in_a_data_page_header_no_longer_drops_a_shard(run_copy):
    """Case 1: bit 1 of a data page's type (DATA_PAGE → INDEX_PAGE, outside the page's CRC) makes pyarrow skip
    the page: shard 2 reads as 0 rows, no error, and a query scored 38 of 48 rows. Now the rows each shard
    decoded to are counted against its record: stage 3 and stage 2 stop naming the shard, and stage 1
    recomputes it."""
    run_curvature(run_copy)
    run_query(run_copy)
    clean = _scores(run_copy)
    shard = run_copy.index_path / "shard-00002.parquet"
    header_start = parquet_regions(shard)["page headers"][0][0]
    with flipped(shard, header_start + 1, 1):
        old_reader = pq.ParquetFile(shard, page_checksum_verification=True).iter_batches()  # as stage 3 read it
        assert sum(batch.num_rows for batch in old_reader) == 0  # no error: the shard was silently dropped
        with pytest.raises(CorruptShardError, match=r"shard-00002\.parquet decoded to 0 rows; its record says 10.*"
                                                    r"re-run stage 1"):
            run_query(run_copy)
        shutil.rmtree(run_copy.curvature_path)
        with pytest.raises(CorruptShardError, match=r"shard-00002\.parquet decoded to 0 rows"):
            run_curvature(run_copy)
        report = run_index(run_copy)  # the shard's bytes differ from its record: recomputed
        assert report["computed"] == 10 and report["skipped_shards"] == 4
    run_curvature(run_copy)  # (the file is put back as it was: the same bytes stage 1 wrote again)
    run_query(run_copy)
    assert np.array_equal(_scores(run_copy), clean)


@pytest.mark.parametrize("artifact", ["coordinates", "curvature"])
def test_a_flipped_bit_in_stored_gt_or_in_a_curvature_layer_is_named_and_stage_2_rebuilds_it(run_copy, tiny_assets,
                                                                                             artifact):
    """Case 2: one bit of stored g'_t or of a curvature layer's tensor data gave wrong scores, exit 0. Now each
    block of g'_t rows and each tensor carries a CRC-32 checked when it is read; re-running stage 2 checks
    every file it would reuse and rebuilds the corrupt one; the scores are then the clean run's."""
    cfg = config(tiny_assets, run_copy.output_dir, query=QueryConfig(full_scores=True, top_k=5,
                                                                    store_coordinates=True))
    run_curvature(cfg)
    run_query(cfg)
    clean = _scores(cfg)
    path = (CurvatureFolder(cfg.curvature_path).coordinates_path / f"{SMALL_LAYER}.npy" if artifact == "coordinates"
            else cfg.curvature_path / f"{SMALL_LAYER}.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x04  # inside the last rows / the last tensor's values
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=rf"{path.name}.*re-run stage 2"):
        run_query(cfg)
    report = run_curvature(cfg)
    assert not report["reused"]
    run_query(cfg)
    assert np.array_equal(_scores(cfg), clean)


def test_corrupt_kfac_statistics_are_named_and_stage_1_rebuilds_them(run_copy, tiny_assets):
    """Case 2, statistics: a flipped bit in ``_kronecker.safetensors`` is a CorruptArtifactError in stage 2 that
    says to re-run stage 1; stage 1 then finds every shard without intact statistics and recomputes them, and
    K-FAC fits the same curvature as from the clean statistics."""
    kfac = config(tiny_assets, run_copy.output_dir, curvature="kfac")
    clean_copy = config(tiny_assets, run_copy.output_dir + "-clean", curvature="kfac",
                        index_dir=str(run_copy.index_path) + "-clean")
    shutil.copytree(run_copy.index_path, clean_copy.index_path)
    total = run_copy.index_path / STATISTICS_NAME
    data = bytearray(total.read_bytes())
    data[-7] ^= 0x80
    total.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"_kronecker\.safetensors.*re-run stage 1"):
        run_curvature(kfac)
    assert run_index(run_copy)["computed"] == 48  # every shard's statistics were in the corrupt total
    run_curvature(kfac)
    run_curvature(clean_copy)
    got, expected = CurvatureFolder(kfac.curvature_path).read_all()[0], CurvatureFolder(clean_copy.curvature_path).read_all()[0]
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got)


@pytest.fixture(scope="module")
def other_model_index(tmp_path_factory):
    """A finished index of another tiny model (other weights, same shapes)."""
    from tests.conftest import write_tiny_model_dir

    assets = write_tiny_model_dir(tmp_path_factory.mktemp("other"), seed=1)
    cfg = config(assets, tmp_path_factory.mktemp("other-run") / "out")
    run_index(cfg)
    return cfg


def test_another_models_shard_copied_in_with_its_record_is_refused(run_copy, other_model_index):
    """Case 3: shard 2 of another model's index and its manifest record copied into this index (its SHA-256 and
    size then match the record). Every shard's own ``lorif.meta`` (model identity, index settings) is now
    compared with the manifest when the shard is opened (footer only): stage 2 and stage 3's reader stop naming
    the shard and the key, and stage 1 recomputes it."""
    foreign = Manifest.load(other_model_index.index_path).record(2)
    shutil.copyfile(other_model_index.index_path / foreign.file, run_copy.index_path / foreign.file)
    manifest = Manifest.load(run_copy.index_path)
    manifest.add(foreign)
    manifest.complete, manifest.num_rows = True, 48
    manifest.save(run_copy.index_path)
    with pytest.raises(CorruptShardError, match=r"shard-00002\.parquet was made for another index.*"
                                                r"meta\.model\.weights_fingerprint"):
        run_curvature(run_copy)
    with pytest.raises(CorruptShardError, match=r"shard-00002\.parquet was made for another index"):
        list(IndexFolder(run_copy.index_path).batches())  # stage 3's reader (its curvature check comes first)
    report = run_index(run_copy)
    assert report["computed"] == 10 and report["skipped_shards"] == 4
    run_curvature(run_copy)
    run_query(run_copy)
