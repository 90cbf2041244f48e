"""The evaluation setup (corpus + attributed model) and the LDS ground truth, both cached on disk.

Layout under ``<cache_root>/setups/<digest>/`` (digest of corpus settings + training recipe):
``train.jsonl``, ``queries.jsonl``, ``model/`` (the attributed model: the recipe's seed index 0 on
the full training set, with its tokenizer), ``setup.json``, and ``retrain/<subset sha>-seed<s>.json``
(the query losses of one retrain). A retrain is keyed by the recipe and the subset's content, so
every method and every f/c/r point reuses it, and raising M adds subsets without redoing the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lorif_ray.data import Example, load_examples, tokenize_examples
from lorif_ray.eval.config import EvalConfig
from lorif_ray.eval.recipe import example_losses, train
from lorif_ray.eval.setups import facts_corpus, make_tokenizer, shakespeare_corpus
from lorif_ray.store import atomic_path, write_json

log = logging.getLogger(__name__)

RUNS: Counter = Counter()  # what this process actually computed (not loaded): "retrain", "setup"


@dataclass(frozen=True)
class Setup:
    directory: Path
    digest: str

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"

    @property
    def train_path(self) -> Path:
        return self.directory / "train.jsonl"

    @property
    def queries_path(self) -> Path:
        return self.directory / "queries.jsonl"

    def info(self) -> dict:
        return json.loads((self.directory / "setup.json").read_text())


def setup_digest(ev: EvalConfig) -> str:
    key = {"corpus": ev.corpus_key(), "recipe": asdict(ev.recipe)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def ensure_setup(ev: EvalConfig) -> Setup:
    """The setup's corpus files and attributed model, built on first use."""
    digest = setup_digest(ev)
    directory = Path(ev.cache_root) / "setups" / digest[:16]
    setup = Setup(directory, digest)
    if (directory / "setup.json").exists():
        return setup
    directory.mkdir(parents=True, exist_ok=True)
    if ev.setup == "facts":
        corpus = facts_corpus(ev.corpus_seed, ev.num_lands, ev.num_queries, ev.num_fillers)
    else:
        corpus = shakespeare_corpus(ev.text_cache, ev.num_train, ev.num_queries, ev.words, ev.vocab_size)
    _write_rows(setup.train_path, corpus.train)
    _write_rows(setup.queries_path, corpus.queries)
    tokenizer = make_tokenizer(corpus, ev.max_length)
    train_set, _ = tokenized(setup, tokenizer, ev.max_length)
    start = time.perf_counter()
    with torch.random.fork_rng():
        model = train(ev.recipe, tokenizer, train_set, seed=ev.seeds[0])
    seconds = time.perf_counter() - start
    model.save_pretrained(setup.model_dir)
    tokenizer.save_pretrained(setup.model_dir)
    RUNS["setup"] += 1
    write_json(directory / "setup.json", {"eval": asdict(ev), "digest": digest, "recipe": asdict(ev.recipe),
                                          "num_train": len(corpus.train), "num_queries": len(corpus.queries),
                                          "num_parameters": sum(p.numel() for p in model.parameters()),
                                          "train_seconds": seconds})
    return setup


def tokenized(setup: Setup, tokenizer, max_length: int):
    """(training examples, queries), tokenized like the stages tokenize them."""
    return (tokenize_examples(load_examples(setup.train_path), tokenizer, max_length),
            tokenize_examples(load_examples(setup.queries_path), tokenizer, max_length))


def draw_subsets(num_train: int, num_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """(M, N) boolean membership; subset i depends only on (seed, i, N, alpha), not on M."""
    size = int(round(alpha * num_train))
    out = np.zeros((num_subsets, num_train), dtype=bool)
    for i in range(num_subsets):
        out[i, np.random.default_rng([seed, i]).permutation(num_train)[:size]] = True
    return out


def subset_key(member: np.ndarray) -> str:
    return hashlib.sha256(np.flatnonzero(member).astype(np.int64).tobytes()).hexdigest()[:20]


@dataclass
class GroundTruth:
    subsets: np.ndarray  # (M, N) bool
    losses: np.ndarray  # (S, M, nq) query losses (summed nats over loss tokens) per seed
    train_ids: list[str]
    query_ids: list[str]
    seeds: list[int]
    seconds: float  # wall time of all the retrains, as recorded when each was made
    median_seconds: float  # of one retrain (robust to the time others shared the CPU)

    @property
    def mean_losses(self) -> np.ndarray:
        return self.losses.mean(axis=0)  # (M, nq)


def ground_truth(ev: EvalConfig, setup: Setup | None = None, progress: bool = True) -> GroundTruth:
    """Retrain on every subset with every seed (cached per recipe, subset and seed); query losses."""
    from lorif_ray.model.loading import load_tokenizer

    setup = setup or ensure_setup(ev)
    tokenizer = load_tokenizer(setup.model_dir)
    train_set, queries = tokenized(setup, tokenizer, ev.max_length)
    subsets = draw_subsets(len(train_set), ev.num_subsets, ev.alpha, ev.subset_seed)
    losses = np.zeros((len(ev.seeds), len(subsets), len(queries)))
    seconds = []
    retrain_dir = setup.directory / "retrain"
    retrain_dir.mkdir(exist_ok=True)
    for m, member in enumerate(subsets):
        for s, seed in enumerate(ev.seeds):
            path = retrain_dir / f"{subset_key(member)}-seed{seed}.json"
            if not path.exists():
                start = time.perf_counter()
                with torch.random.fork_rng():
                    model = train(ev.recipe, tokenizer, [train_set[i] for i in np.flatnonzero(member)], seed=seed)
                values = example_losses(model, tokenizer, queries).tolist()
                RUNS["retrain"] += 1
                write_json(path, {"subset": np.flatnonzero(member).tolist(), "seed": seed, "losses": values,
                                  "seconds": time.perf_counter() - start, "recipe": setup.digest})
                if progress:
                    log.info("retrain subset %d/%d seed %d: %.1fs", m + 1, len(subsets), seed,
                             time.perf_counter() - start)
            record = json.loads(path.read_text())
            losses[s, m] = record["losses"]
            seconds.append(record["seconds"])
    return GroundTruth(subsets, losses, [e.id for e in train_set], [q.id for q in queries], list(ev.seeds),
                       float(sum(seconds)), float(np.median(seconds)))


def example_text(setup: Setup) -> tuple[dict[str, str], dict[str, Example]]:
    return ({e.id: e.text for e in load_examples(setup.train_path)},
            {e.id: e for e in load_examples(setup.queries_path)})
