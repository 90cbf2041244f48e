"""Ray's actor-pool pattern with replacements: members renewed when their actors die, lost calls handed back.

``ReplacingActorPool`` is ``ray.util.ActorPool`` (a call per free member, the rest queued) over ``Member``s, each
the actors that answer a call together (a model replica's tensor-parallel ranks, or one pool actor). Ray's pool
drops an actor whose call raised ``ActorDiedError`` and keeps no record of the value it lost; here the member
gets fresh actors (``on_death``, once per death) and keeps its place, and every lost call comes back as a
``LostCall`` with its value, so the caller hands it out again: nothing is lost or done twice. Errors of the
work itself pass through. ``next_results`` waits on several pools at once (stage 1's gradient and writer pools).
This module imports ray: import it where Ray work starts.

    >>> pool = ReplacingActorPool(members, lambda member, x: (member.actor.double.remote(x), [], None), 2, renew)
    >>> pool.put(1); pool.put(2)                                       # doctest: +SKIP
    >>> value, result, _ = pool.get_next_unordered()                   # (1, 2) or (2, 4); or LostCall(value)
"""

from __future__ import annotations

from typing import Callable, Iterator

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util import ActorPool


class Member:
    """One place of an actor pool: the actors that answer a call together (a replica's ranks, or one pool actor),
    made by ``make`` and made again by ``renew`` after they died; ``generation`` counts the renewals."""

    def __init__(self, make: Callable[[], list]):
        self.make, self.actors, self.generation = make, make(), 0

    @property
    def actor(self):
        """The actor that answers: rank 0 of a replica, or the pool actor."""
        return self.actors[0]

    def renew(self) -> None:
        self.kill()
        self.actors = self.make()
        self.generation += 1

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class _Slot:
    """One call at a time on a member (a member taking k calls at once is in its pool k times)."""

    def __init__(self, member: Member):
        self.member = member


class LostCall(Exception):
    """A pool call that came back without its result: its actor died (``error`` a ``RayActorError``; the member
    has fresh actors now) or an object it needed was lost (an ``ObjectLostError``). ``value`` is what it was
    called with: the caller hands it out again."""

    def __init__(self, value, error: Exception):
        super().__init__(f"{value}: {error}")
        self.value, self.error = value, error


class ReplacingActorPool(ActorPool):
    """``ray.util.ActorPool`` over members that are renewed when their actors die, whose results say what they
    were for. ``put(value)`` calls ``call(member, value) → (ref, also, extra)`` on a free member (or queues it):
    ``ref`` is the call's result, ``also`` more refs that must succeed with it (the other ranks of a replica),
    ``extra`` is handed back with the result. ``get_next_unordered`` returns (value, result, extra), or raises
    ``LostCall`` (after ``on_death(member, error)`` renewed the member, once per death) so the caller can put
    the value again; the member keeps its place. Errors of the work itself (``RayTaskError``) pass through.

    Ray's ``ActorPool`` evicts an actor whose call raised ``ActorDiedError`` and does not say which value was
    lost; this subclass keeps each call's value and puts the renewed member back instead (Ray 2.60's
    ``_get_result`` and ``_return_actor`` hooks), and hands free members out in turn rather than last-freed first.
    """

    def __init__(self, members: list[Member], call: Callable, calls_per_member: int,
                 on_death: Callable[[Member, Exception], None]):
        super().__init__([_Slot(m) for m in members for _ in range(calls_per_member)])
        self.call, self.on_death = call, on_death
        self.calls: dict = {}  # ref → (value, member generation, also, extra) of the calls in flight

    def put(self, value) -> None:
        self.submit(self._call, value)

    def _call(self, slot: _Slot, value):
        ref, also, extra = self.call(slot.member, value)
        self.calls[ref] = (value, slot.member.generation, also, extra)
        return ref

    def _get_result(self, future, slot: _Slot):
        value, generation, also, extra = self.calls.pop(future)
        try:
            result = ray.get([future, *also])[0]
        except RayActorError as error:
            if slot.member.generation == generation:  # the first lost call of this death: fresh actors
                self.on_death(slot.member, error)
            raise LostCall(value, error) from None
        except ObjectLostError as error:
            raise LostCall(value, error) from None
        finally:
            self._return_actor(slot)  # alive: its member holds live actors (renewed if they died)
        return value, result, extra

    def _return_actor(self, slot: _Slot, is_alive: bool = True) -> None:
        """A free slot goes to the back of the line (Ray's pool hands the last freed one out first): calls take
        the members in turn, so a member whose actors died while idle is found, and renewed, at its next turn."""
        self._idle_actors.insert(0, slot)
        if self._pending_submits:
            self.submit(*self._pending_submits.pop(0))


def next_results(pools: list[ReplacingActorPool], timeout: float | None) -> Iterator[tuple]:
    """Wait up to ``timeout`` s (None: until one is ready) for a call of any of ``pools``; yields (pool, its
    ``get_next_unordered`` outcome: a result, or the ``LostCall`` it raised) for a call that is ready.

    Raises:
        the error of the work itself (e.g. ``CaptureError``, ``StorageFullError``), unwrapped from Ray's.
    """
    refs = [ref for pool in pools for ref in pool.calls]
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    for ref in ready:
        pool = next(p for p in pools if ref in p.calls)
        try:
            yield pool, pool.get_next_unordered(timeout=0)
        except LostCall as lost:
            yield pool, lost
        except TimeoutError:  # the ready call is not local yet: the next wait sees it
            return
        except RayTaskError as error:
            raise error.as_instanceof_cause() from None  # e.g. NaN gradients, named by example
