"""Stage-1 and query throughput on Ray with 1 vs 2 actors, side by side in one run (CPU).

    python bench/ray_cpu.py                      # prints a Markdown table
    python bench/ray_cpu.py --repeat 4 --rows 100000

Stage 1 indexes the embedded default's training set (``--repeat`` copies of it, fresh ids) with 1
and 2 gradient actors (fused), and 2 actors with the factorization pool (not fused); the one-process
stage is measured in the same run for reference. Each actor asks for 0.5 CPU (so 2 gradient actors
and the pool member fit on 2 CPUs); Ray runs it with 1 torch thread. The query stage scores the embedded queries against a synthetic index of ``--rows`` rows with
the real index's layout (random factors: the cost does not depend on the values) through a
QueryPool of 1 and 2 actors: once with loading, then with the shards resident.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from lorif_ray.config import ClusterConfig, Config, DataConfig, QueryConfig
from lorif_ray.distributed.cluster import actor_options
from lorif_ray.distributed.featurize import RayFeaturize
from lorif_ray.distributed.query_pool import QueryPool
from lorif_ray.eval.latency import synthetic_index
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import query_config, resolve_inputs
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.store import CurvatureFolder, IndexFolder


def repeated_training_set(source: Path, copies: int, out: Path) -> Path:
    """``copies`` copies of a jsonl training set with distinct ids."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    lines = [json.dumps({**row, "id": f"{row['id']}-{k}"}) for k in range(copies) for row in rows]
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_ray")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the training set to index")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic query index")
    args = parser.parse_args()
    import ray

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = Config(progress=False, shard_size=256, cluster=ClusterConfig(backend="none"))
    inputs = resolve_inputs(base)  # trains the embedded model on first use
    train = repeated_training_set(inputs.train_path, args.repeat, out / "train.jsonl")

    def config(name: str, **cluster) -> Config:
        return Config(data=DataConfig(train=str(train), queries=str(inputs.queries_path), max_length=64,
                                      batch_size=16),
                      output_dir=str(out / name), progress=False, shard_size=256,
                      cluster=ClusterConfig(**cluster))

    torch.set_num_threads(2)
    rows = []
    one = config("one_process", backend="none")
    report = run_index(one)
    rows.append(("stage 1", "one process, 2 threads", report["examples_per_second"], None))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    stage1 = {}
    for name, actors, fused in (("1 actor", 1, True), ("2 actors", 2, True), ("2 actors + pool", 2, False)):
        report = run_index(config(name.replace(" ", "_"), gradient_actors=actors, fused=fused, writer_actors=1),
                           RayFeaturize)
        stage1[name] = report["examples_per_second"]
        rows.append(("stage 1", f"{name} ({'fused' if fused else 'factorize in the pool'})",
                     report["examples_per_second"], stage1[name] / stage1["1 actor"]))

    synthetic = synthetic_index(one.index_path, out / "synthetic", args.rows, shard_size=4096)
    cfg = Config(output_dir=str(out / "synthetic_query"), index_dir=str(synthetic), progress=False,
                 query=QueryConfig(top_k=10, train_batch_rows=8192), cluster=ClusterConfig())
    run_curvature(cfg)
    cfg = query_config(cfg, IndexFolder(synthetic).manifest())
    query_columns = featurize_queries(one, IndexFolder(one.index_path).manifest()).columns
    latency = {}
    for actors in (1, 2):
        start = time.perf_counter()
        with QueryPool(cfg, CurvatureFolder(cfg.curvature_path), actors,
                          actor_options=actor_options(cfg.cluster, gpu=False)) as pool:
            pool.score(query_columns, "query", 10)
            first = time.perf_counter() - start
            start = time.perf_counter()
            pool.score(query_columns, "query", 10)
            latency[actors] = time.perf_counter() - start
        nq = next(iter(query_columns.values())).shape[0]
        rows.append(("query", f"{actors} actor(s), first batch (loads shards)", nq * args.rows / first, None))
        rows.append(("query", f"{actors} actor(s), shards resident", nq * args.rows / latency[actors],
                     latency[1] / latency[actors]))
    ray.shutdown()

    examples = sum(1 for _ in open(train))
    print(f"stage 1: {examples} examples (embedded default x {args.repeat}), LoRIF f=4 c=1, shards of 256; "
          f"query: {nq} queries x {args.rows} rows\n")
    print("| stage | setup | throughput | ratio to 1 actor |")
    print("|---|---|---:|---:|")
    for stage, setup, value, ratio in rows:
        unit = "examples/s" if stage == "stage 1" else "query-example pairs/s"
        print(f"| {stage} | {setup} | {value:,.0f} {unit} | {'' if ratio is None else f'{ratio:.2f}x'} |")


if __name__ == "__main__":
    main()
