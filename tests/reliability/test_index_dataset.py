"""Case 7 of issue 21: the index folder is a Parquet dataset (``pyarrow.parquet.read_table(index_dir)``, as the
README promises): only shard files and "_" / "." metadata in it. The per-shard K-FAC statistics live in
``_kronecker/`` (format 1 had ``kronecker/``, which broke the read), stale temporaries of every naming are
removed whenever a stage opens the folder for writing or finds it complete, and an index of format 1 is
refused by name."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorif_ray.errors import IndexMismatchError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.store.index_folder import STATISTICS_DIR, STATISTICS_NAME
from lorif_ray.stages.query import run_query
from lorif_ray.store import ShardWriter
from lorif_ray.store.manifest import MANIFEST_NAME


def test_an_index_with_unfolded_statistics_reads_as_a_dataset(run_copy, monkeypatch):
    """A stage 1 stopped before its last fold leaves every shard's statistics file in the index folder: the
    folder still reads as a Parquet dataset, with every committed row."""
    (run_copy.index_path / STATISTICS_NAME).unlink()  # every shard's statistics are recomputed ...
    monkeypatch.setattr(ShardWriter, "finalize", lambda self, n: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):  # ... and the run stops before folding them
        run_index(run_copy)
    assert len(list((run_copy.index_path / STATISTICS_DIR).glob("shard-*.safetensors"))) == 5
    assert not (run_copy.index_path / "kronecker").exists()
    table = pq.read_table(run_copy.index_path)
    assert table.num_rows == 48 and table.column("example_id").to_pylist()[:2] == ["t0", "t1"]


def test_stale_temporaries_of_every_naming_go_when_the_index_is_found_complete(run_copy):
    """An older writer's temporary (``shard-*.parquet.tmp-*``, which dataset readers do not skip) and a killed
    manifest write, left in a complete index: stage 1 finds the index complete and removes both."""
    stale = [run_copy.index_path / "shard-00004.parquet.tmp-0123456789ab",
             run_copy.index_path / f".{MANIFEST_NAME}.tmp-0123456789ab",
             run_copy.index_path / STATISTICS_DIR / ".shard-00002.safetensors.tmp-0123456789ab"]
    stale[2].parent.mkdir(exist_ok=True)
    for path in stale:
        path.write_bytes(b"PAR1 partial")
    with pytest.raises(pa.ArrowInvalid, match=r"shard-00004\.parquet\.tmp-"):
        pq.read_table(run_copy.index_path)  # the case
    report = run_index(run_copy)
    assert report["computed"] == 0 and report["skipped_shards"] == 5
    assert not any(path.exists() for path in stale)
    assert pq.read_table(run_copy.index_path).num_rows == 48


def test_an_index_of_format_1_is_refused_by_name(run_copy):
    """An index written before this format (manifest format 1, statistics in ``kronecker/``, no footer or header
    checksums) is refused by every stage, with what to do: rebuild it."""
    path = run_copy.index_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.pop("crc32")
    manifest["format_version"] = 1
    for record in manifest["shards"]:
        record.pop("footer_sha256")
    path.write_text(json.dumps(manifest))
    (run_copy.index_path / "kronecker").mkdir()
    (run_copy.index_path / "kronecker" / "shard-00001.safetensors").write_bytes(b"old")
    message = r"format version 1 \(made before .* kronecker/\); this lorif-ray reads format 2: delete .* re-run stage 1"
    for stage in (run_index, run_curvature, run_query):
        with pytest.raises(IndexMismatchError, match=message):
            stage(run_copy)
