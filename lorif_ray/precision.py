"""The precision policy of a run (``Config.precision`` + the storage ``dtype``), resolved for a device.

Requested values (strings, "auto" kept as "auto") are what artifacts record and what a query is matched
against, so a curvature fitted on a CPU (float64) serves GPU query actors (float32) under the same
policy; the resolved torch dtypes are what the arithmetic uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lorif_ray.config import Config
from lorif_ray.math.curvature import Curvature

log = logging.getLogger(__name__)

_TORCH = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def math_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Curvature and scoring precision: ``requested``, or for "auto" float64 on CPU (Woodbury subtracts
    nearly equal terms) and float32 on accelerators."""
    if requested != "auto":
        return _TORCH[requested]
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@dataclass(frozen=True)
class Precision:
    """The policy resolved for one device.

    Attributes:
        storage: dtype name of the index rows.
        coordinates: dtype name of stored g'_t.
        math: torch dtype of the curvature fit and of scoring.
        matmul: torch dtype of the large products' inputs.
    """

    storage: str
    coordinates: str
    math: torch.dtype
    matmul: torch.dtype

    @classmethod
    def of(cls, cfg: Config, device) -> "Precision":
        math = math_dtype(device, cfg.precision.math)
        matmul = math if cfg.precision.matmul == "auto" else _TORCH[cfg.precision.matmul]
        return cls(cfg.dtype, cfg.precision.coordinates, math, matmul)

    def describe(self) -> dict:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return {"storage": self.storage, "coordinates": self.coordinates, "math": name(self.math),
                "matmul": name(self.matmul)}


def warn_if_unsafe(cfg: Config) -> None:
    """Log a warning, for a curvature whose score is a difference of large terms (``Curvature.precision_sensitive``:
    LoRIF's Woodbury), for a policy measured to lose its ranking: 16-bit inputs to the large products
    (relative score error 0.4-0.6, Spearman 0.86-0.91 on a spiked spectrum, σ₁²/λ ≈ 900), or 16-bit g'_t."""
    if not Curvature.of(cfg.curvature_kind).precision_sensitive:
        return
    if cfg.precision.matmul in ("bfloat16", "float16"):
        log.warning("precision.matmul=%s with LoRIF: its score is a difference of terms up to σ₁²/λ times larger, "
                    "and 16-bit products lost the ranking in tests (Spearman 0.86-0.91 at σ₁²/λ ≈ 900); "
                    "auto (float32 on a GPU) is the safe choice", cfg.precision.matmul)
    if cfg.query.store_coordinates and cfg.precision.coordinates != "float32":
        log.warning("precision.coordinates=%s: g'_t rounded apart from the factors gave relative score errors of "
                    "2e-2 (float16) to 0.16 (bfloat16) at σ₁²/λ ≈ 900; float32 gave 2.5e-6", cfg.precision.coordinates)
