"""On-the-fly scoring: the queries against the training set streamed through the model once, no index written;
writes the same query run as jobs/query.py (topk.parquet, opponents.parquet, queries.parquet, report.html).

    python jobs/score.py cluster=none model.path=/models/my-gpt2 data.train=train.jsonl data.queries=q.jsonl \
        method=graddot output_dir=out                        # identity: one pass
    python jobs/score.py cluster=none ... curvature=kfac     # a K-FAC statistics pass, then the scoring pass
    python jobs/score.py cluster=none ... method=lorif curvature_from=earlier_out   # a curvature fitted before
"""

import logging

from lorif_ray.cli import run_job

log = logging.getLogger(__name__)  # the console, and the run's log file in output_dir (lorif_ray.cli)


def main(cfg) -> None:
    from lorif_ray.outputs.summary import describe_results
    from lorif_ray.stages.score import run_score

    report = run_score(cfg)
    log.info("scored %d queries x %d training examples on the fly (%d passes, no index) in %.2fs -> %s",
             report["queries"], report["train"], report["passes"], report["score_seconds"], report["topk_path"])
    log.info("%s", describe_results(report))


if __name__ == "__main__":
    run_job(main, stages=("score",), doc=__doc__)
