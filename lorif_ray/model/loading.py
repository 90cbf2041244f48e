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


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "auto", adapter: str | Path | None = None):
    """Model (eval mode, dropout off) and tokenizer from a local directory; never contacts a hub.

    ``adapter``: a local PEFT LoRA adapter directory attached to the model (``lorif_ray.model.adapters``).

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
    if adapter is not None:
        from lorif_ray.model.adapters import attach_lora

        attach_lora(model, adapter)
    return model.to(resolve_device(device)).eval(), load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model directory, with a pad token (eos) if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _fingerprint_step(numel: int) -> int:
    return max(1, numel // 4096)


def model_identity(model: nn.Module, sample=None) -> dict:
    """What identifies the weights: class, config hash and a cheap fingerprint of every parameter.

    The fingerprint sums a strided sample of ≤ 4096 entries per parameter in float64, so it costs
    little on a 70B model and still changes when any checkpoint is swapped for another.

    Args:
        model: the unsharded model (its parameters may be on the meta device when ``sample`` is given).
        sample: optional ``sample(name, param, step) -> float64 tensor`` giving ``flat[::step]`` of the
            parameter's values from elsewhere (see ``checkpoint_sampler``); default: the parameter itself.
    """
    config = getattr(model, "config", None)
    config_json = json.dumps(config.to_diff_dict() if config is not None else {}, sort_keys=True, default=str)
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        step = _fingerprint_step(param.numel())
        if sample is None:
            values = param.detach().reshape(-1)[::step].to(device="cpu", dtype=torch.float64)
        else:
            values = sample(name, param, step)
        digest.update(f"{name}:{tuple(param.shape)}:{float(values.sum()):.10e}:{float(values.abs().sum()):.10e}".encode())
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


# ---- reading a checkpoint without materializing it (tensor-parallel slice loading) ----

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a local checkpoint (``model.safetensors.index.json`` or ``model.safetensors``)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{path} has no safetensors checkpoint (model.safetensors[.index.json]); "
                          "slice loading reads safetensors only")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def checkpoint_key(names, keys, base_prefix: str | None) -> str | None:
    """The checkpoint key of a model tensor known by ``names`` (aliases): exact, or with/without the
    base model prefix (old GPT-2 checkpoints store ``h.0...`` for ``transformer.h.0...``)."""
    for name in names:
        candidates = [name]
        if base_prefix:
            if name.startswith(base_prefix + "."):
                candidates.append(name[len(base_prefix) + 1:])
            else:
                candidates.append(f"{base_prefix}.{name}")
        for candidate in candidates:
            if candidate in keys:
                return candidate
    return None


def checkpoint_sampler(path: str | Path, dtype: torch.dtype, base_prefix: str | None = None):
    """A ``sample`` for ``model_identity`` that reads ``flat[::step]`` of each tensor straight from the files.

    The safetensors files are memory-mapped and only the sampled elements are touched, each cast to
    ``dtype`` (what the loaded model holds) and then to float64, so the fingerprint equals that of the
    model loaded in ``dtype``. Tied parameters appear once, under the name the model gives them.
    """
    import mmap
    import struct

    files = checkpoint_files(path)
    opened: dict[Path, tuple] = {}

    def header(file: Path):
        if file not in opened:
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                meta = json.loads(f.read(size))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, writable: no torch warning
            opened[file] = (8 + size, meta, mm)
        return opened[file]

    def sample(name: str, param: torch.Tensor, step: int) -> torch.Tensor:
        key = checkpoint_key([name], files.keys(), base_prefix)
        if key is None:
            raise ConfigError(f"{name} is not in the checkpoint at {path}")
        base, meta, mm = header(files[key])
        info = meta[key]
        start, end = info["data_offsets"]
        stored = SAFETENSORS_DTYPES[info["dtype"]]
        numel = (end - start) // stored.itemsize
        if numel != param.numel():
            raise ConfigError(f"{key}: {numel} values in the checkpoint, the model has {tuple(param.shape)}")
        if numel == 0:
            return torch.zeros(0, dtype=torch.float64)
        flat = torch.frombuffer(mm, dtype=stored, offset=base + start, count=numel)
        values = flat[::step].to(dtype).to(torch.float64)  # copies: the view on the map is dropped
        del flat
        return values

    return sample
