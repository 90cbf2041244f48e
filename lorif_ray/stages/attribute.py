"""The three stages in one process, with a printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorif_ray.config import Config
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.stages.outputs import claim_output_dir
from lorif_ray.stages.query import run_query
from lorif_ray.stages.summary import describe_index, describe_proponents
from lorif_ray.store import write_json


STAGES = ("index", "curvature", "query")


def run_local_stage(name: str, cfg: Config) -> dict:
    """Stage ``name`` in this process (stage 2 holds each layer's rows resident when they fit, stage 3
    streams them unless ``query.resident``)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGES}")
    claim_output_dir(cfg)
    return {"index": run_index, "curvature": run_curvature, "query": run_query}[name](cfg)


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
