"""Stage 2 on Ray: shard-group actors sum each layer's Gram products, the one driver fits the curvature.

``RayGram`` is the Gram backend of ``lorif_ray.stages.curvature.run_curvature`` on a cluster: one
``GramWorker`` actor per contiguous group of shards holds a ``LayerGram`` over its rows of the current
group of layers (the row source of ``lorif_ray.stages.rows.layer_rows``: resident in its memory when they
fit, else streamed from Parquet, each shard read once per pass for all of them) and returns its partial ``Σ_s G_sᵀ (G_s Q)`` per layer; the driver adds the
partials in shard-group order, which only reorders the sums of the one-process pass. With stored g'_t every worker writes its own rows' g'_t into the shared
file (on several nodes ``output_dir`` must be shared storage). With a progress bar each worker reports its
row blocks as a pass goes (``lorif_ray.distributed.progress``); a pass Ray retries on a restarted worker
counts from 0 again.

Example (needs a running Ray, e.g. ``ray.init(num_cpus=2)``):
    >>> run_curvature(cfg, partial(RayGram, num_workers=2))   # the same file as run_curvature(cfg)
"""

from __future__ import annotations

from typing import Iterator, Sequence


from lorif_ray.config import Config
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.errors import ConfigError
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import Precision
from lorif_ray.stages.curvature import LayerGram
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.rows import layer_rows
from lorif_ray.store import IndexFolder, Manifest

DEFAULT_ACTOR_OPTIONS = {"num_cpus": 0.5}  # small, so several workers and the driver share a laptop


def shard_groups(manifest: Manifest, num_workers: int) -> list[list[int]]:
    """Shard indices split into at most ``num_workers`` contiguous, deterministic, non-empty groups.

    Groups are balanced by shard count (the first ``n % w`` groups get one extra shard).

    Example:
        >>> # 5 shards, 2 workers → [[0, 1, 2], [3, 4]]
    """
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    indices = [r.index for r in manifest.shards]
    workers = min(num_workers, len(indices))
    size, extra = divmod(len(indices), workers) if workers else (0, 0)
    groups, start = [], 0
    for w in range(workers):
        end = start + size + (1 if w < extra else 0)
        groups.append(indices[start:end])
        start = end
    return groups


class GramWorker:
    """The Gram pass of a group of layers over one group of shards (a plain class; wrap with ``ray.remote``).

    Args:
        cfg: the run config (index path, precision policy, batch rows, device: "auto" = the GPU Ray gave
            it, else the CPU).
        shards: the consecutive shard indices this worker owns.
        resident: hold the layers' rows in memory (None = when they fit, see ``layer_rows``).

    Example:
        >>> worker = GramWorker(cfg, [0, 1])
        >>> worker.run(["h.0.mlp.c_fc", "h.0.mlp.c_proj"], {"h.0.mlp.c_fc": q})   # Σ_{s∈{0,1}} G_sᵀ G_s q, one read
    """

    def __init__(self, cfg: Config, shards: Sequence[int], resident: bool | None = None):
        self.cfg, self.shards, self.resident = cfg, list(shards), resident
        self.device = resolve_device(cfg.model.device)
        self.precision = Precision.of(cfg, self.device)
        self.index = IndexFolder(cfg.index_path)
        self.manifest = self.index.manifest()
        self.specs = {s.name: s for s in layer_specs(self.manifest)}
        self.current: tuple[tuple[str, ...], LayerGram] | None = None

    def _gram(self, layers: Sequence[str]) -> LayerGram:
        key = tuple(layers)
        if self.current is None or self.current[0] != key:
            self.current = None  # free the previous group's rows first
            rows = layer_rows(self.index, self.manifest, [self.specs[n] for n in key],
                              dtype=self.precision.math, device=self.device, shards=self.shards,
                              batch_rows=self.cfg.query.train_batch_rows, resident=self.resident)
            self.current = (key, LayerGram(rows, self.precision.matmul))
        return self.current[1]

    def run(self, layers: Sequence[str], applies: dict | None = None, grams: dict | None = None,
            eigens: dict | None = None, progress=None) -> dict:
        """{layer: Σ_s G_sᵀ (G_s Q)}, {layer: Σ_s G_sᵀ G_s} and EK-FAC's {layer: Σ_s Λ*_s} of this group's rows,
        by one pass, on the CPU; ``progress`` (a ``Reporter``, or None) gets each row block's size."""
        gram = self._gram(layers)
        gram.on_rows = progress
        try:
            return {n: t.cpu() for n, t in gram(applies, grams, eigens).items()}
        finally:
            gram.on_rows = None

    def write_coordinates(self, layers: Sequence[str], vectors: dict, paths: dict, dtype: str, block_rows: int,
                          progress=None) -> dict[str, dict[int, int]]:
        """g'_t = V_rᵀ g_t of this group's rows into their rows of each layer's file; returns each layer's
        {block: CRC-32} of the blocks of ``block_rows`` rows written (this group's shards)."""
        vectors = {n: v.to(self.precision.math) for n, v in vectors.items()}
        gram = self._gram(layers)
        gram.on_rows = progress
        try:
            return gram.write_coordinates(vectors, paths, dtype, block_rows)
        finally:
            gram.on_rows = None

    def passes(self) -> int:
        """Passes over the current group's rows so far (reads of its shards when streamed)."""
        return 0 if self.current is None else self.current[1].rows.passes


class RemoteLayerGram:
    """A group of layers' Gram pass summed over the workers (what ``fit_layers`` calls).

    Args:
        rows: each worker's row count (its share of a pass, for the bar).
        on_rows: the bar's ``update`` (the workers report row blocks, the driver polls while it waits), or None.
    """

    def __init__(self, workers: Sequence, layers: list[str], device, rows: Sequence[int] = (), on_rows=None):
        self.workers, self.layers, self.device = workers, layers, device
        self.worker_rows = list(rows) or [0] * len(workers)
        self.progress = ActorProgress(on_rows)

    def _pass(self, call) -> Iterator:
        """Each worker's result of ``call(worker, reporter)``, in shard-group order, one at a time in the driver."""
        refs = [call(worker, self.progress.start(i, self.worker_rows[i])) for i, worker in enumerate(self.workers)]
        return self.progress.results(refs, range(len(refs)))

    def __call__(self, applies: dict | None = None, grams: dict | None = None, eigens: dict | None = None) -> dict:
        import ray

        applies_ref = ray.put({n: q.cpu() for n, q in (applies or {}).items()})
        eigens_ref = ray.put({n: (a.cpu(), s.cpu()) for n, (a, s) in (eigens or {}).items()})
        parts = self._pass(lambda w, reporter: w.run.remote(self.layers, applies_ref, grams or {}, eigens_ref,
                                                            reporter))
        total = {name: t.clone() for name, t in next(parts).items()}  # Ray's buffers may be read-only
        for part in parts:  # in shard-group order (deterministic sums), one partial in the driver at a time
            for name, value in part.items():
                total[name] += value
        return {name: t.to(self.device) for name, t in total.items()}

    def write_coordinates(self, vectors: dict, paths: dict, dtype: str, block_rows: int) -> dict[str, dict[int, int]]:
        """Every worker writes its rows' g'_t; returns each layer's {block: CRC-32} over all of them."""
        import ray

        vectors_ref = ray.put({n: v.cpu() for n, v in vectors.items()})
        parts = list(self._pass(lambda w, reporter: w.write_coordinates.remote(self.layers, vectors_ref, paths, dtype,
                                                                               block_rows, reporter)))
        return {name: {block: crc for part in parts for block, crc in part[name].items()} for name in parts[0]}


class RayGram:
    """The Gram backend of ``run_curvature`` on Ray: one ``GramWorker`` actor per shard group."""

    def __init__(self, cfg: Config, manifest: Manifest, precision: Precision, device, *, num_workers: int,
                 actor_options: dict | None = None):
        import ray

        remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(GramWorker)
        groups = shard_groups(manifest, num_workers)
        self.workers = [remote.remote(cfg, group) for group in groups]
        self.rows = [stop - start for start, stop in (manifest.row_range(group) for group in groups)]
        self.device = device

    def layers(self, specs, on_rows=None) -> RemoteLayerGram:
        """The workers' pass over these layers' rows; ``on_rows`` gets the row blocks they report, every pass."""
        return RemoteLayerGram(self.workers, [s.name for s in specs], self.device, self.rows, on_rows)

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

