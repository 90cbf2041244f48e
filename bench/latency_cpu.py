"""Query latency of each curvature on one synthetic index, side by side in one run (CPU); prints a Markdown table.

    python bench/latency_cpu.py --rows 10000 --repeats 5 method=lorif f=4 c=4 r=256 eval.threads=1

See ``lorif_ray.eval.latency`` for what is timed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorif_ray.eval.latency import __doc__ as DOC, bench, markdown


def main() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lorif_ray.eval.config import register_sweep_configs

    parser = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--curvatures", default="woodbury,ekfac,kfac")
    parser.add_argument("overrides", nargs="*", help="sweep config overrides (method=lorif f=4 c=4 ...)")
    args = parser.parse_args()
    register_sweep_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("sweep", overrides=args.overrides))
    print(markdown(cfg, bench(cfg, args.rows, args.curvatures.split(","), args.repeats)))


if __name__ == "__main__":
    main()
