"""Stage 2: per-layer curvature (LoRIF: rank-r randomized SVD; LoGRA: exact inverse) from the index.

    python jobs/curvature.py model.path=/models/my-gpt2 r=256 output_dir=out
"""

import logging

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.stages import run_stage
from lorif_ray.stages.summary import describe_curvature

register_configs()
log = logging.getLogger(__name__)  # Hydra's job logging: console and <job>.log in output_dir


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    log.info("%s", describe_curvature(run_stage("curvature", from_hydra(cfg))))


if __name__ == "__main__":
    main()
