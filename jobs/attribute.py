r"""All three stages: index → curvature → query. With no arguments it runs the embedded default
(a tiny GPT-2 the project trains once on its synthetic facts corpus, cached in ~/.cache/lorif-ray/embedded).

    python jobs/attribute.py                                   # the embedded demo
    python jobs/attribute.py model.path=/models/my-gpt2 data.train=train.jsonl data.queries=q.jsonl \
        method=lorif f=4 c=1 r=256 query.top_k=10 output_dir=out
    python jobs/attribute.py -m method=lorif,logra f=4,8        # a Hydra multirun sweep
    python jobs/attribute.py cluster=none                      # all stages in this process, no Ray
    ray job submit --working-dir . -- python jobs/attribute.py cluster=gpu_nodes model.path=... # a running cluster

By default (cluster=local) the stages run on Ray actors of a local instance this job starts. `--help` lists
every key; an error is one line (debug=true shows its traceback); the run's log is <output_dir>/attribute.log.
"""

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.distributed.backends import run_stage
    from lorif_ray.stages.attribute import run_attribute

    run_attribute(cfg, run_stage)


if __name__ == "__main__":
    run_job(main, stages=("index", "curvature", "query"), doc=__doc__)
