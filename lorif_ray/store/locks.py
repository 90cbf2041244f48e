"""One writer per artifact: an exclusive lock per stage and folder, held for the whole run.

``writer_lock(folder, name, purpose)`` holds ``folder/.<name>.lock`` (an ``flock``, released by the kernel when
the process ends, however it ends) and writes its holder into it: pid, host, start time. A second run that
wants the same folder fails at once with one line naming the holder; readers take no lock, so a stage that
only reads a folder (a complete index on read-only storage, a curvature a query scores with) never needs to
write there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorif_ray.errors import FolderLockedError


def lock_name(name: str) -> str:
    """The lock file of a writer ``name`` (e.g. ``.index.lock``; the leading "." hides it from dataset readers)."""
    return f".{name}.lock"


@contextmanager
def writer_lock(folder, name: str, purpose: str) -> Iterator[Path]:
    """Hold the writer lock ``name`` of ``folder`` (created if missing) for the body; yields the lock file.

    Args:
        folder: the folder this run writes.
        name: which writer (``index``, ``curvature``, ``query``): one lock file per writer and folder.
        purpose: what holds it, for the message of a run that finds it taken (e.g. "stage 1 (jobs/index.py)").
            Readers take no lock.

    Raises:
        FolderLockedError: another process holds it; the message names its pid, host and since when.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name(name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(f"{folder} is being written by another run: {_holder(fd)}; one run writes a "
                                    "folder at a time: wait for that run to end or stop it, then re-run") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "purpose": purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'<purpose>, pid P on host H since T (S s ago)' from a lock file's content, or what is known of it."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = float(holder["since"])
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        return (f"{holder.get('purpose', 'a writer')}, pid {holder['pid']} on host {holder['host']} since {stamp} "
                f"({time.time() - since:.0f} s ago)")
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder has not written its pid yet"
