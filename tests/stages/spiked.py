"""A synthetic index with a spiked spectrum (σ₁²/λ in the hundreds), written through the real store.

LoRIF's score is (1/λ) g_qᵀg_t − Σ w g'_q g'_t, two terms up to σ₁²/λ times larger than their difference:
rounding that is not shared by both terms is amplified by that ratio. I.i.d. random factors have a flat
spectrum and hide it; these rows share a few strong directions (rank-1 G̃ = u vᵀ with u, v mostly along
common vectors) over a weak floor, like real per-example gradients.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from lorif_ray.config import Config, DataConfig, MethodConfig, ModelConfig, QueryConfig
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.store import ShardWriter
from lorif_ray.store.schema import factor_columns

LAYERS = [LayerSpec("block.0.proj", 64, 48, 16, 12, 1), LayerSpec("block.1.proj", 64, 48, 16, 12, 1),
          LayerSpec("block.1.out", 40, 80, 10, 20, 1)]


def spiked_factors(n: int, spec: LayerSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (n, d1·c), v (n, d2·c)) in float64: mostly along 3 shared directions, decaying, plus a floor."""
    gen = torch.Generator().manual_seed(seed)
    basis_u = torch.linalg.qr(torch.randn(spec.d1, 3, generator=gen, dtype=torch.float64)).Q
    basis_v = torch.linalg.qr(torch.randn(spec.d2, 3, generator=gen, dtype=torch.float64)).Q
    weights = torch.tensor([20.0, 4.0, 1.5], dtype=torch.float64)
    a = torch.randn(n, 3, generator=gen, dtype=torch.float64) * weights
    b = torch.randn(n, 3, generator=gen, dtype=torch.float64) * weights.sqrt()
    u = a @ basis_u.T + 0.3 * torch.randn(n, spec.d1, generator=gen, dtype=torch.float64)
    v = b @ basis_v.T + 0.3 * torch.randn(n, spec.d2, generator=gen, dtype=torch.float64)
    return u, v


def spiked_columns(n: int, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, spec in enumerate(LAYERS):
        u_column, v_column = factor_columns(spec.name)
        out[u_column], out[v_column] = spiked_factors(n, spec, seed * 100 + i)
    return out


def spiked_config(root: Path, dtype: str = "float32", **overrides) -> Config:
    """A LoRIF config over the synthetic index in ``root/index`` (no model: queries come as columns)."""
    query = overrides.pop("query", QueryConfig(full_scores=True, top_k=10, train_batch_rows=97))
    return Config(model=ModelConfig(path=str(root / "no-model"), device="cpu"), data=DataConfig(max_length=32),
                  method=MethodConfig("lorif"), query=query, output_dir=str(root / "out"),
                  index_dir=str(root / "index"), dtype=dtype, r=16, oversample=10, damping_scale=0.02, progress=False,
                  **overrides)


def write_spiked_index(cfg: Config, n: int = 600, queries: int = 12, shard_size: int = 150, seed: int = 0
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write ``n`` spiked rows as an index in ``cfg.dtype``; returns the exact float64 training rows and
    ``queries`` more rows of the same distribution, as query columns."""
    both = spiked_columns(n + queries, seed)
    columns = {k: v[:n] for k, v in both.items()}
    meta = {"config": {"kind": "factors", "f": cfg.f, "c": cfg.c, "seed": cfg.seed, "factor_iters": 8,
                       "max_length": cfg.data.max_length, "layers": None, "model_dtype": cfg.model.dtype},
            "model": {"synthetic": "spiked", "seed": seed}, "layers": [asdict(s) for s in LAYERS],
            "data": {"sha256": "synthetic", "num_examples": n}}
    writer = ShardWriter(cfg.index_path, kind="factors", columns={k: v.shape[1] for k, v in columns.items()},
                         dtype=cfg.dtype, shard_size=shard_size, meta=meta)
    for shard, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        writer.write_shard(shard, [f"t{i}" for i in range(start, stop)],
                           {k: v[start:stop].float() for k, v in columns.items()})
    writer.finalize(n)
    return columns, {k: v[n:] for k, v in both.items()}


def with_output(cfg: Config, name: str, **query) -> Config:
    """The same index, another output dir (and query settings)."""
    return replace(cfg, output_dir=str(Path(cfg.output_dir).parent / name), query=replace(cfg.query, **query))
