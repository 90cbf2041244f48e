"""The README's condensed capacity and memory tables are the planner's own output for the README's plan commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorif_ray.plan import expand_shorthands, make_plan, register_plan_config
from lorif_ray.plan_report import MEMORY_HEADER, SUMMARY_HEADER, memory_row, summary_row

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"olmo3_7b": "OLMo-3-7B", "llama_70b": "Llama-70B", "apertus_70b": "Apertus-70B"}


def _plan_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [shlex.split(line)[2:] for line in text.splitlines() if line.startswith(".venv/bin/python jobs/plan.py")]


def label_of(overrides: list[str]) -> str:
    """"Apertus-70B, f=64, B=4, N=3.8M" from a command's overrides."""
    keys = dict(o.split("=", 1) for o in overrides)
    return (f"{LABELS[keys['model']]}, f={keys['f']}, B={keys.get('batch_size', 16)}, "
            f"N={int(keys['num_examples']) / 1e6:g}M")


def test_the_readme_plan_tables_are_generated_by_the_planner():
    register_plan_config()
    readme = (ROOT / "README.md").read_text()
    assert SUMMARY_HEADER in readme and MEMORY_HEADER in readme
    commands = _plan_commands()
    assert len(commands) == 3
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for overrides in commands:
            plan = make_plan(OmegaConf.to_object(compose(config_name="plan", overrides=expand_shorthands(overrides))))
            label = label_of(overrides)
            for row in (summary_row(plan, label), memory_row(plan, label)):
                assert row in readme, f"README row for {label} differs from the planner:\n{row}"
    assert not re.search(r"measured H100", readme)  # no GPU figure is in BENCHMARKS.md yet
