"""Stage 2 on Ray: shard-group actors sum each layer's Gram products, the one driver fits the curvature.

``RayGram`` is the Gram backend of ``lorif_ray.stages.curvature.run_curvature`` on a cluster: one
``GramWorker`` actor per contiguous group of shards holds a ``LayerGram`` over its rows of the current
layer (resident in its memory when they fit, else streamed from Parquet once per pass) and returns its
partial ``Σ_s G_sᵀ (G_s Q)``; the driver adds the partials in group order, which only reorders the sums
of the one-process operator. With stored g'_t every worker writes its own rows' g'_t into the shared
file (on several nodes ``output_dir`` must be shared storage).

Example (needs a running Ray, e.g. ``ray.init(num_cpus=2)``):
    >>> run_curvature(cfg, partial(RayGram, num_workers=2))   # the same file as run_curvature(cfg)
"""

from __future__ import annotations

from typing import Sequence

import torch

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import Precision
from lorif_ray.stages.curvature import LayerGram
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.stages.rows import layer_rows
from lorif_ray.store import Manifest, open_index

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
    """The Gram operator of one layer over one group of shards (a plain class; wrap with ``ray.remote``).

    Args:
        cfg: the run config (index path, precision policy, batch rows, device: "auto" = the GPU Ray gave
            it, else the CPU).
        shards: the consecutive shard indices this worker owns.
        resident: hold the layer's rows in memory (None = when they fit, see ``layer_rows``).

    Example:
        >>> worker = GramWorker(cfg, [0, 1])
        >>> z = worker.apply("transformer.h.0.mlp.c_fc", q)   # (D, k) = Σ_{s∈{0,1}} G_sᵀ (G_s q)
    """

    def __init__(self, cfg: Config, shards: Sequence[int], resident: bool | None = None):
        self.cfg, self.shards, self.resident = cfg, list(shards), resident
        self.device = resolve_device(cfg.model.device)
        self.precision = Precision.of(cfg, self.device)
        self.manifest = open_index(cfg.index_path)
        self.first_row = self.manifest.row_range(self.shards)[0]
        self.specs = {s.name: s for s in layer_specs(self.manifest)}
        self.current: tuple[str, LayerGram] | None = None

    def _gram(self, layer: str) -> LayerGram:
        if self.current is None or self.current[0] != layer:
            self.current = None  # free the previous layer's rows first
            rows = layer_rows(self.cfg.index_path, self.manifest, self.specs[layer], dtype=self.precision.math,
                              device=self.device, shards=self.shards, batch_rows=self.cfg.query.train_batch_rows,
                              resident=self.resident)
            self.current = (layer, LayerGram(rows, self.precision.matmul, self.first_row))
        return self.current[1]

    def apply(self, layer: str, q: torch.Tensor) -> torch.Tensor:
        """Σ_s G_sᵀ (G_s q): (D, k) in q's dtype, on the CPU."""
        return self._gram(layer)(q).cpu()

    def gram(self, layer: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Σ_s G_sᵀ G_s: (D, D), on the CPU."""
        return self._gram(layer).gram(dtype).cpu()

    def write_coordinates(self, layer: str, vectors: torch.Tensor, path: str, dtype: str) -> int:
        """g'_t = V_rᵀ g_t of this group's rows into their rows of ``path``; returns the row count."""
        return self._gram(layer).write_coordinates(vectors.to(self.precision.math), path, dtype)

    def passes(self) -> int:
        """Passes over the current layer's rows so far (reads of its shards when streamed)."""
        return 0 if self.current is None else self.current[1].rows.passes


class RemoteLayerGram:
    """One layer's Gram operator summed over the workers (what ``Curvature.fit`` calls)."""

    def __init__(self, workers: Sequence, layer: str, device):
        self.workers, self.layer, self.device = workers, layer, device

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        import ray

        q_ref = ray.put(q.cpu())
        return _sum(ray.get([w.apply.remote(self.layer, q_ref) for w in self.workers])).to(self.device, q.dtype)

    def gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        import ray

        return _sum(ray.get([w.gram.remote(self.layer, dtype) for w in self.workers])).to(self.device)

    def write_coordinates(self, vectors: torch.Tensor, path: str, dtype: str) -> int:
        import ray

        vectors_ref = ray.put(vectors.cpu())
        return sum(ray.get([w.write_coordinates.remote(self.layer, vectors_ref, path, dtype) for w in self.workers]))


class RayGram:
    """The Gram backend of ``run_curvature`` on Ray: one ``GramWorker`` actor per shard group."""

    def __init__(self, cfg: Config, manifest: Manifest, precision: Precision, device, *, num_workers: int,
                 actor_options: dict | None = None):
        import ray

        remote = ray.remote(**(actor_options or DEFAULT_ACTOR_OPTIONS))(GramWorker)
        self.workers = [remote.remote(cfg, group) for group in shard_groups(manifest, num_workers)]
        self.device = device

    def layer(self, spec) -> RemoteLayerGram:
        return RemoteLayerGram(self.workers, spec.name, self.device)

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
