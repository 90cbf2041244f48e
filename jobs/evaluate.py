"""LDS ground truth of an evaluation setup: build the setup (corpus + attributed model), retrain on M
random α-subsets with every seed (cached), print the recipe, the CPU time and the noise ceiling; with
eval.scores=<scores.npy> also the LDS of those scores (any method; ids in the scores.json beside it).

    nice -n 10 .venv/bin/python jobs/evaluate.py                          # the small facts setup
    .venv/bin/python jobs/evaluate.py eval=shakespeare eval.num_subsets=8
    .venv/bin/python jobs/evaluate.py eval.scores=outputs/run/scores.npy
"""

import json
from pathlib import Path

from lorif_ray.cli import run_job


def main(cfg) -> None:
    import numpy as np
    import torch

    from lorif_ray.eval.groundtruth import ensure_setup, ground_truth
    from lorif_ray.eval.stats import MeanSE, lds_per_query
    from lorif_ray.eval.sweep import write_ground_truth_summary

    ev = cfg.eval
    torch.set_num_threads(ev.threads)
    setup = ensure_setup(ev)
    gt = ground_truth(ev, setup)
    summary = write_ground_truth_summary(ev, setup, gt)
    print(json.dumps(summary, indent=2))
    if ev.scores:
        path = Path(ev.scores)
        meta = json.loads(path.with_suffix(".json").read_text())
        scores = np.load(path).astype(np.float64)
        rows = {q: i for i, q in enumerate(meta["query_ids"])}
        cols = {t: i for i, t in enumerate(meta["train_ids"])}
        scores = scores[np.ix_([rows[q] for q in gt.query_ids], [cols[t] for t in gt.train_ids])]
        print(f"LDS of {path}: {MeanSE.of(lds_per_query(scores, gt.subsets, gt.mean_losses))}")


if __name__ == "__main__":
    run_job(main, config_name="sweep", doc=__doc__)
