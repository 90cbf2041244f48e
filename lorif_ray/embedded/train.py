"""Training the embedded default model: a small GPT-2 that memorizes the facts corpus on CPU.

`make demo` with no arguments attributes queries of this model, so it needs no download. The first
call trains it (about 10 s on two idle cores) and caches it under a directory named by the recipe's
digest, in the user's cache (``Config.embedded_cache_path``: ``~/.cache/lorif-ray/embedded``, whatever
the current folder); later calls return the cached model at once.

    >>> assets = ensure_embedded(Config().embedded_cache_path)  # doctest: +SKIP
    >>> assets.metrics["query_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorif_ray.data import IGNORE_INDEX, Example, iter_batches, load_examples, tokenize_examples
from lorif_ray.embedded.facts import build_facts_corpus, write_corpus
from lorif_ray.embedded.tokenizer import build_tokenizer
from lorif_ray.errors import ConfigError
from lorif_ray.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class EmbeddedRecipe:
    """Everything that determines the embedded model; its digest names the cache entry.

    The defaults train a 0.43M-parameter GPT-2 in about 7 s on two CPU cores (26 epochs) to a query
    accuracy of 0.92-1.0 over corpus/model seeds 0-5.
    """

    # Bump when the corpus generator or the training loop changes, so stale caches are not reused.
    revision: int = 1
    corpus_seed: int = 0
    num_lands: int = 64
    num_queries: int = 48
    num_fillers: int = 96
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4  # Head size 32.
    n_positions: int = 64  # Corpus sentences take at most 11 tokens; a short table keeps it small.
    # No dropout: each queried fact is seen in one sentence only and must be memorized.
    dropout: float = 0.0
    lr: float = 3e-3  # High for a transformer, fine for this size; memorizes in few steps.
    weight_decay: float = 0.0  # Decay would pull memorized single-occurrence facts towards zero.
    warmup_steps: int = 50
    # 300 steps memorize too little (query accuracy ~0.25); beyond ~800 the training sentences'
    # losses, hence their gradients, shrink towards zero and plain gradient dot products stop
    # finding the sources, while the influence ranking degrades more slowly.
    steps: int = 600
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.warmup_steps < self.steps:
            raise ConfigError(
                f"need 0 < warmup_steps < steps, got {self.warmup_steps} and {self.steps}"
            )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )

    def digest(self) -> str:
        """Sha256 (hex) of the recipe as sorted JSON."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class EmbeddedAssets:
    """Paths to a trained embedded model and its data.

    Attributes:
        model_dir: Model and tokenizer, loadable with `AutoModelForCausalLM.from_pretrained` and
            `AutoTokenizer.from_pretrained`.
        train_path: Training sentences (`id`, `text`), JSON Lines.
        queries_path: Queries (`id`, `prompt`, `response`, `source_id`), JSON Lines.
        digest: The recipe's digest, the name of the cache entry.
        metrics: `train_loss`, `query_accuracy`, `train_seconds` and counts.
    """

    model_dir: Path
    train_path: Path
    queries_path: Path
    digest: str
    metrics: dict = field(default_factory=dict)


def ensure_embedded(
    cache_dir: str | Path, recipe: EmbeddedRecipe | None = None, progress: bool = True
) -> EmbeddedAssets:
    """Returns the embedded model of `recipe`, training it first unless it is cached.

    The entry `cache_dir/<digest>/` is built in a temporary sibling directory and renamed into place
    once complete (with its `DONE` marker), so a crash never leaves a half-written entry.

    Args:
        cache_dir: Directory of cache entries; created if missing.
        recipe: What to train; default `EmbeddedRecipe()`.
        progress: Show a progress bar with the loss while training.

    Returns:
        The paths and metrics of the entry.
    """
    recipe = recipe or EmbeddedRecipe()
    digest = recipe.digest()
    entry = Path(cache_dir) / digest
    if not (entry / "DONE").exists():
        log.info("the embedded model is not cached yet: training it once (%d steps); it is kept in %s",
                 recipe.steps, entry)
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=entry.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary shared cache.
        try:
            _build(staging, recipe, progress)
            if entry.exists() and not (entry / "DONE").exists():  # Incomplete, not made here.
                shutil.rmtree(entry)
            try:
                os.replace(staging, entry)
            except OSError:
                if not (entry / "DONE").exists():
                    raise
                # Another process finished the same entry first; keep its copy.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    metrics = json.loads((entry / "metrics.json").read_text())
    return EmbeddedAssets(
        model_dir=entry / "model",
        train_path=entry / "train.jsonl",
        queries_path=entry / "queries.jsonl",
        digest=digest,
        metrics=metrics,
    )


def _build(directory: Path, recipe: EmbeddedRecipe, progress: bool) -> None:
    """Writes corpus, trained model, tokenizer, recipe, metrics and DONE into `directory`."""
    corpus = build_facts_corpus(
        seed=recipe.corpus_seed,
        num_lands=recipe.num_lands,
        num_queries=recipe.num_queries,
        num_fillers=recipe.num_fillers,
    )
    train_path, queries_path = write_corpus(corpus, directory)
    train, queries = load_examples(train_path), load_examples(queries_path)
    tokenizer = build_tokenizer(e.text for e in train + queries)
    tokenizer.model_max_length = recipe.n_positions

    torch.manual_seed(recipe.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=recipe.n_positions,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=recipe.dropout,
        embd_pdrop=recipe.dropout,
        attn_pdrop=recipe.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    start = time.perf_counter()
    train_loss = _train(model, tokenizer, train, recipe, progress)
    train_seconds = time.perf_counter() - start

    metrics = {
        "train_loss": train_loss,
        "query_accuracy": query_accuracy(model, tokenizer, queries, recipe.n_positions),
        "train_seconds": round(train_seconds, 1),
        "num_train": len(train),
        "num_queries": len(queries),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    (directory / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (directory / "DONE").touch()


def _train(
    model: GPT2LMHeadModel, tokenizer, train: list[Example], recipe: EmbeddedRecipe, progress: bool
) -> float:
    """Trains on whole sentences (loss on every token); returns the final mean loss per token."""
    tokenized = tokenize_examples(train, tokenizer, recipe.n_positions)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    # Linear warm-up, then linear decay to zero: ending at lr 0 settles the memorized facts.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / recipe.warmup_steps,
            (recipe.steps - step) / (recipe.steps - recipe.warmup_steps),
        ),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = progress_bar(recipe.steps, "training the embedded model (once)", "step", progress)
    step = 0
    while step < recipe.steps:
        order = torch.randperm(len(tokenized), generator=generator).tolist()
        epoch = [tokenized[i] for i in order]
        for _, batch in iter_batches(epoch, recipe.batch_size, tokenizer.pad_token_id):
            loss_sum, count = _summed_loss(model, batch)
            loss = loss_sum / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == recipe.steps:
                break
    bar.close()
    return _mean_loss(model, tokenizer, train, recipe.n_positions)


def _summed_loss(
    model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over a batch's loss-carrying tokens, and their count.

    Args:
        model: The model.
        batch: `input_ids`, `attention_mask`, `labels`, each (B, T).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # (B, T-1): position t+1 is predicted from the logits at t.
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )  # logits (B, V, T-1) against labels (B, T-1)
    return loss, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def _mean_loss(
    model: GPT2LMHeadModel, tokenizer, examples: list[Example], max_length: int
) -> float:
    """Mean loss per loss-carrying token over `examples`, in eval mode."""
    model.eval()
    total, count = 0.0, 0
    tokenized = tokenize_examples(examples, tokenizer, max_length)
    for _, batch in iter_batches(tokenized, 256, tokenizer.pad_token_id):
        loss_sum, batch_count = _summed_loss(model, batch)
        total += loss_sum.item()
        count += batch_count
    return total / count


@torch.no_grad()
def query_accuracy(model, tokenizer, queries: list[Example], max_length: int) -> float:
    """Fraction of queries whose every response token is the model's argmax prediction.

    Args:
        model: A causal LM returning logits (B, T, V).
        tokenizer: Its tokenizer.
        queries: Examples with a prompt (only the response carries loss).
        max_length: Most tokens per query.
    """
    model.eval()
    correct = 0
    tokenized = tokenize_examples(queries, tokenizer, max_length)
    for _, batch in iter_batches(tokenized, 256, tokenizer.pad_token_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted = logits[:, :-1].argmax(-1)  # (B, T-1)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        scored = labels != IGNORE_INDEX
        correct += ((predicted == labels) | ~scored).all(dim=1).sum().item()
    return correct / len(queries)
