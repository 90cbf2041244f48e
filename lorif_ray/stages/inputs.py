"""Resolving what a stage works on: the model and data paths (embedded default when unset), tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lorif_ray.config import Config
from lorif_ray.data import (Columns, InputShards, InputShard, TokenizedExample, load_examples, read_shard,
                            tokenize_examples)
from lorif_ray.data.examples import DEFAULT_COLUMNS
from lorif_ray.data.rows import dataset_split
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.factorize import default_iterations
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.store import IndexSettings, Manifest


@dataclass(frozen=True)
class Inputs:
    model_path: Path
    train_path: Path | None
    queries_path: Path | None


def resolve_inputs(cfg: Config) -> Inputs:
    """Paths from the config; with ``model.path`` unset, the embedded default (trained and cached on first use).
    A DatasetDict folder gives the folder of its split ``data.split`` (training) or ``data.query_split``."""
    if cfg.model.path is None:
        from lorif_ray.embedded import ensure_embedded

        assets = ensure_embedded(cfg.embedded_cache_path, progress=cfg.progress)
        train, queries = cfg.data.train or assets.train_path, cfg.data.queries or assets.queries_path
        model = Path(assets.model_dir)
    else:
        train, queries, model = cfg.data.train, cfg.data.queries, Path(cfg.model.path)
    return Inputs(model, _split(train, cfg.data.split, "data.split"),
                  _split(queries, cfg.data.query_split, "data.query_split"))


def _split(path: str | Path | None, split: str | None, key: str) -> Path | None:
    return dataset_split(path, split, key) if path else None


def require(path: Path | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"{key} is not set (a .jsonl or .parquet file); it is required with model.path")
    return path


def tokenized(path: Path, tokenizer, max_length: int, columns: Columns = DEFAULT_COLUMNS):
    """Load and tokenize a whole data file, e.g. queries (errors name the file and the offending ids)."""
    return tokenize_examples(load_examples(path, columns), tokenizer, max_length)


def tokenized_shard(shard: InputShard, tokenizer, max_length: int) -> list[TokenizedExample]:
    """Read and tokenize one shard of the training input (errors name the shard's offending ids)."""
    return tokenize_examples(read_shard(shard), tokenizer, max_length)


class TokenizedShards(Mapping):
    """{shard index: its tokenized examples} for some shards of a plan, each read and tokenized when
    looked up (iterating ``items()`` holds one shard at a time)."""

    def __init__(self, plan: InputShards, shards: list[int], tokenizer, max_length: int):
        self.plan, self.shards, self.tokenizer, self.max_length = plan, dict.fromkeys(shards), tokenizer, max_length

    def __getitem__(self, shard: int) -> list[TokenizedExample]:
        if shard not in self.shards:
            raise KeyError(shard)
        return tokenized_shard(self.plan.shard(shard), self.tokenizer, self.max_length)

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)


def layer_specs(manifest: Manifest) -> list[LayerSpec]:
    """The attributed layers of an index, in manifest order."""
    return [LayerSpec(**d) for d in IndexSettings.of(manifest).layers]


def check_method_matches_index(cfg: Config, manifest: Manifest) -> None:
    """The method's store kind (factors, dense, hidden) is the index's."""
    if manifest.kind != cfg.method.store_kind:
        raise IndexMismatchError(f"method={cfg.method.name} needs an index of {cfg.method.store_kind!r} rows, but "
                                 f"{cfg.index_path} holds {manifest.kind!r} rows; use another output_dir/index_dir "
                                 "or method")


def row_settings(cfg: Config, kind: str) -> dict:
    """The config's values of every setting that changes stored rows (None = not set: the index decides)."""
    settings = {"f": cfg.f, "seed": cfg.seed, "max_length": cfg.data.max_length, "layers": cfg.model.layer_patterns,
                "model_dtype": cfg.model.dtype, "dtype": cfg.dtype}
    if kind == "factors":
        settings.update(c=cfg.c, factor_iters=cfg.factor_iters)
    return settings


def query_config(cfg: Config, manifest: Manifest) -> Config:
    """The config that featurizes queries exactly like the index: every row-shaping setting from the
    manifest, on every path (one process and Ray).

    Raises:
        IndexMismatchError: the config sets one of them to another value than the index has (all such
            keys are named), or the method needs another store kind.
    """
    check_method_matches_index(cfg, manifest)
    settings = IndexSettings.of(manifest)  # what shaped the rows, as the index records it
    stored = dict(settings.row_settings)
    stored["factor_iters"] = stored.get("factor_iters") or default_iterations(stored["c"])
    diff = {k: (stored.get(k), v) for k, v in row_settings(cfg, settings.kind).items()
            if v is not None and stored.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: index {a} vs config {b}" for k, (a, b) in diff.items())
        raise IndexMismatchError(f"index {cfg.index_path} was built with other settings ({details}); queries are "
                                 "featurized like the index: drop these overrides or use another index")
    return replace(cfg, factor_iters=stored["factor_iters"])
