"""Stage-3 latency of every placement of the rows × every route of the curvature term, side by side,
and what storing g'_t costs (CPU, Ray-free).

    python bench/query_paths_cpu.py --rows 50000

On a synthetic index with the embedded default's layout (LoRIF f=4 c=1; random factors: the cost does
not depend on the values) and its curvature (r=64, stage 2 also storing g'_t), the embedded queries are
scored by the one scorer with the rows streamed from Parquet (default) or resident (``query.resident``),
on each route: g'_t recomputed (r·D per row), the query side (h_q = V_r(w ⊙ g'_q), nq·D per row: the
default when nq < r), or stored g'_t (``query.store_coordinates``). Query-gradient time is excluded.
Threads are pinned (``--threads``): under load torch's default count makes runs many times slower.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from ray_cpu import synthetic_index

import time

from lorif_ray.config import ClusterConfig, Config, QueryConfig
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import query_config
from lorif_ray.stages.query import LocalScorer
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.store import CurvatureFolder, IndexFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_query_paths")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    query = QueryConfig(top_k=10, train_batch_rows=8192)
    real = Config(output_dir=str(out / "real"), progress=False, query=query, cluster=ClusterConfig(backend="none"))
    run_index(real)
    synthetic = synthetic_index(real.index_path, out / "synthetic", args.rows, shard_size=4096)
    cfg = replace(real, output_dir=str(out / "run"), index_dir=str(synthetic))
    cfg = replace(cfg, query=replace(query, store_coordinates=True))
    curvature = run_curvature(cfg)
    manifest = IndexFolder(synthetic).manifest()
    cfg = query_config(cfg, manifest)
    columns = featurize_queries(cfg, manifest).columns
    payload, coords = manifest.payload_bytes_per_row(), curvature["coordinates"]["bytes_per_example"]
    print(f"{len(next(iter(columns.values())))} queries x {args.rows} rows, LoRIF f=4 c=1 r=64, {args.threads} "
          f"threads; stage 2 (storing g'_t) {curvature['seconds']:.1f} s; factors {payload / 1024:.2f} KiB/example, "
          f"stored g'_t +{coords / 1024:.2f} KiB/example\n")
    print("| rows | load s | recompute g'_t s | query side s | stored g'_t s |")
    print("|---|---:|---:|---:|---:|")
    for resident in (False, True):
        scorer = LocalScorer(replace(cfg, query=replace(cfg.query, resident=resident)), manifest,
                             CurvatureFolder(cfg.curvature_path), stored=True)
        seconds = []
        for route in ("recompute", "query", "stored"):
            start = time.perf_counter()
            scorer.score(columns, route, 10)
            seconds.append(time.perf_counter() - start)
        load = f"{scorer.info['load_seconds']:.2f}" if resident else "(in score)"
        print(f"| {'resident' if resident else 'streamed'} | {load} | " + " | ".join(f"{s:.2f}" for s in seconds) + " |")

if __name__ == "__main__":
    main()
