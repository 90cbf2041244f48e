"""The Python API: index a model's training data, fit the curvature, and ask which training examples
most influenced a query, from a notebook or a script (the answers: ``lorif_ray.results.Results``). It
composes the same stage calls as the jobs (``run_index``, ``run_curvature``, ``run_query`` in this process;
``lorif_ray.distributed.backends.run_stage`` on Ray), so it writes the same files and gives the same scores.

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
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lorif_ray.config import ClusterConfig, Config, DataConfig, MethodConfig, ModelConfig, QueryConfig
from lorif_ray.data import load_examples
from lorif_ray.errors import ConfigError, DataError
from lorif_ray.math.capture import MEASUREMENTS
from lorif_ray.model.hub import resolve_model_path
from lorif_ray.results import Results
from lorif_ray.stages.index import quiet_transformers
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.outputs.folders import claim_output_dir

log = logging.getLogger(__name__)

Data = Any
"""A data path (``.jsonl``, ``.parquet``, ``.arrow``, a ``save_to_disk`` folder, of a Dataset or a DatasetDict), a
``datasets.Dataset``, a ``datasets.DatasetDict`` (or any mapping of split name → data: pick one with ``split=``),
a ``pyarrow.Table``, a list of dicts (``text``, ``prompt`` + ``response`` or ``messages``, or the columns named by
``columns=``), a list of strings, or any other iterable of such rows or strings (a ``datasets.IterableDataset``, a
generator: written once to Parquet in bounded memory, ``shard_size`` rows at a time)."""

COLUMN_ROLES = ("text", "prompt", "response", "messages", "id")


class Attributor:
    """Training-data attribution for one model, writing everything to ``output_dir``.

    Args:
        model: a local Hugging Face model folder, a Hub id in the local Hugging Face cache (resolved here, once,
            to its snapshot folder; nothing is downloaded), a model object already in memory (then ``tokenizer``
            is required: both are saved with ``save_pretrained`` to ``<output_dir>/model`` and loaded from there,
            since the stages and Ray actors load models from folders), or None for the embedded default.
        tokenizer: the tokenizer of an in-memory model (a folder holds its own).
        model_dtype: the model's compute dtype (``model.dtype``: float32, bfloat16, float16, float64); None =
            float32 for a folder, the object's own dtype for a model object (a bf16 model stays bf16; a
            model_dtype other than the object's, or an object of mixed or other dtypes, is refused by name).
        columns: the data's column names where they are not the defaults, e.g. ``{"text": "content", "id":
            "doc_id"}`` (roles: text, prompt, response, messages, id; the ``data.*_column`` keys).
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
        progress: show a progress bar (count, rate, ETA; a widget in a notebook) for every long step, the
            embedded model's one-time training included; False = silent.
        **config: any other top-level ``Config`` field (``shard_size``, ``index_dir``, ``precision``, ``overwrite``).

    Raises:
        ConfigError: an invalid setting, or a model object without a tokenizer.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, method: str = "lorif", f: int = 4, c: int = 1,
                 r: int = 64, damping: float | None = None, seed: int = 0, dtype: str = "float32",
                 output_dir: str | Path = "outputs/api", cluster: str | ClusterConfig | None = None,
                 max_length: int | None = None, batch_size: int | None = None, top_k: int = 10,
                 measurement: str | Callable = "loss", device: str = "auto", progress: bool = True,
                 model_dtype: str | None = None, columns: Mapping[str, str] | None = None, **config):
        self.measurement = _check_measurement(measurement)
        embedded = model is None  # the job's data defaults (conf/data/embedded.yaml) for the embedded model
        max_length = max_length or (64 if embedded else 128)
        batch_size = batch_size or (16 if embedded else 8)
        in_memory = not (model is None or isinstance(model, (str, Path)))
        if in_memory:
            _check_model_object(model, tokenizer)
        model_dtype = _model_dtype(model, model_dtype) if in_memory else (model_dtype or "float32")
        self.cfg = Config(model=ModelConfig(device=device, dtype=model_dtype),
                          data=DataConfig(max_length=max_length, batch_size=batch_size, **_column_keys(columns)),
                          method=MethodConfig(name=method), query=QueryConfig(top_k=top_k, full_scores=True),
                          cluster=_cluster_config(cluster), f=f, c=c, r=r, damping=damping, seed=seed, dtype=dtype,
                          output_dir=str(output_dir), progress=progress, **config)
        path = None if in_memory or model is None else str(resolve_model_path(model))  # before writing anything
        claim_output_dir(self.cfg)
        if in_memory:
            path = str(self._save_model(model, tokenizer))
        self.cfg = replace(self.cfg, model=replace(self.cfg.model, path=path))

    @property
    def config(self) -> Config:
        """The config of the next stage call (the same object the jobs build from the command line)."""
        return self.cfg

    def index(self, train: Data | None = None, *, split: str | None = None) -> dict:
        """Stage 1: store the projected gradient of every training example (resumes, or reuses a finished index).

        Args:
            train: the training data (see ``Data``); None = the embedded default's (with ``model=None``).
            split: the split of a DatasetDict (object or ``save_to_disk`` folder).

        Returns:
            The stage report (examples, bytes per example, seconds, ...).

        Raises:
            DataError: the data's schema, naming the offending row, before any model work; a DatasetDict
                without ``split`` (its splits named).
        """
        if train is not None:
            path, split = self._data_path(train, "train", split)
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, train=str(path), split=split))
        train_path = resolve_inputs(self.cfg).train_path
        if train_path is None:
            raise ConfigError("index(train): give the training data (a path, a datasets.Dataset or a list)")
        return self._run("index")  # stage 1 checks the data, in a stream, before it loads the model

    def fit_curvature(self) -> dict:
        """Stage 2: the curvature of the method (LoRIF: rank-r SVD of the stored gradients); returns its report."""
        return self._run("curvature")

    def query(self, queries: Data, *, measurement: str | Callable | None = None, top_k: int | None = None,
              self_influence: bool = False, per_layer: bool = False, per_token: bool = False,
              split: str | None = None) -> Results:
        """Stage 3: score every query against every indexed training example.

        Args:
            queries: the queries (see ``Data``); ``prompt`` + ``response`` rows attribute the response.
            split: the split of a DatasetDict (object or ``save_to_disk`` folder).
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
        path, split = self._data_path(queries, "queries", split)
        self.cfg = replace(self.cfg, query=query, data=replace(self.cfg.data, queries=str(path), query_split=split))
        inputs = resolve_inputs(self.cfg)
        if inputs.train_path is None:
            raise ConfigError("query: call index(train) first (a finished index is reused, not recomputed), so "
                              "the results can show the training texts")
        load_examples(inputs.queries_path, self.cfg.data.columns)
        self._run("query", measure if callable(measure) else None)
        return Results(self.cfg.output_dir)

    def score(self, queries: Data, train: Data | None = None, *, top_k: int | None = None,
              curvature_from: str | Path | None = None, split: str | None = None,
              query_split: str | None = None) -> Results:
        """Score the queries against the training set streamed through the model once, writing no index
        (``jobs/score.py``; one process): the same ``Results`` as ``index`` + ``fit_curvature`` + ``query``.

        Args:
            queries: the queries (see ``Data``).
            train: the training data; None = the one ``index`` was given, or the embedded default's.
            top_k: overrides the constructor's for this call.
            curvature_from: the ``output_dir`` of an earlier run whose curvature scores the rows (needed for a
                curvature fitted from the rows themselves: woodbury, exact, ekfac); None = identity or kfac.
            split, query_split: the splits of DatasetDicts.

        Raises:
            ConfigError: on Ray (one process only, for now), or a curvature that needs ``curvature_from``.
        """
        from lorif_ray.stages.score import run_score

        if train is not None:
            path, split = self._data_path(train, "train", split)
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, train=str(path), split=split))
        path, query_split = self._data_path(queries, "queries", query_split)
        query = replace(self.cfg.query, top_k=top_k or self.cfg.query.top_k, full_scores=True, self_influence=False,
                        per_layer=False, per_token=False)
        self.cfg = replace(self.cfg, query=query, curvature_from=None if curvature_from is None else str(curvature_from),
                           data=replace(self.cfg.data, queries=str(path), query_split=query_split))
        with quiet_transformers():
            run_score(self.cfg)
        return Results(self.cfg.output_dir)

    def _run(self, stage: str, measurement: Callable | None = None) -> dict:
        """One stage of ``self.cfg``, in this process or on Ray, with transformers' own output silenced."""
        with quiet_transformers():
            if self.cfg.cluster.backend != "none":
                from lorif_ray.distributed.backends import run_stage

                return run_stage(stage, self.cfg)
            from lorif_ray.stages.attribute import run_local_stage

            if measurement is None:
                return run_local_stage(stage, self.cfg)
            from lorif_ray.stages.query import LocalScorer, QueryBackend, run_query
            from lorif_ray.stages.queries import QueryFeaturizer

            claim_output_dir(self.cfg)
            return run_query(self.cfg, lambda cfg, manifest, folder, stored: QueryBackend(
                QueryFeaturizer(cfg, manifest, measurement=measurement), LocalScorer(cfg, manifest, folder, stored)))

    def _save_model(self, model, tokenizer) -> Path:
        """An in-memory model and its tokenizer saved to ``<output_dir>/model`` (what every stage loads)."""
        path = Path(self.cfg.output_dir) / "model"
        with quiet_transformers():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        log.info("the in-memory model and tokenizer saved to %s (the stages load it from there)", path)
        return path

    def _data_path(self, data: Data, name: str, split: str | None = None) -> tuple[Path, str | None]:
        """(a path the stages can read, the split of a DatasetDict folder there): a path as it is (with
        ``split``), one split of a DatasetDict object, anything else written to a content-named Parquet file in
        ``<output_dir>/inputs`` (an iterable of rows streamed there ``shard_size`` rows at a time)."""
        if isinstance(data, (str, os.PathLike)):
            return Path(data), split
        if isinstance(data, Mapping):  # a DatasetDict, or any mapping of split name → data
            data = _one_split(data, split, name)
        elif split is not None:
            raise ConfigError(f"{name}: split={split!r} picks a split of a DatasetDict; got a "
                              f"{type(data).__name__}")
        directory = Path(self.cfg.output_dir) / "inputs"
        directory.mkdir(parents=True, exist_ok=True)
        if _is_stream(data):
            return _write_stream(data, directory, name, self.cfg.shard_size), None
        table = _as_table(data)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        payload = sink.getvalue()
        path = directory / f"{name}-{hashlib.sha256(payload).hexdigest()[:16]}.parquet"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(payload.to_pybytes())
            tmp.replace(path)
            log.info("%s: %d rows written to %s", name, table.num_rows, path)
        return path, None


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


def _check_model_object(model, tokenizer) -> None:
    """A model object the stages can use: a Hugging Face model (``save_pretrained``) with its tokenizer.

    Raises:
        ConfigError: no tokenizer, or not a Hugging Face model.
    """
    if tokenizer is None:
        raise ConfigError("a model object needs its tokenizer: Attributor(model, tokenizer, ...)")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model: expected a folder path or a Hugging Face model, got {type(model).__name__}")


def _model_dtype(model, asked: str | None) -> str:
    """The compute dtype of a model object: its parameters' one dtype, which ``asked`` (if given) must equal.

    Raises:
        ConfigError: mixed or unsupported parameter dtypes, or ``asked`` differs from the object's dtype.
    """
    from lorif_ray.model.loading import DTYPES

    held = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}) if hasattr(
        model, "parameters") else []
    if len(held) != 1 or held[0] not in DTYPES:
        raise ConfigError(f"model: the object's parameters are of dtype(s) {', '.join(held) or 'none'}; the stages "
                          f"load one of {', '.join(DTYPES)}: convert it first, e.g. model.to(torch.bfloat16)")
    own = held[0]
    if asked is not None and asked != own:
        raise ConfigError(f"model_dtype={asked!r}: the model object holds {own} weights; pass model_dtype={own!r} "
                          f"(or None: the object's own), or convert the model first (model.to(torch.{asked}))")
    return own


def _column_keys(columns: Mapping[str, str] | None) -> dict:
    """``columns={"text": "content"}`` as ``DataConfig`` keys (``text_column="content"``).

    Raises:
        ConfigError: a role that is not one of ``COLUMN_ROLES``.
    """
    unknown = sorted(set(columns or {}) - set(COLUMN_ROLES))
    if unknown:
        raise ConfigError(f"columns: unknown role(s) {unknown}; the roles are {', '.join(COLUMN_ROLES)} (e.g. "
                          "columns={'text': 'content'})")
    return {f"{role}_column": str(column) for role, column in (columns or {}).items()}


def _one_split(data: Mapping, split: str | None, name: str) -> Data:
    """Split ``split`` of a DatasetDict (or a mapping of split name → data).

    Raises:
        DataError: no ``split`` given, or one the mapping lacks (its splits named).
    """
    splits = ", ".join(map(str, data))
    if split is None:
        raise DataError(f"{name}: a {type(data).__name__} with splits {splits}: choose one, e.g. "
                        f"{'index' if name == 'train' else 'query'}(..., split={next(iter(data), 'train')!r})")
    if split not in data:
        raise DataError(f"{name}: split={split!r} is not among the splits {splits}")
    return data[split]


def _is_stream(data: Data) -> bool:
    """An iterable of rows that is not held as a table (a ``datasets.IterableDataset``, a generator, ...)."""
    if isinstance(data, (pa.Table, Sequence, Mapping, bytes)) or _is_dataset(data):
        return False
    return isinstance(data, Iterable)


def _is_dataset(data: Data) -> bool:
    """A ``datasets.Dataset`` (rows held, random access; an ``IterableDataset`` has none), without importing
    datasets."""
    return hasattr(data, "with_format") and hasattr(data, "column_names") and hasattr(data, "__getitem__")


def _write_stream(rows: Iterable, directory: Path, name: str, batch_rows: int) -> Path:
    """An iterable of rows (dicts, or strings: the ``text`` column) written once to a Parquet file of
    ``batch_rows``-row groups (stage 1's shards read their own groups), holding one group at a time; named by
    its content.

    Raises:
        DataError: no rows, a row that is neither a dict nor a string, or rows that do not fit the first
            group's columns and types (the row is named).
    """
    import itertools

    tmp = directory / f".{name}-{os.getpid()}.parquet.tmp"
    writer, schema, count = None, None, 0
    iterator = iter(rows)
    try:
        while batch := list(itertools.islice(iterator, batch_rows)):
            records = [_stream_row(row, count + i, name) for i, row in enumerate(batch)]
            try:
                table = pa.Table.from_pylist(records, schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DataError(f"{name}: rows {count}-{count + len(batch) - 1} do not fit the columns and types "
                                f"of the first rows ({e})") from e
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table, row_group_size=batch_rows)
            count += len(batch)
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{name}: the iterable yielded no rows")
    digest = hashlib.sha256()
    with tmp.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    path = directory / f"{name}-{digest.hexdigest()[:16]}.parquet"
    tmp.replace(path)
    log.info("%s: %d streamed rows written to %s", name, count, path)
    return path


def _stream_row(row, index: int, name: str) -> dict:
    if isinstance(row, str):
        return {"text": row}
    if isinstance(row, Mapping):
        return dict(row)
    raise DataError(f"{name}: row {index} is a {type(row).__name__}; rows are dicts (or strings: the text)")


def _as_table(data: Data) -> pa.Table:
    """In-memory data as an Arrow table: a pyarrow Table, a ``datasets.Dataset`` (its rows, in order), a list
    of dicts or a list of strings (the ``text`` column)."""
    if isinstance(data, pa.Table):
        return data
    if _is_dataset(data):  # datasets.Dataset, without importing it
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
