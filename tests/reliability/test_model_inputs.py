"""Cases 7, 8 and 12 of issue 12: a max_length beyond the model's context, a tokenizer without pad and
eos tokens, and an f wider than the layers, each handled before any work starts; issue 21 row 8 (damaged model
files named) and the model folder's checks and Hub ids of issue 20 (rows 3 and 9)."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from lorif_ray.data import collate, tokenize_examples
from lorif_ray.data.examples import Example
from lorif_ray.errors import ConfigError
from lorif_ray.model.loading import load_tokenizer
from lorif_ray.store import IndexFolder
from tests.reliability.conftest import config


def test_max_length_beyond_the_context_is_refused_naming_both_numbers(tiny_assets, tmp_path):
    """Case 7: the tiny GPT-2 has n_positions=32; max_length=64 used to be an IndexError in the embedding."""
    from lorif_ray.config import DataConfig
    from lorif_ray.stages.index import run_index

    cfg = config(tiny_assets, tmp_path / "out")
    cfg.data = DataConfig(train=cfg.data.train, queries=cfg.data.queries, max_length=64)
    with pytest.raises(ConfigError, match=r"data\.max_length=64 exceeds .*\(32 positions"):
        run_index(cfg)
    assert not cfg.index_path.exists()


def _strip_special_tokens(model_dir, roles):
    tokenizer = load_tokenizer(model_dir)
    for role in roles:
        setattr(tokenizer, f"{role}_token", None)
    tokenizer.save_pretrained(model_dir)


def test_tokenizer_without_pad_and_eos_pads_with_another_token(tiny_assets, tmp_path, caplog):
    """Case 8: no pad and no eos token (the TypeError in collate); bos pads, it is logged, stage 1 runs."""
    from lorif_ray.stages.index import run_index

    assets = {**tiny_assets, "model": tmp_path / "model"}
    shutil.copytree(tiny_assets["model"], assets["model"])
    _strip_special_tokens(assets["model"], ["pad", "eos"])
    with caplog.at_level(logging.INFO, logger="lorif_ray.model.loading"):
        tokenizer = load_tokenizer(assets["model"])
    assert tokenizer.pad_token == "<bos>" and "padding with its bos token" in caplog.text
    report = run_index(config(assets, tmp_path / "out"))
    assert report["computed"] == 48


def test_tokenizer_without_any_special_token_pads_with_token_zero(tiny_assets, tmp_path):
    """Case 8, last resort: no pad, eos, bos or unk token; padding (masked anyway) uses token id 0."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model_dir)
    _strip_special_tokens(model_dir, ["pad", "eos", "bos", "unk"])
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.pad_token_id == 0
    batch = collate(tokenize_examples([Example("a", "the cat sat on a mat"), Example("b", "a dog")], tokenizer, 16),
                    tokenizer.pad_token_id)
    assert batch["input_ids"][1, -1] == 0 and batch["attention_mask"][1, -1] == 0


def test_f_wider_than_some_layers_warns_naming_them(tiny_assets, tmp_path, caplog):
    """Case 12: the tiny GPT-2 is 32 wide; with f=64 every layer keeps d = 1 on its 32-wide side: a
    warning names the layers (the 128-wide side of the MLP still projects to 2)."""
    from lorif_ray.stages.index import run_index

    cfg = config(tiny_assets, tmp_path / "out", f=64)
    with caplog.at_level(logging.WARNING, logger="lorif_ray.stages.index"):
        run_index(cfg)
    assert "f=64 is larger than a width" in caplog.text and "transformer.h.0.mlp.c_fc (32x128)" in caplog.text
    specs = {layer["name"]: layer for layer in IndexFolder(cfg.index_path).manifest().meta["layers"]}
    assert specs["transformer.h.0.mlp.c_fc"]["d2"] == 2


def test_f_wider_than_every_layer_is_refused(tiny_assets, tmp_path):
    """Case 12: with f=512 every layer would collapse to d1 = d2 = 1: refused before any shard."""
    from lorif_ray.stages.index import run_index

    cfg = config(tiny_assets, tmp_path / "out", f=512)
    with pytest.raises(ConfigError, match=r"f=512 is larger than both widths .* of every layer"):
        run_index(cfg)
    assert not cfg.index_path.exists()


def _copy_model(tiny_assets, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_assets["model"], folder)
    return folder


def test_damaged_model_files_are_named_where_the_model_loads(tiny_assets, tmp_path):
    """Issue 21 row 8, where every process loads the model (the driver's checks and each Ray actor's
    ``load_model``): a config.json cut short, a model.safetensors cut short or with a header length beyond the
    file is a CorruptModelError naming the file (was a bare JSONDecodeError / SafetensorError)."""
    from lorif_ray.errors import CorruptModelError
    from lorif_ray.model.loading import check_model_folder, load_model

    config = _copy_model(tiny_assets, tmp_path, "config") / "config.json"
    config.write_text(config.read_text()[:-20])
    short = _copy_model(tiny_assets, tmp_path, "short") / "model.safetensors"
    size = short.stat().st_size
    short.write_bytes(short.read_bytes()[:size // 2])
    huge = _copy_model(tiny_assets, tmp_path, "huge") / "model.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + huge.read_bytes()[8:])
    cases = {config: r"not valid JSON", short: rf"its tensors end at byte {size}, the file holds "
             rf"{size // 2}", huge: r"its header length says 1000000000000 bytes"}
    for file, message in cases.items():
        for check in (check_model_folder, lambda folder: load_model(folder, device="cpu")):
            with pytest.raises(CorruptModelError, match=f"^{re.escape(str(file))}: {message}"):
                check(file.parent)


def test_a_missing_config_tokenizer_or_weights_is_named_by_key(tiny_assets, tmp_path):
    from lorif_ray.model.loading import check_model_folder

    for missing, message in (("config.json", "no config.json there"), ("tokenizer.json", "no tokenizer files"),
                             ("model.safetensors", "no weights there")):
        folder = _copy_model(tiny_assets, tmp_path, missing)
        for name in ((missing,) if missing != "tokenizer.json" else ("tokenizer.json", "tokenizer_config.json")):
            (folder / name).unlink()
        with pytest.raises(ConfigError, match=f"^model.path={re.escape(str(folder))}: {message}"):
            check_model_folder(folder)


def test_a_hub_id_resolves_in_the_local_cache_only(tiny_assets, tmp_path, monkeypatch):
    """A Hub id is the snapshot of refs/main in the cache (HF_HUB_CACHE, read when resolving); an id not in the
    cache, or an incomplete one, is one line saying where it looked and how to fetch it."""
    from lorif_ray.model.hub import resolve_model_path
    from tests.conftest import write_hub_cache

    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, "org/tiny", tiny_assets["model"], revision="a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path("org/tiny") == snapshot and (snapshot / "config.json").is_symlink()
    assert resolve_model_path(str(tiny_assets["model"])) == tiny_assets["model"]
    with pytest.raises(ConfigError, match=rf"^model.path=org/other: no such folder, and the Hugging Face cache at "
                                          rf"{re.escape(str(cache))} does not hold it .*`hf download org/other`"):
        resolve_model_path("org/other")
    (snapshot / "config.json").unlink()
    with pytest.raises(ConfigError, match="holds it without a config.json in its main snapshot"):
        resolve_model_path("org/tiny")
    with pytest.raises(ConfigError, match=r"^model.path=/no/such: no such folder$"):
        resolve_model_path("/no/such")
