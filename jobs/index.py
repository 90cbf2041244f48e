"""Stage 1: per-example projected gradients → Parquet shards (resumable).

    python jobs/index.py model.path=/models/my-gpt2 data.train=train.jsonl f=4 c=1 output_dir=out
    python jobs/index.py cluster=none ...                 # in this process, without Ray
    ray job submit --working-dir . -- python jobs/index.py cluster=gpu_nodes ...   # on a running cluster
"""

import logging

from lorif_ray.cli import run_job

log = logging.getLogger(__name__)  # the console, and the run's log file in output_dir (lorif_ray.cli)


def main(cfg) -> None:
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.outputs.summary import describe_index

    log.info("%s", describe_index(run_stage("index", cfg)))


if __name__ == "__main__":
    run_job(main, stages=("index",), doc=__doc__)
