"""Which linear layers are attributed: by default every Linear/Conv1D inside the transformer blocks."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from lorif_ray.errors import ConfigError
from lorif_ray.math.capture import linear_dims

_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def select_layers(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """Linear layers to attribute, in module order.

    Args:
        model: a Hugging Face causal LM (or any module).
        patterns: fnmatch patterns on module names (e.g. ``["*.mlp.*"]``); None selects every
            linear layer whose name has a block index (``transformer.h.3.attn.c_attn``,
            ``model.layers.0.mlp.up_proj``) and is not the output embedding.

    Returns:
        {name: module}; raises ConfigError if nothing matches.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or module is head:
            continue
        if patterns is None:
            keep = bool(_BLOCK_INDEX.search(name))
        else:
            keep = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if keep:
            chosen[name] = module
    if not chosen:
        names = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ConfigError(f"no linear layer matches {patterns!r}; linear layers of this model: {names[:12]}")
    return chosen


def layer_shapes(layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """{name: (I, O)}."""
    return {name: linear_dims(module) for name, module in layers.items()}


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` (y = x W + b, W: I×O) by the equal ``nn.Linear`` (Wᵀ), in place."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D":
                continue
            in_features, out_features = child.weight.shape
            linear = nn.Linear(in_features, out_features, bias=child.bias is not None,
                               device=child.weight.device, dtype=child.weight.dtype)
            linear.weight = nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=child.weight.requires_grad)
            if child.bias is not None:
                linear.bias = child.bias
            setattr(parent, child_name, linear)
    return model
