"""Progress of work that runs on actors, drawn by the driver's one bar (Ray's progress-actor pattern).

    actor (per batch / row block) ──Reporter: board.report.remote(key, rows done)──► ProgressBoard
    driver (while it waits, every ``interval_s``) ──board.poll.remote(live keys)──► {key: rows done}

A unit of work (a shard being featurized, one actor's share of a Gram pass, of a scoring pass) gets a fresh
key when the driver hands it out and a ``Reporter`` that travels with the call; the actor calls it with the
rows of each batch, fire-and-forget (no round trip on its hot path). A report holds the *cumulative* rows of
that attempt, so a call Ray retries on a restarted actor starts its count again instead of adding to it, and
the driver caps each unit at its size. The driver's bar shows the rows of the finished units (exact: counted
from the results, not the reports) plus the reported rows of the units in flight; a unit whose actor died
is dropped (its rows leave the bar; its replacement's key counts from 0), so nothing is counted twice.

One board per driver (a named actor, 0 CPUs, created on first use and kept while the driver runs); with
progress off nothing here runs.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

BOARD_NAME = "lorif-ray-progress"
POLL_TIMEOUT_S = 10.0  # a poll that takes longer is skipped (the board answers in milliseconds)
_keys = itertools.count()  # unique in this driver across trackers, stages and retries


class ProgressBoard:
    """The latest rows-done count of each unit in flight, by tracker (a plain class; wrap with ``ray.remote``).
    It holds only the units its trackers still call live."""

    def __init__(self):
        self.counts: dict[int, dict[int, int]] = {}  # tracker → {key: rows done}
        self.reports = 0  # reports received so far (tests count them)

    def report(self, tracker: int, key: int, done: int) -> None:
        self.counts.setdefault(tracker, {})[key] = done
        self.reports += 1

    def poll(self, tracker: int, live: Sequence[int]) -> dict[int, int]:
        """{key: rows done} of ``live``; the tracker's other keys (finished or abandoned units) are forgotten."""
        counts = self.counts.get(tracker, {})
        self.counts[tracker] = {k: counts[k] for k in live if k in counts}
        return self.counts[tracker]

    def forget(self, tracker: int) -> None:
        self.counts.pop(tracker, None)

    def received(self) -> int:
        """How many reports have arrived (every tracker's)."""
        return self.reports


_board: tuple | None = None  # (Ray session, the handle that made the board: while it lives, the board does)


def progress_board():
    """This driver's board actor: made on first use in a Ray session, then the same one (the handle is kept
    here: an actor lives while the handle that created it does, one found by name does not keep it)."""
    import ray

    global _board
    context = ray.get_runtime_context()
    session = (context.gcs_address, context.get_job_id(), context.get_node_id())  # unique per Ray instance
    if _board is None or _board[0] != session:
        _board = session, ray.remote(ProgressBoard).options(name=BOARD_NAME, get_if_exists=True, num_cpus=0).remote()
    return _board[1]


class Reporter:
    """What an actor calls with the rows of each finished batch: ``reporter(n)`` sends the attempt's total so
    far to the board, fire-and-forget. It is pickled with the call (count 0), so every execution of the call,
    a retry too, counts from 0."""

    def __init__(self, board, tracker: int, key: int):
        self.board, self.tracker, self.key, self.done = board, tracker, key, 0

    def __call__(self, rows: int) -> None:
        self.done += rows
        try:
            self.board.report.remote(self.tracker, self.key, self.done)
        except Exception:  # the board is gone: the work goes on, the driver's bar moves as results arrive
            pass


class ActorProgress:
    """The driver's side of one bar fed by actors: ``update(n)`` (e.g. ``bar.update``) gets the change of rows
    done, ``start`` / ``finish`` / ``drop`` follow each unit, ``poll`` (while the driver waits) reads the board.

    Args:
        update: the bar's ``update``; None = progress off (no board, ``start`` gives no reporter, all no-ops).
        interval_s: how often ``poll`` asks the board (one small round trip, off the actors' path).

    Example (a running Ray):
        >>> progress = ActorProgress(bar.update)
        >>> reporter = progress.start("shard 3", rows=1024)     # travels with the actor call
        >>> ...; progress.poll(); ...; progress.finish("shard 3", rows=1024)   # doctest: +SKIP
    """

    def __init__(self, update: Callable[[int], None] | None, interval_s: float = 0.5):
        self.update, self.interval_s = update, interval_s
        self.board = None
        if update is not None:
            try:
                self.board = progress_board()
            except Exception as error:  # a bar must never stop a stage
                log.warning("no progress from the actors (%s); the bar moves as their results arrive", error)
        self.tracker = next(_keys)
        self.units: dict[object, tuple[int, int]] = {}  # unit → (key, rows) of the units in flight
        self.counts: dict[int, int] = {}  # key → rows done, as last polled
        self.finished = 0  # rows of finished units
        self.shown = 0  # rows the bar shows
        self.last_poll = 0.0

    @property
    def wait_s(self) -> float | None:
        """How long the driver may wait for a result before it polls (None: progress off, wait for results)."""
        return self.interval_s if self.board is not None else None

    def start(self, unit, rows: int) -> Reporter | None:
        """A unit of ``rows`` rows handed out (again, after a drop: it counts from 0); its actor's reporter."""
        self.drop(unit)
        key = next(_keys)
        self.units[unit] = (key, rows)
        return Reporter(self.board, self.tracker, key) if self.board is not None else None

    def finish(self, unit, rows: int | None = None) -> None:
        """A unit done: its ``rows`` (default: its size) count from now on, exactly."""
        key, size = self.units.pop(unit, (None, 0))
        self.counts.pop(key, None)
        self.finished += size if rows is None else rows
        self._show()

    def drop(self, unit) -> None:
        """A unit lost (its actor died, its result was lost): its reported rows leave the bar."""
        if unit in self.units:
            key, _ = self.units.pop(unit)
            self.counts.pop(key, None)
            self._show()

    def retract(self, rows: int) -> None:
        """Rows of a finished unit that must be done again (its result was lost before it was used)."""
        self.finished -= rows
        self._show()

    def poll(self, force: bool = False) -> None:
        """Read the board (at most every ``interval_s`` unless ``force``) and move the bar."""
        if self.board is None or not self.units:
            return
        now = time.monotonic()
        if not force and now - self.last_poll < self.interval_s:
            return
        self.last_poll = now
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            self.counts = ray.get(self.board.poll.remote(self.tracker, [key for key, _ in self.units.values()]),
                                  timeout=POLL_TIMEOUT_S)
        except GetTimeoutError:  # the board is busy (or still starting): ask again next time
            return
        except Exception as error:  # the board died: keep counting finished units
            log.warning("no progress from the actors (%s); the bar moves as their results arrive", error)
            self.board = None
            return
        self._show()

    def _show(self) -> None:
        if self.update is None:
            return
        shown = self.finished + sum(min(self.counts.get(key, 0), rows) for key, rows in self.units.values())
        if shown != self.shown:
            self.update(shown - self.shown)
            self.shown = shown

    def close(self) -> None:
        """Forget this tracker's units on the board (the board stays for the next stage)."""
        if self.board is not None:
            self.board.forget.remote(self.tracker)
            self.board = None

    def _ready(self, ref) -> None:
        """Return once ``ref`` is ready, polling the board every ``interval_s`` meanwhile (without fetching it)."""
        import ray

        while self.board is not None and not ray.wait([ref], timeout=self.interval_s, fetch_local=False)[0]:
            self.poll(force=True)

    def _done(self) -> None:
        if self.board is not None and not self.units:  # the board keeps nothing of finished work
            self.board.forget.remote(self.tracker)

    def wait(self, refs: Sequence, units: Sequence) -> None:
        """Wait for every ref, polling meanwhile; unit ``units[i]`` finishes (its size in rows) when ref i is ready."""
        for ref, unit in zip(refs, units):
            self._ready(ref)
            self.finish(unit)
        self._done()

    def results(self, refs: Sequence, units: Sequence) -> Iterator:
        """``ray.get`` of each ref in order, polling while it waits; unit ``units[i]`` finishes with result i
        (its size in rows). Fetches one result at a time (as a plain loop of ``ray.get`` would)."""
        import ray

        for ref, unit in zip(refs, units):
            self._ready(ref)
            value = ray.get(ref)
            self.finish(unit)
            yield value
        self._done()
