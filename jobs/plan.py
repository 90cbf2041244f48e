"""Capacity planner: index size, curvature size, GPU memory per rank and stage times of a run, from the
model's shape alone (no weights, no Ray, no GPU). Prints Markdown tables and one line per figure,
each saying whether it is exact or an estimate and from what.

    python jobs/plan.py                                         # the embedded default
    python jobs/plan.py model=llama_70b f=4 c=1 r=4096 num_examples=1000000 gpu_memory_gib=80
    python jobs/plan.py model=olmo3_7b method=logra f=128 dtype=float16 num_gpus=16
    python jobs/plan.py model=apertus_70b f=64 tp_size=4 batch_size=4 max_length=2048

The keys are the run's own (conf/config.yaml) and the plan's workload; batch_size, max_length and tp_size are
short for data.batch_size, data.max_length and cluster.tp_size (1, the default, tries every TP size).
"""

import sys

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.plan import make_plan
    from lorif_ray.plan_report import format_plan

    print(format_plan(make_plan(cfg)))


if __name__ == "__main__":
    from lorif_ray.plan import expand_shorthands

    run_job(main, config_name="plan", doc=__doc__, argv=expand_shorthands(sys.argv[1:]))
