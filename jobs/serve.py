"""A long-lived query service: the model and the index's shards are loaded once (shards resident in
the query actors), then each query file read from stdin is answered without reloading anything.

    printf 'q1.jsonl\nq2.jsonl\n' | python jobs/serve.py output_dir=out     # same keys as jobs/attribute.py
    python jobs/serve.py output_dir=out       # then type query-file paths, one per line; Ctrl-D ends

Needs the index and curvature of ``output_dir`` (run jobs/attribute.py or jobs/index.py + curvature.py
first). Batch n writes ``<output_dir>/serve/<n>-<file stem>/topk.parquet``; one JSON line per batch
on stdout. A bad query file (missing, not UTF-8, no loss tokens, anything that fails) gets a line
``{"batch", "queries", "error"}`` and the service answers the next file.
"""

import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator

from lorif_ray.cli import run_job

logger = logging.getLogger(__name__)


class _Lines:
    """An iterator over stripped input lines that counts them and remembers the last."""

    def __init__(self, lines: Iterable[str]):
        self._lines, self.count, self.last = iter(lines), 0, ""

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        self.last = next(self._lines).strip()
        self.count += 1
        return self.last


def answer_each(serve_batches: Callable[[Iterable[str]], Iterator[dict]], lines: Iterable[str]) -> Iterator[dict]:
    """``serve_batches(lines)``'s answers, surviving any error in one batch.

    The service reports the errors it expects per batch itself; any other exception (it ends a
    generator) is reported as that batch's error line and the service is started again on the lines
    that follow, its batch numbers continued. An error before the first line is answered is raised.

    Example:
        >>> for answer in answer_each(lambda files: serve(cfg, files, 2), sys.stdin):
        ...     print(json.dumps(answer))
    """
    source = _Lines(lines)
    while True:
        started_at = source.count
        try:
            # blank lines are skipped but numbered by the service: they keep the batch numbers going
            yield from serve_batches(itertools.chain([""] * source.count, source))
            return
        except Exception as error:  # noqa: BLE001 - any bad input must not end the service
            if source.count == started_at:
                raise
            logger.exception("batch %d (%s) failed; restarting the service for the next batch",
                             source.count - 1, source.last)
            yield {"batch": source.count - 1, "queries": source.last, "error": f"{type(error).__name__}: {error}"}


def main(cfg) -> None:
    from lorif_ray.distributed.cluster import actor_options, connect
    from lorif_ray.distributed.query_service import serve

    connect(cfg.cluster)
    options = actor_options(cfg.cluster, gpu=True)
    batches = lambda files: serve(cfg, files, cfg.cluster.query_actors, actor_options=options)  # noqa: E731
    for answer in answer_each(batches, sys.stdin):
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    run_job(main, stages=("serve",), doc=__doc__)
