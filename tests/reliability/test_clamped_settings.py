"""Case 10 of issue 21: ``r=1e8`` ran with r silently clamped to each layer's size. A setting clamped is now a
setting said: one warning with the value used per layer, and the value recorded in the artifact it shapes (r in
the curvature header, c in the manifest's layer list)."""

from __future__ import annotations

import logging

from lorif_ray.stages.curvature import run_curvature
from lorif_ray.stages.index import run_index
from lorif_ray.stages.query import run_query
from lorif_ray.store import CurvatureFolder, Manifest
from lorif_ray.store.curvature_folder import ranks
from tests.reliability.conftest import config

HUGE = 10**8


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_r_beyond_a_layer_is_logged_once_and_recorded(run_copy, tiny_assets, caplog):
    cfg = config(tiny_assets, run_copy.output_dir, r=HUGE)
    with caplog.at_level(logging.WARNING, logger="lorif_ray"):
        report = run_curvature(cfg)
    said = _warnings(caplog, f"r={HUGE}")
    assert len(said) == 1 and "8 of 8 layers" in said[0] and "transformer.h.0.attn.c_proj (r=64)" in said[0], said
    header = CurvatureFolder(cfg.curvature_path).header()
    dims = {layer["name"]: layer["d1"] * layer["d2"] for layer in Manifest.load(cfg.index_path).meta["layers"]}
    assert header["clamped"] == {"r": {"asked": HUGE, "used": dims}} == report["clamped"]
    assert ranks(header) == dims  # the rank each layer's curvature holds
    assert run_query(cfg)["queries"] == 6


def test_c_beyond_a_layer_is_logged_once_and_recorded(finished_run, tiny_assets, tmp_path, caplog):
    cfg = config(tiny_assets, tmp_path / "out", c=HUGE, f=16)  # d1, d2 of 2 to 16: a cheap full-rank factorization
    with caplog.at_level(logging.WARNING, logger="lorif_ray"):
        run_index(cfg)
    said = _warnings(caplog, f"c={HUGE}")
    assert len(said) == 1 and "8 of 8 layers" in said[0], said
    layers = Manifest.load(cfg.index_path).meta["layers"]
    assert all(layer["c"] == min(layer["d1"], layer["d2"]) for layer in layers)
    assert f"(c={layers[0]['c']})" in said[0]
