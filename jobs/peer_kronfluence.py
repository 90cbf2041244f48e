"""Kronfluence (EK-FAC) as an external peer on an evaluation setup: fit its factors on the training set,
score queries × train, then LDS (same ground truth) and tail-patch; one row in the sweep's results table
(method kronfluence-<strategy>). Needs the packages of the `kronfluence` extra, installed as pyproject.toml says
(--no-deps, torch pinned).

    nice -n 10 .venv/bin/python jobs/peer_kronfluence.py                            # facts setup, EK-FAC
    nice -n 10 .venv/bin/python jobs/peer_kronfluence.py eval.kronfluence.damping=1e-8
    nice -n 10 .venv/bin/python jobs/peer_kronfluence.py eval.kronfluence.fisher=empirical
"""

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.eval.kronfluence_peer import run_kronfluence

    row = run_kronfluence(cfg)
    print(f"{row['method']} (damping {row['damping']}): LDS {row['lds']:.3f} ± {row['lds_se']:.3f}, "
          f"tail-patch {row['tail_patch']:.4f} ± {row['tail_patch_se']:.4f}, factors fit "
          f"{row['curvature_seconds']:.1f} s, scoring {row['query_seconds']:.1f} s; {row['note']}")


if __name__ == "__main__":
    run_job(main, config_name="sweep", doc=__doc__)
