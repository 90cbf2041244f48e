"""How often the known source of an embedded-facts query is in its top-5, per query measurement.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.api.facts_measurement   # trains the embedded model on first use

The default ``python jobs/attribute.py`` setup (LoRIF f=4 c=1 r=64) in one process; one index and curvature,
then the queries with each measurement. ``logprob`` is scored with its sign flipped (its gradient is minus
the loss's), so its scores equal ``loss``'s; ``mean_loss`` rescales each query's scores by a positive number,
so its ranking equals ``loss``'s too; a margin (a user function) changes what is measured.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from lorif_ray import Attributor
from lorif_ray.config import Config
from lorif_ray.embedded import ensure_embedded
from lorif_ray.outputs.summary import expected_sources, source_hits


def negative_margin(outputs, batch):
    """−Σ (logit of the target − the largest other logit) over target tokens: (B,), something to lower."""
    logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
    mask = labels != -100
    target = logits.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T-1)
    others = logits.scatter(2, labels.clamp(min=0).unsqueeze(2), float("-inf")).max(dim=2).values
    return -((target - others) * mask).sum(dim=1)


def main(output_dir: str | None = None) -> dict[str, tuple[int, int]]:
    assets = ensure_embedded(Config().embedded_cache_path, progress=False)
    out = Path(output_dir or tempfile.mkdtemp(prefix="facts-measurement-"))
    attributor = Attributor(None, output_dir=out, f=4, c=1, r=64)
    attributor.index()
    attributor.fit_curvature()
    sources = expected_sources(Path(assets.queries_path))
    hits = {}
    for measurement in ("loss", "logprob", "mean_loss", negative_margin):
        attributor.query(assets.queries_path, measurement=measurement, top_k=5)
        name = measurement if isinstance(measurement, str) else f"custom ({measurement.__name__})"
        hits[name] = (source_hits(out / "topk.parquet", sources, 1), source_hits(out / "topk.parquet", sources, 5))
        (h1, total), (h5, _) = hits[name]
        print(f"query.measurement={name}: known source first {h1}/{total}, in the top-5 {h5}/{total}", flush=True)
    return hits


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1] if len(sys.argv) > 1 else None)
