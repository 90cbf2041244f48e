r"""Markdown quality report from a sweep's results: table, LDS-vs-storage Pareto plot (PNG), and the
top proponents of a few queries for LoRIF and LoGRA side by side. It reads and writes the sweep's own folder
(eval.results_dir, by default under eval.cache_root); the committed bench/results/ change only when the keys
name them.

    .venv/bin/python jobs/report.py            # <eval.results_dir>/quality.md + lds_pareto.png
    .venv/bin/python jobs/report.py eval=tiny eval.cache_root=/tmp/eval    # a test setup, all under /tmp/eval
    .venv/bin/python jobs/report.py eval.results_dir=bench/results/sweep_facts \
        eval.report_path=bench/results/quality.md eval.plot_path=bench/results/lds_pareto.png   # the committed ones
"""

from lorif_ray.cli import run_job


def main(cfg) -> None:
    from lorif_ray.eval.report import write_report

    ev = cfg.eval
    write_report(ev.results_dir, ev.report_path, ev.plot_path)
    print(f"wrote {ev.report_path} and {ev.plot_path}")


if __name__ == "__main__":
    run_job(main, config_name="sweep", doc=__doc__)
