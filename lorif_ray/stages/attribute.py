"""The three stages in one process, with a logged summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.outputs.folders import claim_output_dir
from lorif_ray.stages.preflight import check_before_work
from lorif_ray.stages.query import run_query
from lorif_ray.outputs.summary import describe_curvature, describe_index, describe_proponents, describe_results
from lorif_ray.store import write_json

log = logging.getLogger(__name__)

STAGES = ("index", "curvature", "query")


def run_local_stage(name: str, cfg: Config) -> dict:
    """Stage ``name`` in this process (stage 2 holds each layer's rows resident when they fit, stage 3
    streams them unless ``query.resident``), after ``check_before_work``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
    cfg = check_before_work(cfg, (name,))
    claim_output_dir(cfg)
    return {"index": run_index, "curvature": run_curvature, "query": run_query}[name](cfg)


def check_data(cfg: Config) -> Config:
    """Every check of the three stages' inputs before stage 1 (``check_before_work``: the model folder, the
    training data's first rows, the whole query file), so a bad query file fails before any model work
    instead of after indexing and curvature; returns ``cfg`` with the model resolved.

    Raises:
        DataError: naming the file and the offending row.
        ConfigError: ``query.measurement`` names a function (only the Python API can pass one), or as
            ``check_before_work``.
    """
    if cfg.query.measurement.startswith("custom:"):
        raise ConfigError(f"query.measurement={cfg.query.measurement}: a function is passed through the Python API "
                          "(lorif_ray.Attributor.query); choose one of loss, logprob, mean_loss")
    return check_before_work(cfg, STAGES)


def run_attribute(cfg: Config, run_stage: Callable[[str, Config], dict] = run_local_stage) -> dict:
    """index → curvature → query; logs what each stage did and the top proponents of a few queries
    (logger ``lorif_ray.stages.attribute``, level INFO).

    Args:
        run_stage: runs one stage by name (``lorif_ray.distributed.backends.run_stage`` puts them on Ray);
            by default in this process.
    """
    cfg = check_data(cfg)
    index = run_stage("index", cfg)
    log.info("%s", describe_index(index))
    curvature = run_stage("curvature", cfg)
    log.info("%s", describe_curvature(curvature))
    query = run_stage("query", cfg)
    log.info("query: %d queries x %d training examples scored in %.2fs (+%.2fs query gradients) -> %s",
             query["queries"], query["train"], query["score_seconds"], query["query_gradient_seconds"],
             query["topk_path"])
    inputs = resolve_inputs(cfg)
    log.info("%s", describe_proponents(Path(query["topk_path"]), inputs.queries_path, columns=cfg.data.columns))
    log.info("%s", describe_results(query))
    report = {"index": index, "curvature": curvature, "query": query}
    write_json(Path(cfg.output_dir) / "report.json", report)
    return report
