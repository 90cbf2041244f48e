"""All three stages: index → curvature → query. With no arguments it runs the embedded default
(a tiny GPT-2 the project trains once on its synthetic facts corpus, cached in ~/.cache/lorif-ray/embedded).

    python jobs/attribute.py                                   # the embedded demo
    python jobs/attribute.py model.path=/models/my-gpt2 data.train=train.jsonl data.queries=q.jsonl \
        method=lorif f=4 c=1 r=256 query.top_k=10 output_dir=out
    python jobs/attribute.py -m method=lorif,logra f=4,8        # a Hydra multirun sweep
    python jobs/attribute.py cluster=none                      # all stages in this process, no Ray
    ray job submit --working-dir . -- python jobs/attribute.py cluster=gpu_nodes model.path=... # a running cluster

By default (cluster=local) the stages run on Ray actors of a local instance this job starts.
"""

import hydra

from lorif_ray.config import from_hydra, register_configs
from lorif_ray.distributed.stages import run_stage
from lorif_ray.stages.attribute import run_attribute

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    run_attribute(from_hydra(cfg), run_stage)


if __name__ == "__main__":
    main()
