"""The checks of a run's inputs that need neither a model nor Ray, run before either starts.

The jobs (``lorif_ray.cli``), ``run_attribute`` and every stage call ``check_before_work`` first, so a wrong
model folder, a Hub id not in the local cache, a damaged config.json or safetensors header, a missing data
file or one without the expected columns, a missing index or curvature fails in one line within seconds,
instead of after Ray started and a model loaded. Each check reads headers or a first batch of rows only
(the queries, a small file, are read whole): nothing here grows with the training set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from lorif_ray.config import Config
from lorif_ray.data import iter_examples, load_examples
from lorif_ray.data.rows import dataset_split
from lorif_ray.errors import ConfigError, IndexNotFoundError
from lorif_ray.model.hub import resolve_model_path
from lorif_ray.model.loading import check_context_length, check_model_folder

log = logging.getLogger(__name__)

# what a job may run: the three stages, and "serve" (stage 3 without a query file: queries come by request)
# and "score" (on-the-fly: stage 3 over the training set streamed through the model, no index)
PREFLIGHT_STAGES = ("index", "curvature", "query", "serve", "score")
_FIRST_ROWS = 64  # rows of the training data read to check its columns (stage 1 checks every row, streamed)


def resolve_model(cfg: Config) -> Config:
    """``cfg`` with ``model.path`` a local folder (a Hub id resolved through the local Hugging Face cache);
    unchanged for the embedded default (``model.path`` null) and for a folder."""
    if cfg.model.path is None:
        return cfg
    folder = str(resolve_model_path(cfg.model.path))
    return cfg if folder == cfg.model.path else replace(cfg, model=replace(cfg.model, path=folder))


def check_before_work(cfg: Config, stages: Iterable[str]) -> Config:
    """Check everything ``stages`` will read before any of them starts; returns ``cfg`` with the model resolved
    (``resolve_model``), which every stage and actor then gets.

    Args:
        stages: some of ``PREFLIGHT_STAGES``; a stage that an earlier one of them writes (the index for
            curvature, the curvature for query) is not required to exist yet.

    Raises:
        ConfigError, DataError, CorruptModelError, IndexNotFoundError, IndexMismatchError: one line naming
            the key and value (or the file) at fault and what to do.
    """
    stages = tuple(stages)
    unknown = sorted(set(stages) - set(PREFLIGHT_STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages: {PREFLIGHT_STAGES}")
    cfg = resolve_model(cfg)
    user_model = cfg.model.path is not None
    if "score" in stages:  # what it refuses (Ray, a curvature that needs the rows) before any file is read
        from lorif_ray.stages.score import check_score

        check_score(cfg)
    if user_model and set(stages) & {"index", "query", "serve", "score"}:
        check_model_folder(cfg.model.path)
        check_context_length(cfg.model.path, cfg.data.max_length)
    if cfg.model.adapter is not None and set(stages) & {"index", "query", "serve", "score"}:
        from lorif_ray.model.adapters import read_adapter_config

        read_adapter_config(Path(cfg.model.adapter))
    if set(stages) & {"index", "score"}:
        _check_train(cfg, required=user_model)
    if set(stages) & {"query", "score"}:
        _check_queries(cfg, required=user_model)
    if "curvature" in stages and "index" not in stages:
        _open_index(cfg)
    if set(stages) & {"query", "serve"} and "curvature" not in stages:
        _check_curvature(cfg)
    return cfg


def _data_file(value: str | None, split: str | None, key: str, split_key: str, required: bool):
    """The file (or split folder) a ``data.*`` key names, or None when it is unset and not ``required``."""
    if value is None:
        if required:
            raise ConfigError(f"{key} is not set (a .jsonl, .parquet, .arrow file or a save_to_disk folder); "
                              "it is required with model.path")
        return None
    return dataset_split(value, split, split_key)


def _check_train(cfg: Config, required: bool) -> None:
    """``data.train`` exists, is of a known kind and its first rows have a schema's columns."""
    path = _data_file(cfg.data.train, cfg.data.split, "data.train", "data.split", required)
    if path is not None:
        next(iter_examples(path, batch_rows=_FIRST_ROWS, columns=cfg.data.columns), None)


def _check_queries(cfg: Config, required: bool) -> None:
    """``data.queries`` read whole (a small file): every row's schema and the ids."""
    path = _data_file(cfg.data.queries, cfg.data.query_split, "data.queries", "data.query_split", required)
    if path is not None:
        load_examples(path, cfg.data.columns)


def _open_index(cfg: Config):
    """The finished index of ``cfg`` (its manifest; every shard file's size checked)."""
    from lorif_ray.store import IndexFolder

    try:
        return IndexFolder(cfg.index_path).manifest()
    except IndexNotFoundError as error:
        key = f"index_dir={cfg.index_dir}" if cfg.index_dir else f"output_dir={cfg.output_dir}"
        raise IndexNotFoundError(f"{key}: {error}; build it first with jobs/index.py or jobs/attribute.py (the "
                                 "same keys)") from error


def _check_curvature(cfg: Config) -> None:
    """The index, and a curvature made with the settings this config asks for."""
    from lorif_ray.stages.inputs import query_config
    from lorif_ray.stages.curvature import check_curvature
    from lorif_ray.store import CurvatureFolder

    manifest = _open_index(cfg)
    folder = CurvatureFolder(cfg.curvature_path)
    if not folder.exists():
        raise ConfigError(f"output_dir={cfg.output_dir}: no curvature in {folder.path}; fit it first with "
                          "jobs/curvature.py or jobs/attribute.py (the same keys)")
    check_curvature(folder, query_config(cfg, manifest), manifest)
