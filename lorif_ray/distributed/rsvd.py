"""Distributed randomized SVD (stage 2 over shard groups): workers sum, the driver solves.

The one-process code in ``lorif_ray.math.rsvd`` only needs ``GᵀG Q = Σ_batches G_bᵀ (G_b Q)``, so
here each worker owns a contiguous group of shards and returns its partial sum ``Σ_s G_sᵀ (G_s Q)``
(D×k), and the driver adds the partials, orthonormalizes and solves the k×k problem. The workers
hold nothing but paths: rows are re-read from the Parquet shards on every pass (only the layer's
columns), so memory stays bounded for any N.

Example (needs a running Ray, e.g. ``ray.init(num_cpus=2)``):
    >>> report = run_curvature_distributed(cfg, num_workers=2)   # same file as run_curvature(cfg)
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError
from lorif_ray.math.rsvd import GramApply
from lorif_ray.model.loading import resolve_device
from lorif_ray.stages.coordinates import (
    CoordinateWriter,
    coordinates_dir,
    coordinates_from_sketch,
    coordinates_match,
    write_rows,
)
from lorif_ray.stages.curvature import (
    curvature_layers,
    layer_curvature,
    layer_specs,
    prepare_curvature,
    save_curvature,
)
from lorif_ray.stages.featurize import blocks_from_columns
from lorif_ray.store import Manifest, iter_batches, open_index

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
    """Partial Gram products of one group of shards (a plain class; wrap with ``ray.remote``).

    Holds only the index path, its manifest and the shard indices; every call streams the shards.
    With ``keep_sketch`` a pass also keeps G_s Q (rows × k) so that ``write_coordinates`` gets this
    group's g'_t = V_rᵀ g_t without another pass.

    Args:
        index_dir: the index directory.
        shards: the consecutive shard indices this worker owns.
        batch_rows: rows per streamed batch.
        device: where this worker computes ("auto": the GPU Ray gave it, else the CPU), in the dtype
            of the Q it is sent (float64 from a CPU driver); results are returned on the CPU.

    Example:
        >>> worker = GramWorker(cfg.index_path, [0, 1], batch_rows=1024)
        >>> z = worker.apply("transformer.h.0.mlp.c_fc", q)   # (D, k) = Σ_{s∈{0,1}} G_sᵀ (G_s q)
    """

    def __init__(self, index_dir, shards: Sequence[int], batch_rows: int = 1024, device="cpu"):
        self.index_dir, self.shards, self.batch_rows = str(index_dir), list(shards), batch_rows
        self.device = resolve_device(device)
        self.manifest = open_index(self.index_dir)
        self.rows = self.manifest.row_range(self.shards)
        self.specs = {s.name: s for s in layer_specs(self.manifest)}
        self.sketch: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (layer, Q, G_s Q) of the last pass

    def _rows(self, layer: str, dtype: torch.dtype):
        """Dense (b, D) rows of ``layer`` in this worker's shards."""
        spec = self.specs[layer]
        suffixes = ("u", "v") if self.manifest.kind == "factors" else ("g",)
        columns = [f"{layer}.{c}" for c in suffixes]
        for _, cols in iter_batches(self.index_dir, columns, batch_rows=self.batch_rows, out_dtype=dtype,
                                    device=self.device, manifest=self.manifest, shards=self.shards):
            yield blocks_from_columns([spec], self.manifest.kind, cols)[layer].dense()

    def apply(self, layer: str, q: torch.Tensor, keep_sketch: bool = False) -> torch.Tensor:
        """Σ_s G_sᵀ (G_s q): (D, k), in q's dtype (keeping G_s q with ``keep_sketch``)."""
        q = q.to(self.device)
        out, sketch = torch.zeros_like(q), []
        for rows in self._rows(layer, q.dtype):
            y = rows @ q  # (b, k)
            if keep_sketch:
                sketch.append(y)
            out += rows.T @ y
        self.sketch = (layer, q, torch.cat(sketch) if sketch else q[:0]) if keep_sketch else None
        return out.cpu()

    def gram(self, layer: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Σ_s G_sᵀ G_s: (D, D)."""
        dim = self.specs[layer].dim
        out = torch.zeros(dim, dim, dtype=dtype, device=self.device)
        for rows in self._rows(layer, dtype):
            out += rows.T @ rows
        return out.cpu()

    def write_coordinates(self, layer: str, vectors: torch.Tensor, path: str, dtype: str) -> int:
        """Write g'_t = V_rᵀ g_t of this group's rows into their rows of ``path`` (a file of
        ``CoordinateWriter.begin``): from the last pass's sketch, else by one more pass. Returns the rows."""
        vectors = vectors.to(self.device)
        coords = None
        if self.sketch is not None and self.sketch[0] == layer:
            coords = coordinates_from_sketch(vectors, *self.sketch[1:])
        if coords is None:
            coords = torch.cat([rows @ vectors for rows in self._rows(layer, vectors.dtype)])
        self.sketch = None
        write_rows(path, self.rows[0], coords, dtype)
        return coords.shape[0]


def start_gram_workers(index_dir, manifest: Manifest, num_workers: int, batch_rows: int,
                       actor_options: dict | None = None, device: str = "cpu") -> list:
    """One ``GramWorker`` actor per shard group."""
    import ray

    remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(GramWorker)
    return [remote.remote(str(index_dir), group, batch_rows, device) for group in shard_groups(manifest, num_workers)]


def distributed_gram_apply(workers: Sequence, layer: str, keep_sketch: bool = False) -> GramApply:
    """GᵀG Q for ``randomized_spectrum``: scatter Q to every worker, sum the partials in group order
    (``keep_sketch``: each worker keeps its G_s Q of the last call, for ``write_coordinates``)."""
    import ray

    def apply(q: torch.Tensor) -> torch.Tensor:
        q_ref = ray.put(q.cpu())
        partials = ray.get([w.apply.remote(layer, q_ref, keep_sketch) for w in workers])
        return _sum(partials).to(device=q.device, dtype=q.dtype)

    return apply


def distributed_gram(workers: Sequence, layer: str, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """GᵀG (D, D) of ``layer``, summed over the workers' shard groups (for the exact path)."""
    import ray

    return _sum(ray.get([w.gram.remote(layer, dtype) for w in workers])).to(device)


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def run_curvature_distributed(cfg: Config, num_workers: int, *, actor_options: dict | None = None) -> dict:
    """Stage 2 with Gram products summed over ``num_workers`` shard-group actors.

    Writes the same ``cfg.curvature_path`` as ``run_curvature(cfg)`` (same seed ⇒ equal to float
    error; the sums are only reordered) and reuses an existing file made with the same settings. With
    ``query.store_coordinates`` every worker also writes g'_t of its rows (in the index's dtype) from
    the sketch of the last pass, into one file per layer (``lorif_ray.stages.coordinates``; on several
    nodes ``output_dir`` must be shared storage).

    Example:
        >>> ray.init(num_cpus=4)
        >>> run_curvature_distributed(cfg, num_workers=4)["layers"]
    """
    import ray

    manifest, meta, reusable = prepare_curvature(cfg)
    kind, specs, device, dtype = curvature_layers(cfg, manifest)
    store = cfg.query.store_coordinates and kind == "woodbury"
    if reusable and (not store or coordinates_match(cfg, cfg.dtype)):
        return {"reused": True, "path": str(cfg.curvature_path)}
    writer = CoordinateWriter(coordinates_dir(cfg), manifest.num_rows, cfg.dtype) if store else None
    results = {}
    start = time.perf_counter()
    workers = start_gram_workers(cfg.index_path, manifest, num_workers, cfg.query.train_batch_rows, actor_options,
                                 cfg.model.device) if specs else []
    try:
        for spec in tqdm(specs, desc="stage 2: curvature (distributed)", unit="layer", disable=not cfg.progress):
            gram = lambda spec=spec: distributed_gram(workers, spec.name, torch.float64, device)  # noqa: E731
            apply = distributed_gram_apply(workers, spec.name, keep_sketch=store)
            results[spec.name] = curvature = layer_curvature(cfg, kind, spec, apply, gram, dtype, device)
            if writer is not None:
                path, vectors = writer.begin(spec.name, curvature.values.numel()), ray.put(curvature.vectors.cpu())
                ray.get([w.write_coordinates.remote(spec.name, vectors, path, cfg.dtype) for w in workers])
                writer.commit(spec.name)
    finally:
        for worker in workers:
            ray.kill(worker)
    report = save_curvature(cfg, meta, kind, results, time.perf_counter() - start)
    if writer is not None:
        report["coordinates"] = writer.finish(cfg.curvature_path)
    return {**report, "workers": len(workers)}
