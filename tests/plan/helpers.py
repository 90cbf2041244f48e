"""Plans of the planner's job schema with conf/plan.yaml's defaults (the one place they are written)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lorif_ray.plan import SHORTHANDS, PlanJob

ROOT = Path(__file__).resolve().parents[2]


def plan_job(**keys) -> PlanJob:
    """A PlanJob as ``jobs/plan.py`` composes it (conf/plan.yaml over the schema) with ``keys`` set: dotted Config
    keys or the job's shorthands (``**{"query.normalize": True}``, ``batch_size=4``), values or config objects."""
    conf = OmegaConf.load(ROOT / "conf/plan.yaml")
    for key in ("defaults", "hydra"):
        conf.pop(key)
    cfg = OmegaConf.merge(OmegaConf.structured(PlanJob), conf)
    for key, value in keys.items():
        OmegaConf.update(cfg, SHORTHANDS.get(key, key), value, merge=False)
    return OmegaConf.to_object(cfg)
