"""What a part holds while it works, declared by the part itself: the vocabulary of every footprint.

Each allocating part declares its footprint as a function of the settings it runs with (the run's
``Config``) and the shapes it is given: the Gram worker and its driver (``lorif_ray.distributed.gram``),
the query worker and its driver (``lorif_ray.distributed.query_pool``), each curvature
(``lorif_ray.math.curvature``: ``row_request``, ``fit_numbers``, ``saved_numbers``), the featurizer's
store columns and a tensor-parallel rank's slices (``lorif_ray.stages.featurize``,
``lorif_ray.model.tensor_parallel``). The planner (``lorif_ray.plan``) only composes them with a model's
shapes and formats them. A footprint lists ``Held`` items; its peak is what is held throughout plus its
largest step.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

GIB = 2**30
SHARD_RECORD_BYTES = 1024  # estimate, per shard, in a driver: its ShardRecord with its strings (~540 B in
# CPython 3.12, tests/plan), its to-do and queue entries, and its entry of the manifest's JSON
ID_CHARS = 16  # length of the example ids the drivers and query actors hold as Python strings


def id_bytes(chars: int = ID_CHARS) -> int:
    """One example id in a Python list: the str object (CPython, ASCII) and its list slot."""
    return sys.getsizeof("x" * chars) + 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shard_records(shards: int) -> "Held":
    """The index's shard records, which every driver and actor that opens the index holds."""
    return Held(f"records of the index's {shards:,} shards", "—", shards * SHARD_RECORD_BYTES)


def largest(pairs, size) -> int:
    """The largest ``size(spec, k)`` over (spec, k) pairs (0 for none)."""
    return max((size(s, k) for s, k in pairs), default=0)


@dataclass(frozen=True)
class Held:
    """One thing a part holds: what (with its shape), dtype, bytes, where ("GPU", "host": the process's RAM,
    or "object store": the shared memory of its node, which Ray fills with what it puts) and when: ``phase``
    "" = throughout, else a step of the work (only the largest step counts towards the peak)."""

    what: str
    dtype: str
    bytes: int
    where: str = "host"
    phase: str = ""


@dataclass(frozen=True)
class Footprint:
    """What one process of a kind holds at its largest step, and the memory it must fit.

    Attributes:
        kind: e.g. "driver, stage 2", "Gram actor".
        count: how many such processes (1 for a driver).
        where: where its budget is, "GPU" (usable GPU memory) or "host".
        budget: bytes.
        held: everything it holds, by step.
    """

    kind: str
    count: int
    where: str
    budget: float
    held: tuple[Held, ...]

    def phases(self, where: str | None = None) -> dict[str, int]:
        """Bytes per step (phase) at ``where`` (default: its budget's)."""
        out: dict[str, int] = {}
        for h in self.held:
            if h.phase and h.where == (where or self.where):
                out[h.phase] = out.get(h.phase, 0) + h.bytes
        return out

    def peak_phase(self, where: str | None = None) -> str:
        """The step at which the peak is reached ("" when nothing is step-specific)."""
        phases = self.phases(where)
        return max(phases, key=phases.get) if phases else ""

    def peak(self, where: str | None = None) -> int:
        """What is held throughout + the largest step, at ``where`` (default: its budget's)."""
        where = where or self.where
        return sum(h.bytes for h in self.held if h.where == where and not h.phase) + max(
            self.phases(where).values(), default=0)

    @property
    def fits(self) -> bool:
        return self.peak() <= self.budget

    def bytes_of(self, what: str) -> int:
        """Bytes of the held items whose description starts with ``what`` (after a "[step] " prefix)."""
        return sum(h.bytes for h in self.held if re.sub(r"^\[[^\]]*\] ", "", h.what).startswith(what))


def largest_footprint(helds, where: str) -> tuple[Held, ...]:
    """Of several candidate holdings (e.g. one per layer group), the one with the largest peak at ``where``."""
    best: tuple[Held, ...] = ()
    for held in helds:
        held = tuple(held)
        if not best or Footprint("", 1, where, 0, held).peak() > Footprint("", 1, where, 0, best).peak():
            best = held
    return best
