"""The training recipe whose retrains make the LDS ground truth (and the attributed model).

Full-batch AdamW with a fixed number of steps and a warm-up/linear-decay schedule: no data order and
no minibatch sampling, so a trained model depends only on (training subset, init seed). The init of
seed index s is the same for every subset, which removes most of the run-to-run noise that short
minibatch SGD would add to the ground truth.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lorif_ray.data import IGNORE_INDEX, TokenizedExample, collate
from lorif_ray.errors import ConfigError


@dataclass(frozen=True)
class TrainRecipe:
    """Model shape and optimizer of one setup; its digest keys every cached retrain."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    steps: int = 150  # full-batch steps (each one pass over the whole (sub)set)
    lr: float = 1e-2  # full batch: the gradient is exact, so a high rate is stable for this size
    warmup_steps: int = 10
    weight_decay: float = 0.0
    micro_batch: int = 1024  # examples per forward (memory only; the step is always full-batch)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"need 0 <= warmup_steps < steps, got {self.warmup_steps}, {self.steps}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def init_model(recipe: TrainRecipe, tokenizer, seed: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 whose weights depend only on (recipe, vocabulary, seed)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def summed_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over each example's loss tokens: (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                           reduction="none").sum(dim=1)


def _batches(examples: list[TokenizedExample], size: int, pad_token_id: int):
    # Sorted by length so padding stays small; the full-batch step does not depend on the order
    # (up to float summation order).
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(examples), size):
        yield collate(examples[i:i + size], pad_token_id)


def train(recipe: TrainRecipe, tokenizer, examples: list[TokenizedExample], seed: int) -> GPT2LMHeadModel:
    """Train a fresh model (init ``seed``) on ``examples`` by full-batch AdamW; returns it in eval mode.

    The loss is the mean over every loss-carrying token of the set (the usual LM objective).
    """
    if not examples:
        raise ConfigError("cannot train on an empty subset")
    model = init_model(recipe, tokenizer, seed)
    batches = list(_batches(examples, recipe.micro_batch, tokenizer.pad_token_id))
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    decay = recipe.steps - recipe.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(recipe.warmup_steps, 1), (recipe.steps - s) / decay))
    model.train()
    for _ in range(recipe.steps):
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            (summed_losses(model, batch).sum() / tokens).backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def example_losses(model, tokenizer, examples: list[TokenizedExample], batch_size: int = 256) -> torch.Tensor:
    """Summed loss (nats) of each example, in input order: (n,) float64."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], tokenizer.pad_token_id)
        out.append(summed_losses(model, batch).double())
    return torch.cat(out)
