"""Case 4 of issue 12: a full disk is an OSError naming the file and the bytes, never a SIGBUS mid-write. Case 9
of issue 21: the same in stage 1 and stage 2, whose writes (Parquet, safetensors, JSON, the shard log) raised
bare library errors; resuming with room gives identical results."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess

import numpy as np
import pytest
import torch

from lorif_ray.errors import StorageFullError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.store import CurvatureFolder, IndexFolder, preallocated_memmap
from tests.reliability.conftest import config


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs (needs root to mount); None where mounting is refused."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_a_clear_oserror_before_any_write(small_filesystem, tmp_path, monkeypatch):
    """4 MB of scores on a 1 MiB filesystem: refused at allocation, with the path and bytes; no file left.

    (`np.lib.format.open_memmap` would create a sparse file here and die with SIGBUS at the first page
    that finds no block.)"""
    if small_filesystem is None:  # no mount allowed: make the allocation report a full disk instead
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
        small_filesystem = tmp_path
    path = small_filesystem / "scores.npy"
    with pytest.raises(OSError, match=r"scores\.npy: 4000128 bytes needed .*bytes free") as caught:
        preallocated_memmap(path, np.float32, (1000, 1000))
    assert caught.value.errno == errno.ENOSPC
    assert not path.exists()


def test_preallocated_file_is_a_whole_npy_file(tmp_path):
    """On a disk with room: every block is allocated (not sparse) and the file reads back with np.load."""
    path = tmp_path / "scores.npy"
    scores = preallocated_memmap(path, np.float32, (300, 500))
    assert os.stat(path).st_blocks * 512 >= os.stat(path).st_size  # allocated, not a sparse file
    scores[:, :7] = np.arange(7, dtype=np.float32)
    scores.flush()
    del scores
    loaded = np.load(path)
    assert loaded.shape == (300, 500) and loaded.dtype == np.float32
    assert (loaded[:, :7] == np.arange(7)).all() and not loaded[:, 7:].any()


class SmallDisk:
    """A folder that is full after ``size`` bytes: a tmpfs of that size (mounting needs root), or where mounting is
    refused, this process's file-size limit (RLIMIT_FSIZE: any one file at most ``file_size`` bytes, SIGXFSZ
    ignored: writes fail with EFBIG) while ``full()`` is entered. ``grow()`` then gives it room, as freeing
    space or a larger disk would."""

    def __init__(self, path, size: int, file_size: int):
        self.path, self.size, self.file_size = path, size, file_size
        path.mkdir()
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                     capture_output=True).returncode == 0
        except FileNotFoundError:  # no mount command
            mounted = False
        self.kind = "tmpfs" if mounted else "rlimit"

    @contextlib.contextmanager
    def full(self):
        if self.kind == "tmpfs":
            yield
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    def grow(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64M", str(self.path)], check=True, capture_output=True)

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: int, file_size: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk-{len(disks)}", size, file_size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


def _stats(index_path, layers):
    stats = IndexFolder(index_path).read_statistics(range(5), layers)
    return {name: (s["activations"], s["gradients"], s["tokens"]) for name, s in stats.items()}


def test_a_full_disk_in_stage_1_names_the_file_and_a_resume_gives_the_same_index(finished_run, tiny_assets,
                                                                                   small_disk):
    """Case 9 of issue 21 (stage 1): the index on a 200 KiB filesystem fills up after a couple of shards. The
    write that finds no room (a shard, its statistics, the manifest log) is a StorageFullError, an OSError with
    the file and the bytes it needed (not a bare SafetensorError); given room, the same command resumes and
    writes exactly the index an uninterrupted run writes."""
    disk = small_disk(200 << 10, file_size=30 << 10)  # the largest files: statistics of a shard, 54 KB
    cfg = config(tiny_assets, disk.path / "out")
    with disk.full(), pytest.raises(OSError) as caught:
        run_index(cfg)
    assert isinstance(caught.value, StorageFullError) and caught.value.errno in (errno.ENOSPC, errno.EFBIG)
    message = str(caught.value)
    assert str(disk.path) in message and "bytes needed" in message and "re-run" in message, message
    disk.grow()
    report = run_index(cfg)
    assert report["examples"] == 48
    if disk.kind == "tmpfs":
        assert report["computed"] < 48  # the shards written before the disk filled stay
    expected = IndexFolder(finished_run.index_path).manifest(verify=True)
    got = IndexFolder(cfg.index_path).manifest(verify=True)
    assert [(r.index, r.sha256) for r in got.shards] == [(r.index, r.sha256) for r in expected.shards]
    layers = [layer["name"] for layer in expected.meta["layers"]]
    clean, resumed = _stats(finished_run.index_path, layers), _stats(cfg.index_path, layers)
    assert all(all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(clean[n], resumed[n])) for n in layers)


def test_a_full_disk_in_stage_2_names_the_file_and_a_resume_gives_the_same_curvature(run_copy, tiny_assets,
                                                                                       small_disk):
    """Case 9 of issue 21 (stage 2): the curvature (about 800 KB) on a 600 KiB filesystem. The layer file that
    finds no room is a StorageFullError naming it and the bytes; the resumed run keeps the layers written before
    and gives the curvature an uninterrupted run gives."""
    disk = small_disk(600 << 10, file_size=100 << 10)  # layer files of 33 to 132 KB
    cfg = config(tiny_assets, disk.path / "out", index_dir=str(run_copy.index_path))
    with disk.full(), pytest.raises(OSError) as caught:
        run_curvature(cfg)
    assert isinstance(caught.value, StorageFullError) and caught.value.errno in (errno.ENOSPC, errno.EFBIG)
    message = str(caught.value)
    assert ".safetensors" in message and str(disk.path) in message and "bytes needed" in message, message
    disk.grow()
    report = run_curvature(cfg)
    assert 0 < report["fitted_layers"] < 8  # the layers written before the disk filled are kept
    run_curvature(run_copy)
    got, expected = CurvatureFolder(cfg.curvature_path).read_all(), CurvatureFolder(run_copy.curvature_path).read_all()
    assert got[1]["layers"] == expected[1]["layers"]
    assert got[0].keys() == expected[0].keys() and all(torch.equal(got[0][k], expected[0][k]) for k in got[0])
