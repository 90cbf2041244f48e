"""Stage 3: score queries against the index; writes topk.parquet (and scores.npy with query.full_scores=true).

    python jobs/query.py model.path=/models/my-gpt2 data.queries=queries.jsonl query.top_k=20 output_dir=out
"""

import logging

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.stages import run_stage
from lorif_ray.stages.summary import describe_results

register_configs()
log = logging.getLogger(__name__)  # Hydra's job logging: console and <job>.log in output_dir


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    report = run_stage("query", from_hydra(cfg))
    log.info("scored %d queries x %d training examples in %.2fs -> %s", report["queries"], report["train"],
             report["score_seconds"], report["topk_path"])
    log.info("%s", describe_results(report))


if __name__ == "__main__":
    main()
