"""Training the embedded model: a loadable cache entry, cache hits, atomic failure, checks."""

import json
import logging
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorif_ray.embedded import train as train_module
from lorif_ray.embedded.train import EmbeddedRecipe, ensure_embedded
from lorif_ray.config import Config, user_cache_dir
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


def test_first_build_says_where_it_caches_and_its_bar_moves_per_step(tmp_path, recording_bars, caplog):
    """A first user waits for the training: one log line says it happens once and where the model is kept, and
    the bar moves at every optimizer step; a cache hit says and draws nothing."""
    with caplog.at_level(logging.INFO, logger="lorif_ray.embedded.train"):
        ensure_embedded(tmp_path, TINY, progress=True)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lorif_ray.embedded.train"]
    assert "once" in line and str(tmp_path / TINY.digest()) in line
    (bar,) = recording_bars["training the embedded model (once)"]
    assert bar.updates == [1] * TINY.steps and bar.n == bar.total == TINY.steps
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorif_ray.embedded.train"):
        ensure_embedded(tmp_path, TINY, progress=True)
    assert not caplog.records and len(recording_bars["training the embedded model (once)"]) == 1


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


def test_the_embedded_cache_is_the_users_not_the_current_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("LORIF_RAY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Config().embedded_cache_path == tmp_path / "xdg" / "lorif-ray" / "embedded"
    monkeypatch.setenv("LORIF_RAY_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.chdir(tmp_path)
    assert Config().embedded_cache_path == user_cache_dir() / "embedded" == tmp_path / "mine" / "embedded"
    assert Config(embedded_cache="~/models").embedded_cache_path.is_absolute()  # the key still wins, ~ expanded
