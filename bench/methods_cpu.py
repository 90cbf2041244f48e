"""Stage-1 throughput, storage and query latency of every method on the embedded default (CPU, Ray-free).

    python bench/methods_cpu.py                 # prints a Markdown table
    python bench/methods_cpu.py --threads 2 --out outputs/bench

Each method runs the three stages in one process on the same model and data; stage-1 throughput is
compared with the model's plain forward+backward (summed loss, weight gradients) measured in the same run.
Quality proxy: how often each fact query's known source sentence is ranked first / in the top 5.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from lorif_ray.config import Config, DataConfig, MethodConfig, ModelConfig, QueryConfig
from lorif_ray.data import iter_batches
from lorif_ray.math.capture import per_example_token_loss
from lorif_ray.model.loading import load_model
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.inputs import resolve_inputs, tokenized
from lorif_ray.stages.query import run_query
from lorif_ray.outputs.summary import expected_sources, source_hits

POINTS = [  # (method, f, c, r)
    ("lorif", 4, 1, 64),
    ("lorif", 4, 4, 64),
    ("lorif", 8, 1, 32),
    ("logra", 4, None, None),
    ("logra", 8, None, None),
    ("graddot", 4, None, None),
    ("repsim", None, None, None),
]


def plain_forward_backward(cfg: Config) -> float:
    """Examples/s of the model's own forward+backward on the training set (the stage-1 ceiling)."""
    inputs = resolve_inputs(cfg)
    model, tokenizer = load_model(inputs.model_path, device=cfg.model.device)
    examples = tokenized(inputs.train_path, tokenizer, cfg.data.max_length)
    start = time.perf_counter()
    for ids, batch in iter_batches(examples, cfg.data.batch_size, tokenizer.pad_token_id):
        model.zero_grad(set_to_none=True)
        per_example_token_loss(model, batch, ids).sum().backward()
    return len(examples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base = dict(model=ModelConfig(device="cpu"), data=DataConfig(max_length=64, batch_size=16),
                query=QueryConfig(top_k=10), progress=False)
    ceiling = plain_forward_backward(Config(**base))
    print(f"plain forward+backward: {ceiling:.1f} examples/s ({args.threads} threads)\n")
    sources = expected_sources(resolve_inputs(Config(**base)).queries_path)
    print("| method | f | c | r | stage 1 ex/s | vs fwd+bwd | stored KiB/example | file overhead | stage 2 s "
          "| query s | source top-1 | source top-5 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, f, c, r in POINTS:
        cfg = Config(**base, method=MethodConfig(method), f=f or 4, c=c or 1, r=r or 64,
                     output_dir=str(out / f"{method}_f{f}_c{c}_r{r}"))
        index = run_index(cfg)
        curvature = run_curvature(cfg)
        start = time.perf_counter()
        query = run_query(cfg)
        latency = time.perf_counter() - start  # model load + query gradients + scoring all N
        rate = index["examples_per_second"]
        top1, top5 = (source_hits(Path(query["topk_path"]), sources, k)[0] for k in (1, 5))
        print(f"| {method} | {f or '-'} | {c or '-'} | {r or '-'} | {rate:.1f} | {rate / ceiling:.2f} | "
              f"{index['bytes_per_example'] / 1024:.2f} | {100 * index['overhead_fraction']:+.1f}% | "
              f"{curvature.get('seconds', 0):.2f} | {latency:.2f} | {top1}/{len(sources)} | {top5}/{len(sources)} |")


if __name__ == "__main__":
    main()
