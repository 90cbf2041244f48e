"""Quality sweep: one results row (method, f, c, r, LDS, tail-patch, storage/example, stage times, query
latency) per point, in <eval.results_dir>/results.{parquet,csv} (default <eval.cache_root>/results/<preset>; the
committed bench/results/ folders only when eval.results_dir names one). Artifacts are content-addressed under
eval.cache_root, so points that differ only in r share the stage-1 index, LoRIF points derive their
factors from the dense index of the same f (within eval.cache_budget_mb), and a re-run recomputes nothing.

    nice -n 10 .venv/bin/python jobs/sweep.py -m method=lorif f=4,8 c=1,4 r=16,64
    nice -n 10 .venv/bin/python jobs/sweep.py -m method=logra,graddot f=4,8,16
    nice -n 10 .venv/bin/python jobs/sweep.py method=repsim
"""

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.eval.sweep import run_point

    row = run_point(cfg)
    print(f"{row['method']} f={row['f']} c={row['c']} r={row['r']}: LDS {row['lds']:.3f} ± {row['lds_se']:.3f}, "
          f"tail-patch {row['tail_patch']:.4f} ± {row['tail_patch_se']:.4f}, "
          f"{row['bytes_per_example'] / 1024:.2f} KiB/example (index from {row['index_source']})")


if __name__ == "__main__":
    run_job(main, config_name="sweep", doc=__doc__)
