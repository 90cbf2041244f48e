"""Case 9 of issue 12: the same model with one weight changed by 1e-3 is another model, for the loaded
model and for the identity read from the checkpoint files (the tensor-parallel path) alike."""

from __future__ import annotations

import pytest
import torch

from lorif_ray.errors import IndexMismatchError
from lorif_ray.model.loading import DTYPES, checkpoint_sampler, load_model, model_identity
from tests.conftest import WORDS
from tests.reliability.conftest import config


def _wider_model_dir(directory):
    """Model + data like `write_tiny_model_dir`, but 64 wide: the MLP weights have 16384 entries, so the
    old fingerprint (a sample of every 4th entry there) skipped three in four."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorif_ray.embedded.tokenizer import build_tokenizer
    from tests.conftest import write_tiny_model_dir

    assets = write_tiny_model_dir(directory)
    tokenizer = build_tokenizer(WORDS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=1, n_head=2))
    model.save_pretrained(assets["model"])
    return assets


def _change_one_weight(model_dir, name="transformer.h.0.mlp.c_fc.weight", delta=1e-3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[1] += delta  # an entry the strided sample never read
    model.save_pretrained(model_dir)


def _identities(model_dir, dtype="float32"):
    """(identity of the loaded model, identity read from the files as tensor-parallel ranks do)."""
    model, _ = load_model(model_dir, dtype=dtype, device="cpu")
    from_files = model_identity(model, sample=checkpoint_sampler(model_dir, DTYPES[dtype], model.base_model_prefix))
    return model_identity(model), from_files


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_weight_changed_by_1e3_changes_both_identities(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("LORIF_RAY_CACHE_DIR", str(tmp_path / "cache"))
    assets = _wider_model_dir(tmp_path)
    loaded, from_files = _identities(assets["model"], dtype)
    assert loaded == from_files
    assert _identities(assets["model"], dtype) == (loaded, from_files)  # second time from the digest cache
    _change_one_weight(assets["model"], delta=1e-3 if dtype == "float32" else 0.25)  # bf16 would round 1e-3 away
    changed, changed_from_files = _identities(assets["model"], dtype)
    assert changed == changed_from_files
    assert changed["weights_fingerprint"] != loaded["weights_fingerprint"]


def test_index_refuses_the_changed_model(tmp_path, monkeypatch):
    """Stage 1 on the changed model with the same index directory is refused naming the weights."""
    from lorif_ray.stages.index import run_index

    monkeypatch.setenv("LORIF_RAY_CACHE_DIR", str(tmp_path / "cache"))
    assets = _wider_model_dir(tmp_path)
    cfg = config(assets, tmp_path / "out")
    run_index(cfg)
    _change_one_weight(assets["model"])
    with pytest.raises(IndexMismatchError, match="weights_fingerprint"):
        run_index(cfg)
