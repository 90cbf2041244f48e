"""Stage 2: per-layer curvature (LoRIF: rank-r randomized SVD; LoGRA: exact inverse) from the index.

    python jobs/curvature.py model.path=/models/my-gpt2 r=256 output_dir=out
"""

import logging

from lorif_ray.cli import run_job

log = logging.getLogger(__name__)  # the console, and the run's log file in output_dir (lorif_ray.cli)


def main(cfg) -> None:
    from lorif_ray.distributed.stages import run_stage

    report = run_stage("curvature", cfg)
    log.info("curvature: %s%s", report["path"], " (reused)" if report["reused"] else f" in {report['seconds']:.1f}s")


if __name__ == "__main__":
    run_job(main, stages=("curvature",), doc=__doc__)
