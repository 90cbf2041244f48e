"""The K-FAC statistics of an index on disk: every committed shard counts exactly once across folds and crashes."""

import pytest
import torch

from lorif_ray.errors import IndexMismatchError
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.stages import kronecker_stats
from lorif_ray.stages.kronecker_stats import fold_stats, read_stats, shard_stats_path, write_shard_stats


def _stats(shard: int) -> dict[str, KroneckerStats]:
    gen = torch.Generator().manual_seed(shard)
    x, d = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    return {"a": KroneckerStats(x.T @ x, d.T @ d, 5, 1), "b": KroneckerStats(x[:, :2].T @ x[:, :2], d.T @ d, 4, 1)}


def _expected(shards) -> dict[str, KroneckerStats]:
    parts = [_stats(s) for s in shards]
    return {layer: sum((p[layer] for p in parts[1:]), parts[0][layer]) for layer in ("a", "b")}


def _assert_equal(actual, expected):
    for layer in expected:
        torch.testing.assert_close(actual[layer].activations, expected[layer].activations, rtol=1e-12, atol=0)
        torch.testing.assert_close(actual[layer].gradients, expected[layer].gradients, rtol=1e-12, atol=0)
        assert (actual[layer].tokens, actual[layer].examples) == (expected[layer].tokens, expected[layer].examples)


def test_folds_count_every_committed_shard_once_across_a_crash_and_a_recomputed_shard(tmp_path, monkeypatch):
    for shard in (0, 1, 2):
        write_shard_stats(tmp_path, shard, _stats(shard))
    assert fold_stats(tmp_path, {0, 1}.__contains__) == 2  # shard 2 is written but not committed: kept for later
    assert not shard_stats_path(tmp_path, 0).exists() and shard_stats_path(tmp_path, 2).exists()
    write_shard_stats(tmp_path, 1, _stats(1))  # shard 1 recomputed (its Parquet file was lost): same numbers
    write_shard_stats(tmp_path, 3, _stats(3))
    real_unlink = type(tmp_path).unlink
    monkeypatch.setattr(type(tmp_path), "unlink", lambda *a, **kw: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):  # the total is written, the files are not yet deleted
        fold_stats(tmp_path, {0, 1, 2, 3}.__contains__)
    monkeypatch.setattr(type(tmp_path), "unlink", real_unlink)
    assert fold_stats(tmp_path, {0, 1, 2, 3}.__contains__) == 0  # every file is in the total already: deleted
    assert not list((tmp_path / kronecker_stats.SHARDS_DIR).iterdir())
    _assert_equal(read_stats(tmp_path, [0, 1, 2, 3], ["a", "b"]), _expected([0, 1, 2, 3]))


def test_stage_two_refuses_statistics_that_do_not_cover_the_index(tmp_path):
    with pytest.raises(IndexMismatchError, match="holds no K-FAC statistics"):
        read_stats(tmp_path, [0], ["a"])
    write_shard_stats(tmp_path, 0, _stats(0))
    fold_stats(tmp_path, {0}.__contains__)
    with pytest.raises(IndexMismatchError, match="cover 1 of its 2 shards"):
        read_stats(tmp_path, [0, 1], ["a"])
    with pytest.raises(IndexMismatchError, match="lack layers"):
        read_stats(tmp_path, [0], ["a", "c"])


def test_a_shard_has_its_statistics_only_while_they_are_intact(tmp_path):
    """``has_stats`` (what stage 1 asks before it counts a shard as done): a shard's own file, or the total read
    and checked whole. A corrupt shard file is removed by the fold that finds it (which says so), a corrupt total
    holds no shard: either way those shards are redone by the next stage-1 run."""
    from lorif_ray.errors import CorruptArtifactError
    from lorif_ray.stages.kronecker_stats import TOTAL_NAME, has_stats

    for shard in (0, 1, 2):
        write_shard_stats(tmp_path, shard, _stats(shard))
    assert [has_stats(tmp_path, s) for s in range(4)] == [True, True, True, False]
    data = bytearray(shard_stats_path(tmp_path, 2).read_bytes())
    data[-1] ^= 0x01
    shard_stats_path(tmp_path, 2).write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"shard-00002\.safetensors.*re-run stage 1.*removed"):
        fold_stats(tmp_path, {0, 1, 2}.__contains__)
    assert [has_stats(tmp_path, s) for s in range(3)] == [True, True, False]  # 0 and 1 are in the total now
    total = tmp_path / TOTAL_NAME
    data = bytearray(total.read_bytes())
    data[-1] ^= 0x01
    total.write_bytes(bytes(data))
    assert not has_stats(tmp_path, 0) and not has_stats(tmp_path, 1)
    with pytest.raises(CorruptArtifactError, match=r"_kronecker\.safetensors.*re-run stage 1"):
        read_stats(tmp_path, [0, 1], ["a"])
