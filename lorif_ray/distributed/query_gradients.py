"""Query gradients on a gradient replica, so the driver never loads the model (a 70B model's
replica is tensor-parallel: its ranks hold the shards, rank 0 returns the query's columns)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from lorif_ray.config import Config
from lorif_ray.distributed.index_pipeline import IndexPipeline
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.model.loading import check_same_model, load_tokenizer, resolve_device
from lorif_ray.stages.inputs import math_dtype, resolve_inputs, tokenized
from lorif_ray.stages.query import check_index_config


class RemoteQueryFeaturizer:
    """Featurizes query files on one gradient replica (``cluster.tp_size`` ranks), exactly like the index.

    Same interface as ``lorif_ray.stages.query.QueryFeaturizer``; call ``close()`` (or use ``with``)
    to release the replica.

    Raises:
        ModelMismatchError / IndexMismatchError: the model or f/c/seed/layers differ from the index's.
    """

    def __init__(self, cfg: Config, manifest):
        import ray

        check_index_config(cfg, manifest)
        model_path = resolve_inputs(cfg).model_path
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = manifest.meta["config"]["max_length"]
        one_replica = replace(cfg, cluster=replace(cfg.cluster, gradient_actors=1, fused=True))
        self.pipeline = IndexPipeline(one_replica, str(model_path))
        self.dtype = math_dtype(resolve_device(cfg.model.device))
        try:
            layout = ray.get(self.pipeline.gradient_actors[0].describe.remote("", 0))
            check_same_model(manifest.meta["model"], layout["meta"]["model"], f"index {cfg.index_path}")
            if layout["columns"] != manifest.columns:
                raise IndexMismatchError(f"index {cfg.index_path} stores other columns than this config makes "
                                         f"(model.layers or method differ)")
        except BaseException:
            self.close()
            raise

    def __call__(self, queries_path: Path) -> tuple[list[str], dict[str, torch.Tensor], float]:
        """Query ids, query columns {column: (nq, width)} in the math dtype, and seconds."""
        import ray

        queries = tokenized(Path(queries_path), self.tokenizer, self.max_length)
        if not queries:
            raise ConfigError(f"{queries_path} holds no queries")
        start = time.perf_counter()
        _, payload, statuses = self.pipeline.featurize(self.pipeline.gradient_slots[0], 0, queries)
        ray.get(statuses)
        _, ids, columns = ray.get(payload)
        return ids, {k: v.to(self.dtype) for k, v in columns.items()}, time.perf_counter() - start

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> "RemoteQueryFeaturizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
