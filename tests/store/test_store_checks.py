"""The checks every store calls (``lorif_ray.store.integrity``, ``lorif_ray.store.locks``): sealed headers, checked
blocks of a memory map, the shard reader's footer / meta / row checks, contained paths, the writer lock, and a
full disk named as an OSError."""

import dataclasses
import errno
import json
import os

import numpy as np
import pytest
import torch
from store_helpers import reopen

from lorif_ray.errors import CorruptArtifactError, CorruptShardError, FolderLockedError, StorageFullError, UnsafePathError
from lorif_ray.store import (CheckedBlocks, IndexFolder, Manifest, atomic_path, block_checksums, contained,
                             remove_stale_temporaries, save_tensors, seal, unseal, writer_lock)
from lorif_ray.store.artifacts import storage_error
from lorif_ray.store.manifest import MANIFEST_NAME, SHARD_LOG_NAME


def test_a_sealed_header_finds_any_change_of_its_content(tmp_path):
    header = seal({"layers": {"a": {"damping": 0.5, "rank": 4}}, "kind": "woodbury"})
    assert unseal(json.loads(json.dumps(header)), "h.json", "rebuild") == {"layers": {"a": {"damping": 0.5, "rank": 4}},
                                                                            "kind": "woodbury"}
    tampered = json.loads(json.dumps(header).replace("0.5", "0.4"))
    with pytest.raises(CorruptArtifactError, match=r"h\.json does not match the checksum.*rebuild"):
        unseal(tampered, "h.json", "rebuild")
    with pytest.raises(CorruptArtifactError, match="carries no checksum"):
        unseal({"kind": "woodbury"}, "h.json", "rebuild")


def test_checked_blocks_check_every_block_a_read_touches_once(tmp_path):
    values = np.arange(70, dtype=np.float32).reshape(35, 2)  # blocks of 10 rows: 0-9, ..., 30-34
    sums = block_checksums(values, 0, 10)
    assert sorted(sums) == [0, 1, 2, 3]
    assert block_checksums(values[20:], 20, 10) == {2: sums[2], 3: sums[3]}  # a worker's rows: its own blocks
    np.save(tmp_path / "g.npy", values)
    array = np.load(tmp_path / "g.npy", mmap_mode="r")
    blocks = CheckedBlocks(tmp_path / "g.npy", array, 10, [sums[b] for b in range(4)], "re-run stage 2")
    assert np.array_equal(blocks.rows(5, 25), values[5:25]) and blocks.checked == {0, 1, 2}
    data = bytearray((tmp_path / "g.npy").read_bytes())
    data[-4] ^= 0x01  # row 34
    (tmp_path / "g.npy").write_bytes(bytes(data))
    array = np.load(tmp_path / "g.npy", mmap_mode="r")
    blocks = CheckedBlocks(tmp_path / "g.npy", array, 10, [sums[b] for b in range(4)], "re-run stage 2")
    assert np.array_equal(blocks.rows(0, 30), values[:30])  # block 3 not read: not checked
    with pytest.raises(CorruptArtifactError, match=r"g\.npy: rows 30-34 do not match.*re-run stage 2"):
        blocks.rows(33, 34)  # part of a block: the whole block is checked
    with pytest.raises(CorruptArtifactError, match="3 block checksums recorded for 4 blocks"):
        CheckedBlocks(tmp_path / "g.npy", array, 10, [sums[b] for b in range(3)], "")


def test_a_shard_is_checked_against_its_record_when_read(index_dir):
    """The footer's SHA-256 and the shard's own meta are checked on opening (footer only), the rows decoded at
    the end: a record of another shard (right size, wrong footer) or a manifest of another meta is refused."""
    manifest = Manifest.load(index_dir)
    assert all(len(r.footer_sha256) == 64 for r in manifest.shards)
    swapped = dataclasses.replace(manifest.record(1), footer_sha256=manifest.record(0).footer_sha256)
    swapped_manifest = dataclasses.replace(manifest, shards=[manifest.record(0), swapped])
    with pytest.raises(CorruptShardError, match=r"footer of .*shard-00001\.parquet .* has SHA-256"):
        list(IndexFolder(index_dir).batches(manifest=swapped_manifest))
    other = dataclasses.replace(manifest, meta={**manifest.meta, "seed": 7})
    with pytest.raises(CorruptShardError, match=r"shard-00000\.parquet was made for another index .*meta\.seed: 0 != 7"):
        list(IndexFolder(index_dir).batches(manifest=other))
    writer = reopen(index_dir)  # stage 1 checks the same at resume: another index's shard is not done
    writer.manifest.meta = {**writer.manifest.meta, "seed": 7}
    assert not writer.is_done(0)


def test_manifest_and_log_lines_are_sealed(index_dir):
    path = index_dir / MANIFEST_NAME
    path.write_text(path.read_text().replace('"rows": 4', '"rows": 5', 1))
    with pytest.raises(CorruptShardError, match=r"_manifest\.json does not match the checksum.*re-run stage 1"):
        Manifest.load(index_dir)
    writer = reopen(index_dir.parent / "fresh")
    ids, arrays = [f"x{i}" for i in range(4)], {c: torch.ones(4, w) for c, w in writer.manifest.columns.items()}
    writer.write_shard(0, ids, arrays)
    log = index_dir.parent / "fresh" / SHARD_LOG_NAME
    log.write_text(log.read_text().replace('"rows": 4', '"rows": 3'))
    assert Manifest.load(index_dir.parent / "fresh").record(0) is None  # a corrupt line: that shard is redone


def test_contained_paths(tmp_path):
    folder = tmp_path / "index"
    (folder / "sub").mkdir(parents=True)
    (folder / "shard-00000.parquet").write_bytes(b"x")
    assert contained(folder, "shard-00000.parquet", source="record 0") == folder / "shard-00000.parquet"
    assert contained(folder, "sub/../shard-00000.parquet", source="record 0").name == "shard-00000.parquet"
    for name in ("../outside.parquet", "/etc/passwd", ".", "sub/../../x"):
        with pytest.raises(UnsafePathError, match=rf"record 0 names '{name}'.*outside"):
            contained(folder, name, source="record 0")
    os.symlink(tmp_path, folder / "link")
    with pytest.raises(UnsafePathError, match=r"'link/x', which resolves to .*/x, outside"):
        contained(folder, "link/x", source="record 0")
    os.symlink(tmp_path / "index", tmp_path / "alias")  # a folder that is itself a symlink is fine
    assert contained(tmp_path / "alias", "shard-00000.parquet", source="record 0").exists()


def test_the_writer_lock_is_exclusive_and_names_its_holder(tmp_path):
    with writer_lock(tmp_path / "out", "query", "stage 3 (jobs/query.py)") as path:
        assert path.name == ".query.lock" and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderLockedError, match=rf"stage 3 \(jobs/query\.py\), pid {os.getpid()} on host"):
            with writer_lock(tmp_path / "out", "query", "stage 3 (jobs/query.py)"):
                pass
        with writer_lock(tmp_path / "out", "index", "stage 1"):  # another writer's lock of the same folder
            pass
    with writer_lock(tmp_path / "out", "query", "stage 3"):  # released with the first
        pass


def test_a_live_temporary_is_never_removed_and_a_stale_one_of_any_name_is(tmp_path):
    stale = [tmp_path / ".x.safetensors.tmp-0123456789ab", tmp_path / "shard-00001.parquet.tmp-0123456789ab"]
    for path in stale:
        path.write_bytes(b"partial")
    (tmp_path / "notes.tmp-x").write_text("not ours")
    with atomic_path(tmp_path / "live.json") as live:
        live.write_text("{}")
        assert remove_stale_temporaries(tmp_path) == sorted(stale)
        assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json", "notes.tmp-x"]


def test_a_full_disk_is_a_storage_full_error_naming_the_path(tmp_path):
    from safetensors import SafetensorError

    error = storage_error(tmp_path / "a.safetensors", SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"), needed_bytes=1234)
    assert isinstance(error, StorageFullError) and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert f"cannot write {tmp_path / 'a.safetensors'}: No space left on device (about 1234 bytes needed" in str(error)
    assert storage_error(tmp_path / "a", OSError(errno.EACCES, "denied")) is None  # not a full disk: as it was
    with pytest.raises(StorageFullError, match=r"cannot write .*t\.safetensors: File too large"):
        with atomic_path(tmp_path / "t.safetensors"):
            raise OSError(errno.EFBIG, "File too large")
    assert not list(tmp_path.iterdir())
    save_tensors(tmp_path / "ok.safetensors", {"a": torch.ones(2)}, {})  # the happy path still writes
