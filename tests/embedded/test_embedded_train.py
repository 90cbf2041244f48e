"""Training the embedded model: a loadable cache entry, cache hits, atomic failure, checks."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorif_ray.embedded import train as train_module
from lorif_ray.embedded.train import EmbeddedRecipe, ensure_embedded
from lorif_ray.errors import ConfigError

# A few steps of a narrow model on a small corpus: seconds, enough to exercise every path.
TINY = EmbeddedRecipe(
    num_lands=16, num_queries=8, num_fillers=8, n_embd=32, steps=4, warmup_steps=1
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_embedded(cache, TINY, progress=False)


def test_entry_is_loadable(built):
    cache, assets = built
    entry = cache / TINY.digest()
    assert assets.model_dir == entry / "model" and (entry / "DONE").exists()
    assert json.loads((entry / "recipe.json").read_text())["steps"] == TINY.steps
    assert set(assets.metrics) >= {"train_loss", "query_accuracy", "train_seconds"}
    assert 0.0 <= assets.metrics["query_accuracy"] <= 1.0

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["the capital of"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 4, len(tokenizer))
    assert assets.train_path.exists() and assets.queries_path.exists()


def test_second_call_hits_cache(built, monkeypatch):
    cache, assets = built
    weights = assets.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(train_module, "_build", lambda *a: pytest.fail("retrained a cached model"))
    start = time.perf_counter()
    again = ensure_embedded(cache, TINY, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == assets and weights.stat().st_mtime_ns == mtime


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(directory, recipe, progress):
        (directory / "model").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(train_module, "_build", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_embedded(tmp_path, TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_recipe_digest_and_checks():
    assert EmbeddedRecipe().digest() == EmbeddedRecipe().digest()
    assert EmbeddedRecipe(seed=1).digest() != EmbeddedRecipe().digest()
    with pytest.raises(ConfigError, match="warmup_steps"):
        EmbeddedRecipe(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="n_head"):
        EmbeddedRecipe(n_embd=30)
