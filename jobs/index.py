"""Stage 1: per-example projected gradients → Parquet shards (resumable).

    python jobs/index.py model.path=/models/my-gpt2 data.train=train.jsonl f=4 c=1 output_dir=out
    python jobs/index.py cluster=none ...                 # in this process, without Ray
    ray job submit --working-dir . -- python jobs/index.py cluster=gpu_nodes ...   # on a running cluster
"""

import logging

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.stages import run_stage
from lorif_ray.stages.summary import describe_index

register_configs()
log = logging.getLogger(__name__)  # Hydra's job logging: console and <job>.log in output_dir


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    log.info("%s", describe_index(run_stage("index", from_hydra(cfg))))


if __name__ == "__main__":
    main()
