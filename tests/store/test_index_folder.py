"""The index folder (``IndexFolder``): one object names and reads stage 1's artifact; its K-FAC statistics count
every committed shard exactly once across folds and crashes."""

import pickle

import pytest
import torch
from store_helpers import COLUMNS, make_rows

from lorif_ray.errors import CorruptArtifactError, IndexMismatchError, IndexNotFoundError
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.store import IndexFolder
from lorif_ray.store.index_folder import STATISTICS_NAME

META = {"config": {"kind": "factors", "f": 4, "c": 2, "seed": 3, "factor_iters": 5, "max_length": 32,
                   "layers": ["h.0"], "model_dtype": "float32"},
        "model": {"sha": "m"}, "layers": [{"name": "h.0.attn", "d1": 1, "d2": 1}],
        "data": {"sha256": "d", "num_examples": 10}, "kronecker_stats": True}


def _stats(shard: int) -> dict[str, KroneckerStats]:
    gen = torch.Generator().manual_seed(shard)
    x, d = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    return {"a": KroneckerStats(x.T @ x, d.T @ d, 5, 1), "b": KroneckerStats(x[:, :2].T @ x[:, :2], d.T @ d, 4, 1)}


def _stored(shard: int) -> dict[str, dict[str, torch.Tensor]]:
    """One shard's statistics as the store holds them (stage 1 writes ``KroneckerStats.tensors()``)."""
    return {layer: stats.tensors() for layer, stats in _stats(shard).items()}


def _expected(shards) -> dict[str, KroneckerStats]:
    parts = [_stats(s) for s in shards]
    return {layer: sum((p[layer] for p in parts[1:]), parts[0][layer]) for layer in ("a", "b")}


def _assert_equal(stored, expected):
    actual = {layer: KroneckerStats.from_tensors(tensors) for layer, tensors in stored.items()}
    assert actual.keys() == expected.keys()
    for layer in expected:
        torch.testing.assert_close(actual[layer].activations, expected[layer].activations, rtol=1e-12, atol=0)
        torch.testing.assert_close(actual[layer].gradients, expected[layer].gradients, rtol=1e-12, atol=0)
        assert (actual[layer].tokens, actual[layer].examples) == (expected[layer].tokens, expected[layer].examples)


def test_a_written_index_reopens_with_its_manifest_settings_rows_and_statistics(tmp_path):
    """Stage 1's path through the folder (lock, writer, statistics before each record, fold, report), then what
    stages 2 and 3 read back: the manifest, the settings that shaped the rows, the rows and the statistics."""
    index = IndexFolder(tmp_path / "index")
    assert not index.exists() and index.strays() == []
    ids, arrays = make_rows(10)
    with index.lock():
        writer = index.writer(kind="factors", columns=COLUMNS, dtype="float32", shard_size=4, meta=META)
        for shard, start in enumerate(range(0, 10, 4)):
            if shard < 2:  # the last shard lacks its statistics: not done, so the index cannot be finalized
                index.write_shard_statistics(shard, _stored(shard))
            rows = {c: a[start:start + 4] for c, a in arrays.items()}
            writer.commit(writer.write_file(shard, ids[start:start + 4], rows))
        assert [writer.is_done(s) for s in range(3)] == [True, True, False]
        index.write_shard_statistics(2, _stored(2))
        writer.finalize(10)
        assert index.fold_statistics(writer.is_done) == 3
        index.write_report({"examples": 10})

    opened = IndexFolder.open(tmp_path / "index")
    assert opened == index and pickle.loads(pickle.dumps(opened)) == index  # pickles as its path
    manifest = opened.manifest(verify=True)
    assert manifest.complete and manifest.num_rows == 10 and list(manifest.columns) == list(COLUMNS)
    settings = opened.settings
    assert (settings.kind, settings.dtype, settings.shard_size, settings.columns) == ("factors", "float32", 4, COLUMNS)
    assert settings.layer_names == ["h.0.attn"] and settings.kronecker_stats and settings.kfac_labels == "training"
    assert settings.row_settings == {**META["config"], "dtype": "float32"}
    assert opened.ids(manifest) == ids and opened.ids_of_rows(manifest, [9, 0]) == {0: ids[0], 9: ids[9]}
    rows = torch.cat([c["h.0.attn.u"] for _, c in opened.batches(["h.0.attn.u"], manifest=manifest, shards=[1, 2])])
    torch.testing.assert_close(rows, arrays["h.0.attn.u"][4:].float(), rtol=0, atol=0)
    _assert_equal(opened.read_statistics(range(3), ["a", "b"]), _expected([0, 1, 2]))
    assert opened.read_report() == {"examples": 10} and opened.complete()
    assert not list(opened.statistics_dir.glob("shard-*")) and opened.strays() == []


def test_a_folder_without_an_index_is_refused_by_name(tmp_path):
    with pytest.raises(IndexNotFoundError, match=rf"no index at {tmp_path / 'nope'}: .*_manifest\.json does not exist"):
        IndexFolder.open(tmp_path / "nope")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    (tmp_path / "mine" / "_rows.pending-0123.parquet").write_text("")  # what a stopped stage 1 may leave
    assert IndexFolder(tmp_path / "mine").strays() == ["notes.txt"] and not IndexFolder(tmp_path / "mine").complete()
    with pytest.raises(IndexNotFoundError, match="_manifest.json does not exist"):
        IndexFolder(tmp_path / "mine").manifest()


def test_folds_count_every_committed_shard_once_across_a_crash_and_a_recomputed_shard(tmp_path, monkeypatch):
    index = IndexFolder(tmp_path)
    for shard in (0, 1, 2):
        index.write_shard_statistics(shard, _stored(shard))
    assert index.fold_statistics({0, 1}.__contains__) == 2  # shard 2 is written but not committed: kept for later
    assert not index.shard_statistics_path(0).exists() and index.shard_statistics_path(2).exists()
    index.write_shard_statistics(1, _stored(1))  # shard 1 recomputed (its Parquet file was lost): same numbers
    index.write_shard_statistics(3, _stored(3))
    real_unlink = type(tmp_path).unlink
    monkeypatch.setattr(type(tmp_path), "unlink", lambda *a, **kw: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):  # the total is written, the files are not yet deleted
        index.fold_statistics({0, 1, 2, 3}.__contains__)
    monkeypatch.setattr(type(tmp_path), "unlink", real_unlink)
    assert index.fold_statistics({0, 1, 2, 3}.__contains__) == 0  # every file is in the total already: deleted
    assert not list(index.statistics_dir.iterdir())
    _assert_equal(index.read_statistics([0, 1, 2, 3], ["a", "b"]), _expected([0, 1, 2, 3]))


def test_stage_two_refuses_statistics_that_do_not_cover_the_index(tmp_path):
    index = IndexFolder(tmp_path)
    with pytest.raises(IndexMismatchError, match="holds no K-FAC statistics"):
        index.read_statistics([0], ["a"])
    index.write_shard_statistics(0, _stored(0))
    index.fold_statistics({0}.__contains__)
    with pytest.raises(IndexMismatchError, match="cover 1 of its 2 shards"):
        index.read_statistics([0, 1], ["a"])
    with pytest.raises(IndexMismatchError, match="lack layers"):
        index.read_statistics([0], ["a", "c"])


def test_a_shard_has_its_statistics_only_while_they_are_intact(tmp_path):
    """``has_statistics`` (what stage 1 asks before it counts a shard as done): a shard's own file, or the total
    read and checked whole. A corrupt shard file is removed by the fold that finds it (which says so), a corrupt
    total holds no shard: either way those shards are redone by the next stage-1 run."""
    index = IndexFolder(tmp_path)
    for shard in (0, 1, 2):
        index.write_shard_statistics(shard, _stored(shard))
    assert [index.has_statistics(s) for s in range(4)] == [True, True, True, False]
    data = bytearray(index.shard_statistics_path(2).read_bytes())
    data[-1] ^= 0x01
    index.shard_statistics_path(2).write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"shard-00002\.safetensors.*re-run stage 1.*removed"):
        index.fold_statistics({0, 1, 2}.__contains__)
    assert [index.has_statistics(s) for s in range(3)] == [True, True, False]  # 0 and 1 are in the total now
    total = tmp_path / STATISTICS_NAME
    data = bytearray(total.read_bytes())
    data[-1] ^= 0x01
    total.write_bytes(bytes(data))
    assert not index.has_statistics(0) and not index.has_statistics(1)
    with pytest.raises(CorruptArtifactError, match=r"_kronecker\.safetensors.*re-run stage 1"):
        index.read_statistics([0, 1], ["a"])
