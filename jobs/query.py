"""Stage 3: score queries against the index; writes topk.parquet (and scores.npy with query.full_scores=true).

    python jobs/query.py model.path=/models/my-gpt2 data.queries=queries.jsonl query.top_k=20 output_dir=out
"""

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.stages import run_stage

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    report = run_stage("query", from_hydra(cfg))
    print(f"scored {report['queries']} queries x {report['train']} training examples in "
          f"{report['score_seconds']:.2f}s -> {report['topk_path']}")


if __name__ == "__main__":
    main()
