"""Case 4 of issue 12: a full disk is an OSError naming the file and the bytes, never a SIGBUS mid-write."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from lorif_ray.store import preallocated_memmap


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
