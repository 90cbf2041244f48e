"""The queries of stage 3: read, tokenized (with ``query.per_token``, one row per target token after them) and
featurized exactly like the index (``QueryFeaturizer``: the model loaded once, every row-shaping setting pinned to
the index's by ``query_config``), into ``QueryRows``. The Ray backend featurizes on a gradient replica with the
same ``query_examples`` (``lorif_ray.distributed.query_gradients``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lorif_ray.config import Config
from lorif_ray.data import IGNORE_INDEX, Columns, Example, TokenizedExample, tokenize_examples
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.data.examples import DEFAULT_COLUMNS
from lorif_ray.errors import ConfigError
from lorif_ray.model.loading import check_same_model, load_model, model_identity
from lorif_ray.progress import progress_bar
from lorif_ray.stages.index import build_featurizer, quiet_transformers
from lorif_ray.stages.inputs import layer_specs, query_config, require, resolve_inputs, tokenized


@dataclass
class QueryRows:
    """Featurized queries: the rows of ``columns`` {column: (n, width)} (float32, CPU) are the queries ``ids``
    and then, with ``query.per_token``, one row per target token, ``tokens[i]`` = (query id, position, token
    text); ``seconds`` of featurizing."""

    ids: list[str]
    columns: dict[str, torch.Tensor]
    seconds: float
    tokens: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def row_ids(self) -> list[str]:
        """Every row's id: the query's, or ``<query id>@<position>`` for a token row."""
        return self.ids + [f"{query}@{position}" for query, position, _ in self.tokens]


def query_examples(source: Path | Sequence[Example], tokenizer, max_length: int, per_token: bool,
                   columns: Columns = DEFAULT_COLUMNS
                   ) -> tuple[list[TokenizedExample], list[tuple[str, int, str]]]:
    """The tokenized queries of a file (or of examples already read, e.g. a request's) and, with ``per_token``,
    after them one copy of each query per target token whose labels keep that token only (its loss alone),
    with (query id, position, token text) each.

    Raises:
        ConfigError: the file holds no queries (or no examples are given).
    """
    if isinstance(source, (str, Path)):
        queries = tokenized(Path(source), tokenizer, max_length, columns)
    else:
        queries = tokenize_examples(list(source), tokenizer, max_length)
    if not queries:
        raise ConfigError(f"{source if isinstance(source, (str, Path)) else 'the request'} holds no queries")
    if not per_token:
        return queries, []
    rows, tokens = [], []
    for query in queries:
        for position in range(1, len(query.labels)):  # position 0 is never predicted
            label = query.labels[position]
            if label == IGNORE_INDEX:
                continue
            labels = [IGNORE_INDEX] * len(query.labels)
            labels[position] = label
            rows.append(TokenizedExample(f"{query.id}@{position}", query.input_ids, labels))
            tokens.append((query.id, position, tokenizer.decode([label])))
    return queries + rows, tokens


class QueryFeaturizer:
    """Loads the model once and featurizes query files exactly like the index (``query_config``), taking each
    query's gradient of ``query.measurement`` (training rows: always the summed loss).

    Args:
        measurement: a function ``(model outputs, batch) → (B,)`` to use instead of ``query.measurement``
            (which then reads ``custom:<name>``, set by ``lorif_ray.api``).

    Raises:
        ModelMismatchError / IndexMismatchError: the model or a row-shaping setting differs from the index's.
        ConfigError: ``query.measurement`` names a function but none is given.
    """

    def __init__(self, cfg: Config, manifest, measurement=None):
        cfg = query_config(cfg, manifest)
        if measurement is None and cfg.query.measurement.startswith("custom:"):
            raise ConfigError(f"query.measurement={cfg.query.measurement}: pass the function (Python API) or "
                              "choose one of loss, logprob, mean_loss")
        with quiet_transformers():
            model, self.tokenizer = load_model(resolve_inputs(cfg).model_path, dtype=cfg.model.dtype,
                                               device=cfg.model.device, adapter=cfg.model.adapter)
        check_same_model(manifest.meta["model"], model_identity(model), f"index {cfg.index_path}")
        self.featurizer = build_featurizer(cfg, model, kind=manifest.kind,
                                           layer_names=[s.name for s in layer_specs(manifest)])
        self.featurizer.measurement = measurement or cfg.query.measurement
        self.max_length, self.batch_size = manifest.meta["config"]["max_length"], cfg.data.batch_size
        self.per_token, self.progress, self.columns = cfg.query.per_token, cfg.progress, cfg.data.columns

    def __call__(self, queries: Path | Sequence[Example]) -> QueryRows:
        """The featurized queries of a file, or of examples in memory (``query.per_token``: and their tokens);
        the bar moves per batch."""
        queries, tokens = query_examples(queries, self.tokenizer, self.max_length, self.per_token, self.columns)
        start = time.perf_counter()
        parts = []
        with progress_bar(len(queries), "stage 3: query gradients", "query", self.progress) as bar:
            for ids, batch in token_batches(queries, self.batch_size, self.tokenizer.pad_token_id):
                parts.append(self.featurizer(ids, batch))
                bar.update(len(ids))
        columns = {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}
        return QueryRows([q.id for q in queries[:len(queries) - len(tokens)]], columns, time.perf_counter() - start,
                         tokens)

    def close(self) -> None:
        pass


def featurize_queries(cfg: Config, manifest) -> QueryRows:
    """The featurized ``data.queries``, in this process."""
    return QueryFeaturizer(cfg, manifest)(require(resolve_inputs(cfg).queries_path, "data.queries"))
