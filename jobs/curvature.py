"""Stage 2: per-layer curvature (LoRIF: rank-r randomized SVD; LoGRA: exact inverse) from the index.

    python jobs/curvature.py model.path=/models/my-gpt2 r=256 output_dir=out
"""

import logging

from lorif_ray.cli import run_job

log = logging.getLogger(__name__)  # the console, and the run's log file in output_dir (lorif_ray.cli)


def main(cfg) -> None:
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.outputs.summary import describe_curvature

    log.info("%s", describe_curvature(run_stage("curvature", cfg)))


if __name__ == "__main__":
    run_job(main, stages=("curvature",), doc=__doc__)
