"""Stage 1: per-example projected gradients → Parquet shards (resumable).

    python jobs/index.py model.path=/models/my-gpt2 data.train=train.jsonl f=4 c=1 output_dir=out
"""

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.stages.index import run_index
from lorif_ray.stages.summary import describe_index

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    print(describe_index(run_index(from_hydra(cfg))))


if __name__ == "__main__":
    main()
