"""Tail-patch score (Chang et al. 2024; paper App. A.3, batched as in Li et al. 2025).

For each query: one SGD step on the final model with its top-k proponents as one batch (loss = the
recipe's objective, mean over the batch's loss tokens), then the increase of the query's target
log-probability (nats, summed over its loss tokens). The model is restored after each query.
"""

from __future__ import annotations

import numpy as np
import torch

from lorif_ray.data import collate
from lorif_ray.eval.recipe import summed_losses
from lorif_ray.eval.stats import MeanSE


def tail_patch(model, tokenizer, train_set, queries, scores: np.ndarray, k: int, lr: float) -> tuple[MeanSE, np.ndarray]:
    """(mean ± s.e. over queries, per-query Δ log p) for (nq, N) scores (higher = stronger proponent)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    gains = np.zeros(len(queries))
    model.eval()  # no dropout in the patch step either
    for q, query in enumerate(queries):
        qbatch = collate([query], tokenizer.pad_token_id)
        with torch.no_grad():
            before = float(summed_losses(model, qbatch)[0])
        batch = collate([train_set[i] for i in top[q]], tokenizer.pad_token_id)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        model.zero_grad(set_to_none=True)
        (summed_losses(model, batch).sum() / tokens).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
            after = float(summed_losses(model, qbatch)[0])
            for n, p in model.named_parameters():
                p.copy_(state[n])
        gains[q] = before - after  # log p(target) after − before
    model.zero_grad(set_to_none=True)
    return MeanSE.of(gains), gains
