"""The Python API on Ray (a running instance, as in a notebook) gives the one-process scores."""

import numpy as np

from lorif_ray import Attributor


def test_api_on_ray_equals_one_process(tiny_assets, tmp_path, ray_cluster):
    results = {}
    for cluster in (None, "local"):
        attributor = Attributor(str(tiny_assets["model"]), output_dir=tmp_path / str(cluster), r=8, max_length=32,
                                device="cpu", top_k=3, cluster=cluster, measurement="mean_loss")
        attributor.index(tiny_assets["train"])
        attributor.fit_curvature()
        results[cluster] = attributor.query(tiny_assets["queries"])
    one, ray = (np.asarray(results[c].scores) for c in (None, "local"))
    assert one.shape == (6, 48) and np.abs(ray - one).max() <= 1e-5 * np.abs(one).max()
    assert results["local"].measurement == "mean_loss"
    assert results["local"].topk.column("train_text").to_pylist() == results[None].topk.column("train_text").to_pylist()
