"""Query gradients on a gradient replica, so the driver never loads the model (a 70B model's
replica is tensor-parallel: its ranks hold the shards, rank 0 returns the query's columns)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lorif_ray.config import Config
from lorif_ray.data import Example
from lorif_ray.distributed.featurize import GradientReplicas
from lorif_ray.distributed.progress import ActorProgress
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.model.loading import check_same_model, load_tokenizer
from lorif_ray.progress import progress_bar
from lorif_ray.stages.inputs import query_config, resolve_inputs
from lorif_ray.stages.queries import QueryRows, query_examples


class RemoteQueryFeaturizer:
    """Featurizes query files on one gradient replica (``cluster.tp_size`` ranks), exactly like the index.

    Same interface as ``lorif_ray.stages.queries.QueryFeaturizer``; call ``close()`` (or use ``with``)
    to release the replica.

    The replica is built from ``query_config``: every row-shaping setting (f, c, seed, factor_iters,
    layers, dtypes, max_length) is the index's, as in one process; the replica takes each query's gradient
    of ``query.measurement`` (training shards: the summed loss).

    Raises:
        ModelMismatchError / IndexMismatchError: the model or a row-shaping setting differs from the index's.
    """

    def __init__(self, cfg: Config, manifest):
        import ray

        cfg = query_config(cfg, manifest)
        if cfg.query.measurement.startswith("custom:"):
            raise ConfigError(f"query.measurement={cfg.query.measurement}: a measurement function runs in one "
                              "process (cluster=none); on Ray choose one of loss, logprob, mean_loss")
        self.measurement = cfg.query.measurement  # what the replica takes each query's gradient of
        model_path = resolve_inputs(cfg).model_path
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = manifest.meta["config"]["max_length"]
        self.per_token, self.progress, self.columns = cfg.query.per_token, cfg.progress, cfg.data.columns
        one_replica = replace(cfg, cluster=replace(cfg.cluster, gradient_actors=1, fused=True))
        self.replicas = GradientReplicas(one_replica, str(model_path))
        self.replica = self.replicas.members[0]
        try:
            layout = ray.get(self.replica.actor.describe.remote("", 0))
            check_same_model(manifest.meta["model"], layout["meta"]["model"], f"index {cfg.index_path}")
            if layout["columns"] != manifest.columns:
                raise IndexMismatchError(f"index {cfg.index_path} stores other columns than this config makes "
                                         f"(model.layers or method differ)")
        except BaseException:
            self.close()
            raise

    def __call__(self, queries: Path | Sequence[Example]) -> QueryRows:
        """The featurized queries of a file, or of examples in memory (``query.per_token``: and their tokens);
        rank 0 reports each batch."""
        import ray

        queries, tokens = query_examples(queries, self.tokenizer, self.max_length, self.per_token, self.columns)
        start = time.perf_counter()
        with progress_bar(len(queries), "stage 3: query gradients (ray)", "query", self.progress) as bar:
            progress = ActorProgress(bar.update if self.progress else None)
            reporter = progress.start("queries", len(queries))
            # every rank of the replica gets the batch (tensor parallel: collectives), with the query measurement
            calls = [rank.featurize.options(num_returns=2).remote(0, queries, True, self.measurement,
                                                                  reporter if i == 0 else None)
                     for i, rank in enumerate(self.replica.actors)]
            payload, statuses = calls[0][1], [status for status, _ in calls]
            list(progress.results(statuses[:1], ["queries"]))
            ray.get(statuses)
        _, ids, columns = ray.get(payload)
        return QueryRows(ids[:len(ids) - len(tokens)], {k: v.float().cpu() for k, v in columns.items()},
                         time.perf_counter() - start, tokens)

    def close(self) -> None:
        self.replicas.close()

    def __enter__(self) -> "RemoteQueryFeaturizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
