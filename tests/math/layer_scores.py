"""One layer through the batched scorer (``lorif_ray.math.scoring.StackedQuery``): what the tests compare with
the oracles (tests/oracles.py) for a curvature on its own."""

from __future__ import annotations

import torch

from lorif_ray.math.blocks import GradientBlock, RowLayout
from lorif_ray.math.scoring import StackedQuery
from lorif_ray.stages.featurize import LayerSpec


def layer_scores(curvature, query: GradientBlock, train: GradientBlock) -> torch.Tensor:
    """I(t, q) of one layer (nq, nt) by the batched scorer, on a factor store when both blocks are factors,
    else on a dense one (any factors turned dense)."""
    factored = query.factored and train.factored
    if factored:
        spec = LayerSpec("layer", 0, 0, query.u.shape[1], query.v.shape[1], query.u.shape[2])
    else:
        query, train = GradientBlock(g=query.dense()), GradientBlock(g=train.dense())
        spec = LayerSpec("layer", 0, 0, query.g.shape[1], 1, 0)
    layout = RowLayout.build([spec], "factors" if factored else "dense", {"layer": curvature})
    route = "recompute" if layout.coordinate_groups else "none"
    return StackedQuery(layout, {"layer": query}, {"layer": curvature}, route=route).scores(
        layout.train_block({"layer": train}))
