"""The three stages in one process, with a printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorif_ray.config import Config
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.fast_curvature import fits_resident, run_curvature_fast
from lorif_ray.stages.fast_query import run_query_fast
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.stages.query import run_query
from lorif_ray.stages.summary import describe_index, describe_proponents
from lorif_ray.store import write_json


STAGES = ("index", "curvature", "query")


def run_local_stage(name: str, cfg: Config) -> dict:
    """Stage ``name`` in this process: stage 2 with each layer's rows resident when they fit (or when
    ``query.store_coordinates`` asks for g'_t), stage 3 streaming unless ``query.resident``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
    if name == "index":
        return run_index(cfg)
    if name == "curvature":  # each layer's rows held on the device when they fit, else streamed once per pass
        if cfg.query.store_coordinates or fits_resident(cfg):
            return run_curvature_fast(cfg, store_coordinates=cfg.query.store_coordinates)
        return run_curvature(cfg)
    return run_query_fast(cfg) if cfg.query.resident else run_query(cfg)


def run_attribute(cfg: Config, run_stage: Callable[[str, Config], dict] = run_local_stage) -> dict:
    """index → curvature → query; prints what each stage did and the top proponents of a few queries.

    Args:
        run_stage: runs one stage by name (``lorif_ray.distributed.stages.run_stage`` puts them on Ray);
            by default in this process.
    """
    index = run_stage("index", cfg)
    print(describe_index(index))
    curvature = run_stage("curvature", cfg)
    print("curvature: " + ("reused" if curvature["reused"] else f"{curvature['seconds']:.1f}s") + f" -> {curvature['path']}")
    query = run_stage("query", cfg)
    print(f"query: {query['queries']} queries x {query['train']} training examples scored in "
          f"{query['score_seconds']:.2f}s (+{query['query_gradient_seconds']:.2f}s query gradients) -> {query['topk_path']}")
    inputs = resolve_inputs(cfg)
    print(describe_proponents(Path(query["topk_path"]), inputs.train_path, inputs.queries_path))
    report = {"index": index, "curvature": curvature, "query": query}
    write_json(Path(cfg.output_dir) / "report.json", report)
    return report
