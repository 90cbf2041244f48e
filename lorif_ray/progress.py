"""The progress bars of every long step: one kind of bar (``tqdm.auto``: text in a terminal, a widget in a
notebook) with a count, a rate and an ETA, fed through ``update(n)`` callbacks that the loops call once per
batch or row block (on Ray the actors report, ``lorif_ray.distributed.progress``).

    >>> with progress_bar(1000, "stage 1: index", "ex", enabled=True) as bar:
    ...     featurize(..., on_batch=bar.update)   # doctest: +SKIP
"""

from __future__ import annotations

from tqdm.auto import tqdm

Bar = tqdm
"""The bar class ``progress_bar`` makes (tests put a subclass here that records every update)."""


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool) -> tqdm:
    """A bar over ``total`` units (None: a count without an ETA); a disabled one draws nothing and costs nothing.
    Large counts are scaled (1.92M rows, 80.9k row/s)."""
    scaled = total is not None and total >= 100_000
    return Bar(total=total, desc=desc, unit=unit, unit_scale=scaled, dynamic_ncols=True, disable=not enabled)
