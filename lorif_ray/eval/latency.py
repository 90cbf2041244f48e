"""Stage-3 latency of several curvatures side by side, on one synthetic index with a sweep point's layout.

The point's index (facts setup: ``lorif_ray.eval.sweep``) gives the layout and the K-FAC statistics; the
synthetic index repeats them over ``rows`` random rows (the cost does not depend on the values), stage 2
fits each curvature on it, and the setup's queries are scored by each in turn, alternating, ``repeats``
times, in one process with the threads pinned (``eval.threads``). Query gradients are the same for every
curvature (one featurizer) and are timed once.

    nice -n 10 .venv/bin/python bench/latency_cpu.py --rows 50000 method=lorif f=4 c=4 r=256 eval.threads=1
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from lorif_ray.eval.config import SweepConfig
from lorif_ray.eval.groundtruth import ensure_setup
from lorif_ray.eval.sweep import point_config
from lorif_ray.math.scoring import choose_route
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import FinishedShard
from lorif_ray.eval.index_cache import IndexCache
from lorif_ray.stages.inputs import resolve_inputs
from lorif_ray.stages.query import local_query, open_query
from lorif_ray.store.curvature_folder import ranks
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.store import IndexFolder


def synthetic_index(real: Path, out: Path, rows: int, shard_size: int = 4096) -> Path:
    """An index with ``real``'s layout, meta and K-FAC statistics (every shard's file holds ``real``'s total)
    and ``rows`` rows of random values."""
    source, index = IndexFolder(real), IndexFolder(out)
    manifest = source.manifest()
    stats = {layer: KroneckerStats.from_tensors(t) for layer, t in source.folded_statistics()[0].items()}
    writer = index.writer(kind=manifest.kind, columns=manifest.columns, dtype=manifest.dtype, shard_size=shard_size,
                          meta=manifest.meta)
    generator = torch.Generator().manual_seed(0)
    for shard, start in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - start)
        columns = {k: torch.randn(n, w, generator=generator) for k, w in manifest.columns.items()}
        writer.commit(FinishedShard(shard, [f"s{start + i}" for i in range(n)], columns, stats).write(writer))
    writer.finalize(rows)
    index.fold_statistics(lambda shard: True)
    return out


def bench(cfg: SweepConfig, rows: int, curvatures: list[str], repeats: int) -> list[dict]:
    """One row per curvature: stage-2 seconds, query-gradient seconds, and the scoring seconds of each repeat."""
    ev = cfg.eval
    torch.set_num_threads(ev.threads)
    point = point_config(cfg, ensure_setup(ev))
    real, _ = IndexCache(Path(ev.cache_root) / "index", budget_bytes=ev.cache_budget_mb * 2**20).ensure(point)
    out = Path(ev.cache_root) / "latency" / f"{real.name}-n{rows}"
    index = out / "index"
    if not IndexFolder(index).complete():
        synthetic_index(real, index, rows)
    runs = {}
    for kind in curvatures:
        run = replace(point, index_dir=str(index), output_dir=str(out / kind), curvature=kind,
                      query=replace(point.query, full_scores=False))
        fitted = run_curvature(run)
        run, manifest, folder, header, stored = open_query(run)
        backend = local_query(run, manifest, folder, stored)
        queries = backend.featurize(resolve_inputs(run).queries_path)
        route = choose_route(len(queries.row_ids), list(ranks(header).values()), stored=stored, train_self=False)
        runs[kind] = {"backend": backend, "queries": queries, "route": route, "fitted": fitted, "seconds": []}
    for _ in range(repeats):  # alternating, so that a change of load on the machine hits every curvature alike
        for kind, run in runs.items():
            start = time.perf_counter()
            run["backend"].score(run["queries"].columns, run["route"], 10)
            run["seconds"].append(time.perf_counter() - start)
    table = []
    for kind, run in runs.items():
        run["backend"].close()
        table.append({"curvature": kind, "route": run["route"], "rows": rows, "queries": len(run["queries"].row_ids),
                      "threads": ev.threads, "stage2_seconds": run["fitted"]["seconds"],
                      "query_gradient_seconds": run["queries"].seconds, "score_seconds": run["seconds"],
                      "score_median": statistics.median(run["seconds"])})
    return table


def markdown(cfg: SweepConfig, table: list[dict]) -> str:
    lines = [f"method={cfg.method.name} f={cfg.f} c={cfg.c} r={cfg.r}, {table[0]['rows']} rows, "
             f"{table[0]['queries']} queries, {table[0]['threads']} thread(s)", "",
             "| curvature | route | stage 2 s | query gradients s | scoring s (median) | scoring s (each) |",
             "|---|---|---:|---:|---:|---|"]
    for r in table:
        lines.append(f"| {r['curvature']} | {r['route']} | {r['stage2_seconds']:.2f} | {r['query_gradient_seconds']:.2f}"
                     f" | {r['score_median']:.3f} | {', '.join(f'{s:.3f}' for s in r['score_seconds'])} |")
    return "\n".join(lines)
