"""The Python API: index a model's training data, fit the curvature, and ask which training examples
most influenced a query, from a notebook or a script (the answers: ``lorif_ray.results.Results``). It
composes the same stage calls as the jobs (``run_index``, ``run_curvature``, ``run_query`` in this process;
``lorif_ray.distributed.stages.run_stage`` on Ray), so it writes the same files and gives the same scores.

Example:
    >>> from lorif_ray import Attributor
    >>> attributor = Attributor("models/my-gpt2", output_dir="runs/demo", f=4, c=1, r=64)  # doctest: +SKIP
    >>> attributor.index(["the cat sat on the mat .", "a dog ran fast ."])  # doctest: +SKIP
    >>> attributor.fit_curvature()  # doctest: +SKIP
    >>> results = attributor.query([{"prompt": "the cat", "response": " sat"}])  # doctest: +SKIP
    >>> results.proponents("0")[0]["train_text"]  # doctest: +SKIP
    'the cat sat on the mat .'
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lorif_ray.config import ClusterConfig, Config, DataConfig, MethodConfig, ModelConfig, QueryConfig
from lorif_ray.data import load_examples
from lorif_ray.errors import ConfigError, DataError
from lorif_ray.math.capture import MEASUREMENTS
from lorif_ray.results import Results
from lorif_ray.stages.index import quiet_transformers
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.stages.outputs import claim_output_dir

log = logging.getLogger(__name__)

Data = Any
"""A data path (``.jsonl``, ``.parquet``, ``.arrow``, a ``save_to_disk`` folder), a ``datasets.Dataset``, a
``pyarrow.Table``, a list of dicts (``text``, ``prompt`` + ``response`` or ``messages``) or a list of strings."""


class Attributor:
    """Training-data attribution for one model, writing everything to ``output_dir``.

    Args:
        model: a local Hugging Face model folder, a model object already in memory (then ``tokenizer`` is
            required: both are saved with ``save_pretrained`` to ``<output_dir>/model`` and loaded from there,
            since the stages and Ray actors load models from folders), or None for the embedded default.
        tokenizer: the tokenizer of an in-memory model (a folder holds its own).
        method: ``lorif``, ``logra``, ``graddot`` or ``repsim``.
        f, c, r, damping, seed, dtype: as the job keys of the same names (README, *Your model and data*).
        output_dir: where the index, the curvature and the results go (a folder this tool made, or a new one).
        cluster: None = every stage in this process; "local" = a local Ray instance; any other string = the
            address of a running Ray cluster ("auto" inside one); or a ``ClusterConfig``.
        max_length, batch_size: tokens kept per example, examples per forward+backward (None: 128 and 8, or
            the embedded default's 64 and 16).
        top_k: proponents kept per query.
        measurement: what a query's gradient is taken of: "loss" (summed over its target tokens), "logprob",
            "mean_loss", or a function ``(model outputs, batch) → (B,)`` of something to *lower* (one process
            only); training examples always use the summed loss. Positive scores mean proponents.
        device: "auto", "cpu", "cuda", ...
        progress: show progress bars.
        **config: any other top-level ``Config`` field (``shard_size``, ``index_dir``, ``precision``, ``overwrite``).

    Raises:
        ConfigError: an invalid setting, or a model object without a tokenizer.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, method: str = "lorif", f: int = 4, c: int = 1,
                 r: int = 64, damping: float | None = None, seed: int = 0, dtype: str = "float32",
                 output_dir: str | Path = "outputs/api", cluster: str | ClusterConfig | None = None,
                 max_length: int | None = None, batch_size: int | None = None, top_k: int = 10,
                 measurement: str | Callable = "loss", device: str = "auto", progress: bool = False, **config):
        self.measurement = _check_measurement(measurement)
        embedded = model is None  # the job's data defaults (conf/data/embedded.yaml) for the embedded model
        max_length = max_length or (64 if embedded else 128)
        batch_size = batch_size or (16 if embedded else 8)
        self.cfg = Config(model=ModelConfig(device=device),
                          data=DataConfig(max_length=max_length, batch_size=batch_size),
                          method=MethodConfig(name=method), query=QueryConfig(top_k=top_k, full_scores=True),
                          cluster=_cluster_config(cluster), f=f, c=c, r=r, damping=damping, seed=seed, dtype=dtype,
                          output_dir=str(output_dir), progress=progress, **config)
        claim_output_dir(self.cfg)
        if model is None or isinstance(model, (str, Path)):
            path = None if model is None else str(model)
        else:
            path = str(self._save_model(model, tokenizer))
        self.cfg = replace(self.cfg, model=replace(self.cfg.model, path=path))

    @property
    def config(self) -> Config:
        """The config of the next stage call (the same object the jobs build from the command line)."""
        return self.cfg

    def index(self, train: Data | None = None) -> dict:
        """Stage 1: store the projected gradient of every training example (resumes, or reuses a finished index).

        Args:
            train: the training data (see ``Data``); None = the embedded default's (with ``model=None``).

        Returns:
            The stage report (examples, bytes per example, seconds, ...).

        Raises:
            DataError: the data's schema, naming the offending row, before any model work.
        """
        if train is not None:
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, train=str(self._data_path(train, "train"))))
        train_path = resolve_inputs(self.cfg).train_path
        if train_path is None:
            raise ConfigError("index(train): give the training data (a path, a datasets.Dataset or a list)")
        return self._run("index")  # stage 1 checks the data, in a stream, before it loads the model

    def fit_curvature(self) -> dict:
        """Stage 2: the curvature of the method (LoRIF: rank-r SVD of the stored gradients); returns its report."""
        return self._run("curvature")

    def query(self, queries: Data, *, measurement: str | Callable | None = None, top_k: int | None = None,
              self_influence: bool = False, per_layer: bool = False, per_token: bool = False) -> Results:
        """Stage 3: score every query against every indexed training example.

        Args:
            queries: the queries (see ``Data``); ``prompt`` + ``response`` rows attribute the response.
            measurement: overrides the constructor's for this call.
            top_k: overrides the constructor's for this call.
            self_influence: also I(t, t) of every training example (``Results.self_influence``).
            per_layer: also each layer's share of every score (``Results.layer_scores``).
            per_token: also each target token of a query on its own (``Results.tokens``, ``Results.token_topk``).

        Returns:
            ``Results``: the top-k proponents and opponents with their texts, the full score matrix, the metadata
            (the run's files in ``output_dir``, ``report.html`` among them; ``Results.open`` reads them again).

        Raises:
            DataError: the queries' schema, naming the offending row.
            ConfigError: ``index``/``fit_curvature`` not run (or not reusable), or a measurement function on Ray.
        """
        measure = self.measurement if measurement is None else _check_measurement(measurement)
        name = f"custom:{getattr(measure, '__qualname__', type(measure).__name__)}" if callable(measure) else measure
        if callable(measure) and self.cfg.cluster.backend != "none":
            raise ConfigError("a measurement function runs with cluster=None (one process); on Ray use a name: "
                              f"{tuple(MEASUREMENTS)}")
        query = replace(self.cfg.query, measurement=name, top_k=top_k or self.cfg.query.top_k, full_scores=True,
                        self_influence=self_influence, per_layer=per_layer, per_token=per_token)
        self.cfg = replace(self.cfg, query=query,
                           data=replace(self.cfg.data, queries=str(self._data_path(queries, "queries"))))
        inputs = resolve_inputs(self.cfg)
        if inputs.train_path is None:
            raise ConfigError("query: call index(train) first (a finished index is reused, not recomputed), so "
                              "the results can show the training texts")
        load_examples(inputs.queries_path)
        self._run("query", measure if callable(measure) else None)
        return Results(self.cfg.output_dir)

    def _run(self, stage: str, measurement: Callable | None = None) -> dict:
        """One stage of ``self.cfg``, in this process or on Ray, with transformers' own output silenced."""
        with quiet_transformers():
            if self.cfg.cluster.backend != "none":
                from lorif_ray.distributed.stages import run_stage

                return run_stage(stage, self.cfg)
            from lorif_ray.stages.attribute import run_local_stage

            if measurement is None:
                return run_local_stage(stage, self.cfg)
            from lorif_ray.stages.query import LocalScorer, QueryBackend, QueryFeaturizer, run_query

            claim_output_dir(self.cfg)
            return run_query(self.cfg, lambda cfg, manifest, stored: QueryBackend(
                QueryFeaturizer(cfg, manifest, measurement=measurement), LocalScorer(cfg, manifest, stored)))

    def _save_model(self, model, tokenizer) -> Path:
        """An in-memory model and its tokenizer saved to ``<output_dir>/model`` (what every stage loads)."""
        if tokenizer is None:
            raise ConfigError("a model object needs its tokenizer: Attributor(model, tokenizer, ...)")
        if not hasattr(model, "save_pretrained"):
            raise ConfigError(f"model: expected a folder path or a Hugging Face model, got {type(model).__name__}")
        path = Path(self.cfg.output_dir) / "model"
        with quiet_transformers():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        log.info("the in-memory model and tokenizer saved to %s (the stages load it from there)", path)
        return path

    def _data_path(self, data: Data, name: str) -> Path:
        """A path the stages can read: a path as it is, anything else written to a content-named Parquet file
        in ``<output_dir>/inputs``."""
        if isinstance(data, (str, Path)):
            return Path(data)
        table = _as_table(data)
        directory = Path(self.cfg.output_dir) / "inputs"
        directory.mkdir(parents=True, exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        payload = sink.getvalue()
        path = directory / f"{name}-{hashlib.sha256(payload).hexdigest()[:16]}.parquet"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(payload.to_pybytes())
            tmp.replace(path)
            log.info("%s: %d rows written to %s", name, table.num_rows, path)
        return path


def _check_measurement(measurement):
    if callable(measurement) or measurement in MEASUREMENTS:
        return measurement
    raise ConfigError(f"measurement={measurement!r}: choose one of {tuple(MEASUREMENTS)} or pass a function "
                      "(model outputs, batch) -> (B,)")


def _cluster_config(cluster) -> ClusterConfig:
    if isinstance(cluster, ClusterConfig):
        return cluster
    if cluster is None or cluster == "none":
        return ClusterConfig(backend="none")
    if cluster == "local":
        return ClusterConfig(backend="ray")
    if isinstance(cluster, str):
        return ClusterConfig(backend="ray", address=cluster)
    raise ConfigError(f"cluster={cluster!r}: None (one process), 'local', a Ray address, or a ClusterConfig")


def _as_table(data: Data) -> pa.Table:
    """In-memory data as an Arrow table: a pyarrow Table, a ``datasets.Dataset`` (its rows, in order), a list
    of dicts or a list of strings (the ``text`` column)."""
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # datasets.Dataset, without importing it
        return data.with_format("arrow")[:]
    if isinstance(data, Sequence) and data and all(isinstance(x, str) for x in data):
        return pa.table({"text": pa.array(list(data), pa.string())})
    if isinstance(data, Sequence) and data and all(isinstance(x, dict) for x in data):
        keys = list(dict.fromkeys(k for row in data for k in row))  # every row's keys, not only the first's
        try:
            return pa.table({k: [row.get(k) for row in data] for k in keys})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"rows of mixed types that do not make one table ({e})") from e
    raise DataError(f"expected a path, a datasets.Dataset, a pyarrow Table, or a non-empty list of dicts or of "
                    f"strings; got {type(data).__name__}")
