"""Resolving what a stage works on: the model and data paths (embedded default when unset), tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorif_ray.config import Config
from lorif_ray.data import load_examples, tokenize_examples
from lorif_ray.errors import ConfigError


@dataclass(frozen=True)
class Inputs:
    model_path: Path
    train_path: Path | None
    queries_path: Path | None


def resolve_inputs(cfg: Config) -> Inputs:
    """Paths from the config; with ``model.path`` unset, the embedded default (trained and cached on first use)."""
    if cfg.model.path is None:
        from lorif_ray.embedded import ensure_embedded

        assets = ensure_embedded(Path(cfg.embedded_cache), progress=cfg.progress)
        return Inputs(Path(assets.model_dir), Path(cfg.data.train or assets.train_path),
                      Path(cfg.data.queries or assets.queries_path))
    return Inputs(Path(cfg.model.path), _opt(cfg.data.train), _opt(cfg.data.queries))


def _opt(path: str | None) -> Path | None:
    return Path(path) if path else None


def require(path: Path | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"{key} is not set (a .jsonl or .parquet file); it is required with model.path")
    return path


def tokenized(path: Path, tokenizer, max_length: int):
    """Load and tokenize a data file (errors name the file and the offending ids)."""
    return tokenize_examples(load_examples(path), tokenizer, max_length)


def math_dtype(device: torch.device) -> torch.dtype:
    """Precision of curvature and scoring: float64 on CPU (Woodbury subtracts nearly equal terms),
    float32 on accelerators."""
    return torch.float64 if device.type == "cpu" else torch.float32
