"""Loading a local Hugging Face causal LM and fingerprinting it, so an index knows its model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from lorif_ray.errors import ConfigError, ModelMismatchError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda if available else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "auto"):
    """Model (eval mode, dropout off) and tokenizer from a local directory; never contacts a hub.

    Returns:
        (model, tokenizer). The tokenizer gets a pad token (eos) if it has none.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our stages draw their own bars
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={path} is not a local Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} not in {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    return model.to(resolve_device(device)).eval(), load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model directory, with a pad token (eos) if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_identity(model: nn.Module) -> dict:
    """What identifies the weights: class, config hash and a cheap fingerprint of every parameter.

    The fingerprint sums a strided sample of ≤ 4096 entries per parameter in float64, so it costs
    little on a 70B model and still changes when any checkpoint is swapped for another.
    """
    config = getattr(model, "config", None)
    config_json = json.dumps(config.to_diff_dict() if config is not None else {}, sort_keys=True, default=str)
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(device="cpu", dtype=torch.float64)
        digest.update(f"{name}:{tuple(param.shape)}:{float(sample.sum()):.10e}:{float(sample.abs().sum()):.10e}".encode())
    return {
        "class": type(model).__name__,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "weights_fingerprint": digest.hexdigest(),
    }


def check_same_model(expected: dict, actual: dict, where: str) -> None:
    """Raise ModelMismatchError if two identities differ (naming what differs and where)."""
    diff = [k for k in expected if expected.get(k) != actual.get(k)]
    if diff:
        details = ", ".join(f"{k}: index {expected.get(k)!r} vs model {actual.get(k)!r}" for k in diff)
        raise ModelMismatchError(f"the model does not match the one {where} was built from ({details})")


def load_model_for_sharding(path: str | Path, *, dtype: str = "bfloat16"):
    """A local causal LM on the CPU in ``dtype``, loaded for tensor-parallel sharding (eval mode).

    transformers builds the model on the meta device and streams the safetensors weights into it in
    the target dtype (``low_cpu_mem_usage``), so no float32 copy and no randomly initialized copy is
    ever made. Peak host memory per rank is one full copy of the weights in ``dtype`` (e.g. 2 bytes
    per parameter in bf16): DeepSpeed AutoTP (training mode) slices full tensors, then copies each
    slice to the device and frees the full tensor, so after sharding a rank holds 1/tp of each sharded
    linear plus the replicated embeddings, norms and head. Ranks on one host should load one after
    another when host memory is short (the sharding call is collective, the loading is not).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={path} is not a local Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} not in {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True,
                                                 low_cpu_mem_usage=True)
    return model.eval()
