"""Stage 3: score queries against the index; writes topk.parquet (and scores.npy with query.full_scores=true).

    python jobs/query.py model.path=/models/my-gpt2 data.queries=queries.jsonl query.top_k=20 output_dir=out
"""

import logging

from lorif_ray.cli import run_job

log = logging.getLogger(__name__)  # the console, and the run's log file in output_dir (lorif_ray.cli)


def main(cfg) -> None:
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.outputs.summary import describe_results

    report = run_stage("query", cfg)
    log.info("scored %d queries x %d training examples in %.2fs -> %s", report["queries"], report["train"],
             report["score_seconds"], report["topk_path"])
    log.info("%s", describe_results(report))


if __name__ == "__main__":
    run_job(main, stages=("query",), doc=__doc__)
