"""PEFT-format LoRA adapters attached without peft: the forward equals the merged weights, the captured
gradients are the adapter parameters' own, and the stages attribute the adapter's layers."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from lorif_ray.config import ClusterConfig, Config, ModelConfig
from lorif_ray.errors import ConfigError, ModelMismatchError
from lorif_ray.math.capture import ProjectedGradientCapture, dense_gradients, linear_dims, per_example_token_loss
from lorif_ray.math.projection import layer_projection
from lorif_ray.model.adapters import LORA_PATTERNS, LoraLinear, attach_lora
from lorif_ray.model.layers import select_layers
from tests.conftest import padded_batch, tiny_gpt2, tiny_llama, write_tiny_model_dir
from tests.math.test_capture import _reference

TARGETS = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj")}


def write_adapter(model, directory, targets, rank=3, alpha=6.0, seed=1, **config) -> dict[str, tuple]:
    """A PEFT LoRA adapter dir for ``model`` with random A and B (B nonzero, so the adapter matters)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets:
            i, o = linear_dims(module)
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, rank, generator=gen) / rank**0.5
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
         "use_dora": False, "use_rslora": False, "modules_to_save": None, **config}))
    return tensors


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_the_attached_forward_equals_merged_weights(arch, rslora, tmp_path):
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)()
    merged = copy.deepcopy(model)
    tensors = write_adapter(model, tmp_path, TARGETS[arch], use_rslora=rslora)
    names = attach_lora(model, tmp_path)
    assert names and all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
    scale = 6.0 / (3**0.5 if rslora else 3)
    with torch.no_grad():
        for name in names:
            delta = scale * tensors[f"base_model.model.{name}.lora_B.weight"].double() \
                @ tensors[f"base_model.model.{name}.lora_A.weight"].double()  # (O, I)
            layer = merged.get_submodule(name)
            layer.weight += delta.T if type(layer).__name__ == "Conv1D" else delta  # Conv1D stores I×O
    batch = padded_batch([9, 6], [0, 2])
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (got - expected).abs().max() < 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_captured_gradients_are_the_adapter_parameters_own(arch, tmp_path):
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)()
    write_adapter(model, tmp_path, TARGETS[arch])
    attach_lora(model, tmp_path)
    layers = select_layers(model, LORA_PATTERNS)
    assert sorted(layers) == sorted(n for n, _ in model.named_modules() if n.endswith((".lora_A", ".lora_B")))
    projections = {n: layer_projection(3, n, *linear_dims(m), 1, dtype=torch.float64) for n, m in layers.items()}
    lengths, prompts = [8, 11], [2, 0]
    batch = padded_batch(lengths, prompts)
    with ProjectedGradientCapture(model, layers, projections) as capture:
        per_example_token_loss(model, batch).sum().backward()
        blocks = capture.pop()
    for i, n in enumerate(lengths):
        expected = _reference(model, layers, projections, {k: v[i:i + 1, :n] for k, v in batch.items()})
        for name, (a, b) in blocks.items():
            got = dense_gradients(a[i:i + 1], b[i:i + 1])[0]
            assert (got - expected[name]).norm() / expected[name].norm() <= 1e-10, name


def test_stages_attribute_the_adapter_and_refuse_the_bare_model(tmp_path):
    from lorif_ray.stages.attribute import run_attribute
    from lorif_ray.stages.query import run_query
    from lorif_ray.store import IndexFolder
    from tests.stages.helpers import make_config

    assets = write_tiny_model_dir(tmp_path / "assets", arch="llama")
    from transformers import AutoModelForCausalLM
    write_adapter(AutoModelForCausalLM.from_pretrained(assets["model"]), tmp_path / "adapter", TARGETS["llama"])
    cfg = make_config(assets, tmp_path / "run", shard_size=16, r=8, cluster=ClusterConfig(backend="none"))
    cfg = replace(cfg, model=replace(cfg.model, adapter=str(tmp_path / "adapter")))
    report = run_attribute(cfg)
    layers = [layer["name"] for layer in IndexFolder(cfg.index_path).manifest().meta["layers"]]
    assert len(layers) == 2 * 3 * 2 and all(n.endswith((".lora_A", ".lora_B")) for n in layers)  # 2 blocks
    assert report["query"]["queries"] == 6
    bare = replace(cfg, model=replace(cfg.model, adapter=None, layers=LORA_PATTERNS))
    with pytest.raises((ModelMismatchError, ConfigError)):
        run_query(bare)


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "lora_only"), ("modules_to_save", ["lm_head"]),
                                         ("peft_type", "IA3")])
def test_adapters_that_change_the_forward_otherwise_are_refused(field, value, tmp_path):
    model = tiny_gpt2()
    write_adapter(model, tmp_path, TARGETS["gpt2"], **{field: value})
    with pytest.raises(ConfigError, match=field if field != "peft_type" else "LoRA"):
        attach_lora(model, tmp_path)


def test_an_adapter_for_another_model_is_refused(tmp_path):
    write_adapter(tiny_llama(), tmp_path, TARGETS["llama"])
    with pytest.raises(ConfigError, match="does not have"):
        attach_lora(tiny_gpt2(), tmp_path)
    with pytest.raises(ConfigError, match="tp_size=1"):
        Config(model=ModelConfig(adapter=str(tmp_path)), cluster=ClusterConfig(tp_size=2))
