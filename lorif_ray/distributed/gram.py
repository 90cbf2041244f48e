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

import torch

from lorif_ray.config import Config
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.errors import ConfigError
from lorif_ray.footprint import Held, dtype_name, largest, shard_records
from lorif_ray.math.blocks import dense_chunk_rows
from lorif_ray.math.curvature import Curvature
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import Precision
from lorif_ray.stages.curvature import LayerGram, fit_settings
from lorif_ray.stages.featurize import LayerSpec
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



# ---------------------------------------------------------------- footprints (what each process holds)


def row_requests(cfg: Config, group: list[LayerSpec], num_rows: int | None = None) -> dict[str, list]:
    """The group's layers by what their fit over ``num_rows`` rows asks of them (``Curvature.row_request``):
    "apply" [(spec, k)], "gram" [(spec, D)], "eigen" [spec]."""
    curvature, settings = Curvature.of(cfg.curvature_kind), fit_settings(cfg, torch.float64, "cpu", num_rows)
    out: dict[str, list] = {"apply": [], "gram": [], "eigen": []}
    for s in group:
        kind, k = curvature.row_request(s.d1, s.d2, settings)
        if kind in ("apply", "gram"):
            out[kind].append((s, k))
        elif kind == "eigen":
            out[kind].append(s)
    return out


def worker_footprint(cfg: Config, group: list[LayerSpec], *, rows: int, shards: int, resident_bytes: int | None,
                     precision: Precision, driver_math: torch.dtype, where: str,
                     num_rows: int | None = None) -> list[Held]:
    """What one ``GramWorker`` of ``rows`` rows holds for one group of layers: the group's rows resident
    (``resident_bytes``, in its math dtype) or one streamed batch, their dense rows one chunk at a time, Q in
    the matmul dtype and GᵀG Q accumulated in the dtype of the Q it receives (the driver's), or the D×D GᵀG, or
    EK-FAC's Λ*; with stored g'_t, V_r and the rows' g'_t."""
    math, matmul, driver = precision.math, precision.matmul, driver_math
    factors = cfg.method.store_kind == "factors"
    asks = row_requests(cfg, group, num_rows)
    applies, grams, eigens = asks["apply"], asks["gram"], asks["eigen"]
    width = sum(s.c * (s.d1 + s.d2) if factors else s.dim for s in group)
    dense = sum(s.dim for s in group)
    held = [shard_records(shards)]
    if resident_bytes is not None:
        chunk = min(rows, dense_chunk_rows(dense, math))
        held += [Held(f"rows of the group's layers, resident ({rows:,} × {width:,})", dtype_name(math),
                      resident_bytes, where),
                 Held("[load] the decoded batches, until concatenated", dtype_name(math), resident_bytes, where,
                      "load")]
    else:
        chunk = min(rows, cfg.query.train_batch_rows, cfg.shard_size)
        held.append(Held(f"[pass] one streamed batch of the group's columns ({chunk:,} × {width:,})",
                         dtype_name(math), chunk * width * math.itemsize, where, "pass"))
    if factors:
        held.append(Held(f"[pass] dense rows vec(u vᵀ) of one chunk ({chunk:,} × ΣD = {dense:,})",
                         dtype_name(math), chunk * dense * math.itemsize, where, "pass"))
    if applies:
        iterate = sum(s.dim * k for s, k in applies)
        held += [Held("[pass] Q (D×k per layer) in the matmul dtype", dtype_name(matmul),
                      matmul.itemsize * iterate, where, "pass"),
                 Held("[pass] GᵀG Q accumulated, in the dtype of the Q it receives", dtype_name(driver),
                      driver.itemsize * iterate, where, "pass"),
                 Held("[pass] one chunk's G_bᵀ(G_b Q) before it is added (one layer at a time)",
                      dtype_name(matmul), (matmul.itemsize + (driver.itemsize if driver != matmul else 0))
                      * largest(applies, lambda s, k: s.dim * k), where, "pass"),
                 Held("[pass] Q received and GᵀG Q returned", dtype_name(driver), 2 * driver.itemsize * iterate,
                      "host", "pass")]
        if matmul != math:
            held.append(Held("[pass] one chunk's rows cast to the matmul dtype (one layer at a time)",
                             dtype_name(matmul), chunk * max(s.dim for s, _ in applies) * matmul.itemsize,
                             where, "pass"))
        if cfg.query.store_coordinates:
            ranks = sum(min(cfg.r, s.dim) for s, _ in applies)
            held += [Held("[g'_t] V_r of the group's layers", dtype_name(math),
                          math.itemsize * sum(s.dim * min(cfg.r, s.dim) for s, _ in applies), where, "g'_t"),
                     Held(f"[g'_t] g'_t of its rows, by batch and concatenated ({rows:,} × {ranks:,}, twice)",
                          dtype_name(math), 2 * rows * ranks * math.itemsize, where, "g'_t")]
    if grams:
        gram = sum(s.dim**2 for s, _ in grams)
        held += [Held("[pass] GᵀG (D×D) accumulated", "float64", 8 * gram, where, "pass"),
                 Held("[pass] one chunk's G_bᵀG_b before it is added (one layer at a time)", "float64",
                      8 * largest(grams, lambda s, k: s.dim**2), where, "pass"),
                 Held("[pass] GᵀG returned", "float64", 8 * gram, "host", "pass")]
        if math != torch.float64:
            held.append(Held("[pass] one chunk's rows in float64 (one layer at a time)", "float64",
                             8 * chunk * max(s.dim for s, _ in grams), where, "pass"))
    if eigens:  # GramPass: bases as the driver sends them, Λ* in float64, eigenvalue_sums per chunk
        bases = sum(s.d1**2 + s.d2**2 for s in eigens)
        held += [Held("[pass] eigenbases Q_A, Q_S of the group's layers, as received", dtype_name(driver),
                      driver.itemsize * bases, where, "pass"),
                 Held("[pass] Λ* (d1×d2) accumulated", "float64", 8 * sum(s.dim for s in eigens), where, "pass"),
                 Held("[pass] one chunk rotated, in float64 and squared (one layer at a time)", "float64",
                      chunk * max(s.dim for s in eigens) * (driver.itemsize + 16), where, "pass"),
                 Held("[pass] bases received and Λ* returned", "float64",
                      driver.itemsize * bases + 8 * sum(s.dim for s in eigens), "host", "pass")]
    return held


def driver_footprint(cfg: Config, group: list[LayerSpec], specs: list[LayerSpec], *, workers: int, shards: int,
                     math: torch.dtype, where: str, num_rows: int | None = None) -> list[Held]:
    """What ``run_curvature``'s driver holds with ``RayGram`` for one group of layers: the rSVD iterate Q of
    each layer, every worker's partial GᵀG Q gathered at once and summed, then the final float64 step; the
    fitted curvature of the group until it is written. K-FAC and EK-FAC: stage 1's statistics of every layer
    (``specs``), the group's eigenbases, and (EK-FAC) every worker's Λ* gathered at once."""
    size, name = math.itemsize, dtype_name(math)
    curvature = Curvature.of(cfg.curvature_kind)
    settings = fit_settings(cfg, math, "cpu", num_rows)
    asks = row_requests(cfg, group, num_rows)
    applies, grams = asks["apply"], asks["gram"]
    eigens = sum(s.dim for s in asks["eigen"])
    iterate = sum(s.dim * k for s, k in applies)
    gram = sum(s.dim**2 for s, _ in grams)
    top = max(applies, key=lambda p: p[0].dim * p[1], default=None)
    shape = f"D×k per layer, {len(group)} layer(s)" + (f", largest {top[0].dim:,}×{top[1]:,}" if top else "")
    held = [shard_records(shards)]
    bases = sum(s.d1**2 + s.d2**2 for s in group)
    if curvature.needs_stats:
        stats = sum(s.d1**2 + s.d2**2 for s in specs)  # read_stats: every layer's Ã and S̃ at once
        held += [Held("K-FAC statistics Ã (d1×d1), S̃ (d2×d2) of every layer", "float64", 8 * stats),
                 Held("[final] eigenbases Q_A, Q_S of each layer of the group, and their eigenvalues", name,
                      size * (bases + sum(s.dim for s in group)), where, "final")]
    if eigens:
        held += [Held("eigenbases Q_A, Q_S of each layer of the group", name, size * bases, where),
                 Held("[gather] the bases put for the Gram actors", name, size * bases, "object store", "gather"),
                 Held(f"[gather] Λ* (d1×d2) from each of {workers} Gram actors, gathered at once, and their sum",
                      "float64", (workers + 1) * 8 * eigens, phase="gather")]
    if applies:
        held += [Held(f"rSVD iterate Q ({shape})", name, size * iterate, where),
                 Held("[gather] Q put for the Gram actors", name, size * iterate, "object store", "gather"),
                 Held(f"[gather] GᵀG Q from each of {workers} Gram actors, gathered at once", name,
                      workers * size * iterate, phase="gather"),
                 Held("[gather] their sum", name, size * iterate, phase="gather"),
                 Held("[final] Z = GᵀG Q of each layer", name, size * iterate, where, "final"),
                 Held("[final] B = R⁻ᵀZᵀ, its SVD's Vᵀ and V reordered (one layer at a time)" +
                      ("; Q and Z in float64" if math != torch.float64 else ""), "float64",
                      (3 if math == torch.float64 else 5) * 8 * largest(applies, lambda s, k: s.dim * k),
                      where, "final")]
    if grams:
        held += [Held(f"[gather] GᵀG (D×D) from each of {workers} Gram actors, gathered at once", "float64",
                      workers * 8 * gram, phase="gather"),
                 Held("[gather] their sum", "float64", 8 * gram, phase="gather"),
                 Held("[final] GᵀG of each layer", "float64", 8 * gram, where, "final"),
                 Held("[final] eigenvectors, their scaled copy and the result (one layer at a time)", "float64",
                      3 * 8 * largest(grams, lambda s, k: s.dim**2), where, "final")]
    fitted = size * sum(curvature.saved_numbers(s.d1, s.d2, settings) for s in group)
    held.append(Held("[final] fitted curvature of the group, until written", name, fitted, where, "final"))
    if cfg.query.store_coordinates and applies:
        vectors = sum(size * s.dim * min(cfg.r, s.dim) for s, _ in applies)
        held += [Held("[g'_t] fitted V_r of the group", name, vectors, where, "g'_t"),
                 Held("[g'_t] V_r put for the Gram actors", name, vectors, "object store", "g'_t")]
    return held
