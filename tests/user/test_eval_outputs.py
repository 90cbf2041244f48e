"""Evaluation writes its own files (issue 20, row 8): `python jobs/report.py eval=tiny` overwrote the
repository's own bench/results/quality.md and lds_pareto.png; the sweeps and the report now write into their
own folder (under eval.cache_root), and bench/results/ change only when a key names it."""

from __future__ import annotations

import hashlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorif_ray.eval.config import register_sweep_configs
from tests.user.conftest import ROOT, job_env, run

COMMITTED = [ROOT / "bench" / "results" / name for name in ("quality.md", "lds_pareto.png")]


def _digests() -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in COMMITTED}


def _sweep_config(*overrides):
    register_sweep_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("sweep", overrides=list(overrides)))


def test_every_preset_writes_under_its_cache_unless_a_key_names_bench_results(tmp_path):
    for preset in ("facts", "shakespeare", "tiny"):
        ev = _sweep_config(f"eval={preset}", f"eval.cache_root={tmp_path}").eval
        assert ev.results_dir == f"{tmp_path}/results/{preset}"
        assert (ev.report_path, ev.plot_path) == (f"{ev.results_dir}/quality.md", f"{ev.results_dir}/lds_pareto.png")
    named = _sweep_config("eval.results_dir=bench/results/sweep_facts").eval
    assert named.report_path == "bench/results/sweep_facts/quality.md"


def test_the_report_job_writes_beside_its_sweep_and_leaves_bench_results_alone(tmp_path):
    """One tiny sweep point (in this process), then `jobs/report.py eval=tiny` as a user runs it."""
    pytest.importorskip("matplotlib")
    from lorif_ray.eval.sweep import run_point

    before = _digests()
    cache = tmp_path / "eval-cache"
    run_point(_sweep_config("eval=tiny", f"eval.cache_root={cache}", "eval.threads=1", "method=graddot"))
    result = run("report", "eval=tiny", f"eval.cache_root={cache}", env=job_env(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    folder = cache / "results" / "tiny"
    assert result.stdout.strip().endswith(f"wrote {folder / 'quality.md'} and {folder / 'lds_pareto.png'}")
    assert "| graddot |" in (folder / "quality.md").read_text()
    assert (folder / "lds_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert _digests() == before
