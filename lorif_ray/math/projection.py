"""Seeded two-sided random projections, regenerable from ``(seed, layer name)``.

Layer weight W is O×I. The projected gradient of one example is
``G̃ = (X P_in)ᵀ (δY P_out)`` (d1×d2) with P_in (I×d1), P_out (O×d2), d1 = I/f, d2 = O/f.
Entries are N(0, 1/d): E[‖Pᵀx‖²] = ‖x‖².

Matrices are drawn on the CPU in float64 from a generator seeded by a hash of
``(seed, layer name, side)`` and only then cast and moved, so every process, device and dtype
sees the same matrix (tensor-parallel ranks slice rows out of it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from lorif_ray.errors import ConfigError


def derived_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from ``seed`` and a path of names (stable across Python runs)."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian(seed: int, shape: tuple[int, ...], *parts: str) -> torch.Tensor:
    """Standard normal float64 CPU tensor determined by ``(seed, *parts)``."""
    generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, *parts))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def projected_dims(in_features: int, out_features: int, f: int) -> tuple[int, int]:
    """(d1, d2) = (I/f, O/f), rounded down, at least 1."""
    if f < 1:
        raise ConfigError(f"projection factor f must be >= 1, got {f}")
    return max(1, in_features // f), max(1, out_features // f)


@dataclass(frozen=True)
class LayerProjection:
    """The two projections of one layer.

    Attributes:
        name: module name, e.g. ``transformer.h.0.attn.c_attn``.
        p_in: (I, d1) input-side projection.
        p_out: (O, d2) output-side projection.
    """

    name: str
    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def d1(self) -> int:
        return self.p_in.shape[1]

    @property
    def d2(self) -> int:
        return self.p_out.shape[1]


def layer_projection(
    seed: int,
    name: str,
    in_features: int,
    out_features: int,
    f: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LayerProjection:
    """Regenerate the projections of layer ``name`` (same arguments → same matrices)."""
    d1, d2 = projected_dims(in_features, out_features, f)
    p_in = gaussian(seed, (in_features, d1), name, "in") / math.sqrt(d1)
    p_out = gaussian(seed, (out_features, d2), name, "out") / math.sqrt(d2)
    return LayerProjection(name, p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype))
