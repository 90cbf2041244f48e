"""LoRA adapters in the PEFT format, attached without the peft package, so a fine-tuned adapter is attributed.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ...)
and ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` (r × I) and
``base_model.model.<module>.lora_B.weight`` (O × r) for each adapted linear (``nn.Linear`` or GPT-2's
``Conv1D``). ``attach_lora`` wraps each one as ``LoraLinear``: y = base(x) + s · B(A(x)) with
s = lora_alpha / r (lora_alpha / √r with ``use_rslora``), A and B plain ``nn.Linear`` modules named
``<module>.lora_A`` / ``<module>.lora_B`` as in PEFT. The capture hooks then treat them like any
linear layer, and by default (``model.layers`` unset) only they are attributed: the gradients are
those of the adapter's parameters, the ones fine-tuning changed.

Variants that change the forward in other ways (DoRA, trained biases, extra saved modules, per-layer
alphas, embedding adapters) are refused by name rather than silently mis-scored.

Example:
    >>> model = AutoModelForCausalLM.from_pretrained(base_dir)
    >>> attach_lora(model, adapter_dir)          # model.layers.0.self_attn.q_proj.lora_A, ... exist now
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lorif_ray.errors import ConfigError
from lorif_ray.math.capture import linear_dims

LORA_PATTERNS = ["*.lora_A", "*.lora_B"]  # the layers attributed by default when an adapter is attached
CONFIG_NAME, WEIGHTS_NAME, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_REFUSED = {  # config field → the value a plain LoRA has (anything else changes the forward)
    "use_dora": False, "bias": "none", "modules_to_save": None, "alpha_pattern": {}, "layer_replication": None,
}


class LoraLinear(nn.Module):
    """A linear layer with a LoRA adapter: base(x) + scale · lora_B(lora_A(x))."""

    def __init__(self, base_layer: nn.Module, lora_a: nn.Linear, lora_b: nn.Linear, scale: float):
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B, self.scale = base_layer, lora_a, lora_b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config, checked to be a plain LoRA this module reproduces exactly."""
    path = adapter_dir / CONFIG_NAME
    if not path.is_file() or not (adapter_dir / WEIGHTS_NAME).is_file():
        raise ConfigError(f"model.adapter={adapter_dir} is not a PEFT LoRA directory ({CONFIG_NAME} and "
                          f"{WEIGHTS_NAME} expected)")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path} is not JSON: {error}") from error
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path}: peft_type {config['peft_type']!r}; only LoRA adapters are supported")
    for field, plain in _REFUSED.items():
        if config.get(field, plain) not in (plain, None, {}, []):
            raise ConfigError(f"{path}: {field}={config[field]!r} is not supported (plain LoRA only)")
    return config


def attach_lora(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Wrap every linear the adapter adapts as a ``LoraLinear`` (in place); returns their names.

    Raises:
        ConfigError: not a plain PEFT LoRA adapter, or its shapes or module names do not fit ``model``.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    with safe_open(adapter_dir / WEIGHTS_NAME, framework="pt") as f:
        weights = {key: f.get_tensor(key) for key in f.keys()}
    suffixes = (".lora_A.weight", ".lora_B.weight")
    stray = [k for k in weights if not (k.startswith(PEFT_PREFIX) and k.endswith(suffixes))]
    if stray:
        raise ConfigError(f"{adapter_dir / WEIGHTS_NAME} holds tensors other than lora_A/lora_B weights: {stray[:3]}")
    names = sorted({k[len(PEFT_PREFIX):-len(suffixes[0])] for k in weights})
    modules = dict(model.named_modules())
    for name in names:
        base = modules.get(name)
        if base is None:
            raise ConfigError(f"the adapter adapts {name!r}, which this model does not have")
        a, b = (weights.get(f"{PEFT_PREFIX}{name}{s}") for s in suffixes)
        if a is None or b is None:
            raise ConfigError(f"the adapter has only one of lora_A/lora_B for {name!r}")
        rank, in_features = a.shape
        out_features = b.shape[0]
        if linear_dims(base) != (in_features, out_features) or b.shape[1] != rank:
            raise ConfigError(f"adapter shapes of {name!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit "
                              f"the layer (I, O) = {linear_dims(base)}")
        alpha = config.get("lora_alpha", config.get("r", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weight = next(base.parameters())
        lora_a = nn.Linear(in_features, rank, bias=False, dtype=weight.dtype, device=weight.device)
        lora_b = nn.Linear(rank, out_features, bias=False, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            lora_a.weight.copy_(a)
            lora_b.weight.copy_(b)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                LoraLinear(base, lora_a, lora_b, scale))
    if not names:
        raise ConfigError(f"{adapter_dir / WEIGHTS_NAME} holds no LoRA weights")
    return names
