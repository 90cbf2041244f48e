"""Markdown quality report from a sweep's results: table, LDS-vs-storage Pareto plot (PNG), and the
top proponents of a few queries for LoRIF and LoGRA side by side.

    .venv/bin/python jobs/report.py            # bench/results/quality.md + bench/results/lds_pareto.png
    .venv/bin/python jobs/report.py eval=shakespeare eval.report_path=bench/results/quality_shakespeare.md \
        eval.plot_path=bench/results/lds_pareto_shakespeare.png
"""

import hydra

from lorif_ray.config import from_hydra
from lorif_ray.eval.config import register_sweep_configs
from lorif_ray.eval.report import write_report

register_sweep_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="sweep")
def main(cfg) -> None:
    ev = from_hydra(cfg).eval
    write_report(ev.results_dir, ev.report_path, ev.plot_path)
    print(f"wrote {ev.report_path} and {ev.plot_path}")


if __name__ == "__main__":
    main()
