"""Query latency of the three stage-3 paths side by side, and what storing g'_t costs (CPU, Ray-free).

    python bench/query_paths_cpu.py --rows 50000

On a synthetic index with the embedded default's layout (LoRIF f=4 c=1; random factors: the cost does
not depend on the values) and its curvature (r=64, computed by the resident stage 2, which also
stores g'_t), the embedded queries are scored by: the streaming stage (Parquet batches, default),
the resident stage (``query.resident=true``) with the curvature term recomputed from g'_t = V_rᵀ g_t
(r·D per row) and from the query side (h_q = V_r(w ⊙ g'_q), nq·D per row: its default when nq < r),
and the resident stage with stored g'_t (``query.store_coordinates=true``). Query-gradient time is
excluded (the same for all).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from ray_cpu import synthetic_index

from lorif_ray.config import ClusterConfig, Config, QueryConfig
from lorif_ray.stages.fast_curvature import run_curvature_fast
from lorif_ray.stages.fast_query import run_query_fast
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from lorif_ray.store import open_index


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
    curvature = run_curvature_fast(cfg, store_coordinates=True)
    streamed = run_query(cfg)
    resident = run_query_fast(cfg, use_coordinates=False, query_side=False)
    query_side = run_query_fast(cfg, use_coordinates=False, query_side=True)
    stored = run_query_fast(cfg, use_coordinates=True)
    coords = curvature["coordinates"]
    payload = open_index(synthetic).payload_bytes_per_row()
    print(f"{streamed['queries']} queries x {args.rows} rows, LoRIF f=4 c=1 r=64, {args.threads} threads; "
          f"stage 2 (resident, storing g'_t) {curvature['seconds']:.1f} s\n")
    print("| stage-3 path | load s | score s | stored per example |")
    print("|---|---:|---:|---:|")
    print(f"| streaming Parquet (default) | (in score) | {streamed['score_seconds']:.2f} | {payload / 1024:.2f} KiB factors |")
    print(f"| resident, g'_t recomputed (r·D per row) | {resident['load_seconds']:.2f} | "
          f"{resident['score_seconds']:.2f} | {payload / 1024:.2f} KiB factors |")
    print(f"| resident, query side (nq·D per row; `query.resident` default when nq < r) | "
          f"{query_side['load_seconds']:.2f} | {query_side['score_seconds']:.2f} | {payload / 1024:.2f} KiB factors |")
    print(f"| resident + stored g'_t (`query.store_coordinates`) | {stored['load_seconds']:.2f} | "
          f"{stored['score_seconds']:.2f} | {payload / 1024:.2f} KiB + {coords['bytes_per_example'] / 1024:.2f} KiB g'_t |")


if __name__ == "__main__":
    main()
