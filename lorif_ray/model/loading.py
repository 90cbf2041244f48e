"""Loading a local Hugging Face causal LM and fingerprinting it, so an index knows its model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorif_ray.config import user_cache_dir
from lorif_ray.errors import ConfigError, CorruptModelError, ModelMismatchError

logger = logging.getLogger(__name__)

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
        (model, tokenizer). The tokenizer gets a pad token if it has none (see ``load_tokenizer``).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our stages draw their own bars
    path = Path(path)
    check_model_folder(path)
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} not in {sorted(DTYPES)}")
    with named_model_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    if adapter is not None:
        from lorif_ray.model.adapters import attach_lora

        attach_lora(model, adapter)
    return model.to(resolve_device(device)).eval(), load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model directory, with a pad token if it has none.

    Batches are padded on the right and padding is masked out of attention and loss, so any token of
    the vocabulary pads equally well (a causal model's real tokens never see the padding): the first
    of eos, bos, unk, or else the token of id 0, is used, and which one is logged.

    Raises:
        ConfigError: the tokenizer has no token at all to pad with (an empty vocabulary).
    """
    from transformers import AutoTokenizer

    with named_model_errors(Path(path), "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        for role in ("eos", "bos", "unk"):
            token = getattr(tokenizer, f"{role}_token")
            if token is not None:
                tokenizer.pad_token = token
                break
        else:
            if len(tokenizer) == 0:
                raise ConfigError(f"the tokenizer of {path} has no pad, eos, bos or unk token and no vocabulary to "
                                  "pad with; add a pad_token to its tokenizer_config.json")
            role, tokenizer.pad_token = "id 0", tokenizer.convert_ids_to_tokens(0)
        logger.info("the tokenizer of %s has no pad token: padding with its %s token %r (id %d); padding is "
                    "masked out of attention and loss", path, role, tokenizer.pad_token, tokenizer.pad_token_id)
    return tokenizer


# what a model folder may hold as weights, and as its tokenizer (any one of them)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# safetensors refuses headers above 100 MB; a longer length is a corrupt file
MAX_SAFETENSORS_HEADER = 100_000_000


def read_model_config(path: str | Path, key: str = "model.path") -> dict:
    """The parsed config.json of a model folder.

    Raises:
        ConfigError: the folder has no config.json (not a Hugging Face model folder).
        CorruptModelError: config.json is not a JSON object (e.g. cut short), naming the file and the position.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{key}={path}: no config.json there, so not a Hugging Face model folder; give the folder "
                          "that save_pretrained wrote (config.json, weights, tokenizer files)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptModelError(f"{file}: not valid JSON ({e}); the file is damaged or cut short: restore it "
                                "(save_pretrained or download it again)") from e
    if not isinstance(config, dict):
        raise CorruptModelError(f"{file}: a JSON {type(config).__name__}, not an object of config fields")
    return config


def check_model_folder(path: str | Path, key: str = "model.path", tokenizer: bool = True) -> None:
    """A model folder checked without loading it: config.json parses, a tokenizer is there (``tokenizer``: for a
    caller that loads one), weights are there and every safetensors file's header agrees with its size (header
    reads only: seconds for any model).

    Raises:
        ConfigError: a missing config.json, tokenizer or weights (the folder and what it lacks).
        CorruptModelError: a config.json or safetensors file that cannot be read (the file, what is wrong).
    """
    path = Path(path)
    read_model_config(path, key)
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}={path}: no tokenizer files there ({', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer next to the model (tokenizer.save_pretrained)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}={path}: no weights there ({', '.join(WEIGHT_FILES)})")
    for file in safetensors_files(path):
        check_safetensors_file(file)


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names, or model.safetensors.

    Raises:
        CorruptModelError: an unreadable index; ConfigError: a file the index names is missing.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptModelError(f"{index}: not a safetensors index (JSON with a weight_map): {e}") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConfigError(f"{index} names {len(missing)} weight file(s) that are not there: "
                              f"{', '.join(missing[:3])}")
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def check_safetensors_file(file: Path) -> None:
    """A safetensors file's 8-byte header length, header and tensor extents against the file's size.

    Raises:
        CorruptModelError: naming the file: too short, a header length beyond the file, an unreadable header,
            or tensors that end before or after the file does (cut short, or not one file).
    """
    import struct

    size = file.stat().st_size
    again = "; the file is damaged or cut short: download or save it again"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptModelError(f"{file}: {size} bytes, too short for a safetensors file{again}")
        length = struct.unpack("<Q", head)[0]
        if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise CorruptModelError(f"{file}: its header length says {length} bytes, the file holds {size}{again}")
        try:
            header = json.loads(f.read(length))
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CorruptModelError(f"{file}: unreadable safetensors header ({e}){again}") from e
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise CorruptModelError(f"{file}: its tensors end at byte {expected}, the file holds {size}{again}")


@contextmanager
def named_model_errors(path: Path, what: str = "model"):
    """Errors of transformers' loading turned into ``CorruptModelError`` naming the folder (a file that the
    checks above cannot see, e.g. a damaged tensor payload or tokenizer file)."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: the {what} files cannot be read ({type(e).__name__}: {e})") from e


def context_length(path: str | Path) -> int | None:
    """The most positions the model at ``path`` takes (``n_positions``, ``max_position_embeddings``, ...,
    from its config.json alone; no weights); None if the config names none."""
    config = read_model_config(path)
    for section in (config, config.get("text_config") or {}):
        for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


def check_context_length(path: str | Path, max_length: int) -> None:
    """Refuse a ``data.max_length`` longer than the model's context before any work starts.

    Raises:
        ConfigError: ``max_length`` exceeds the model's positions (naming both numbers).
    """
    limit = context_length(path)
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length={max_length} exceeds the context of the model at {path} "
                          f"({limit} positions in its config.json); set data.max_length <= {limit}")


def tensor_sha256(values: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes, row-major, in its dtype (copied to the CPU)."""
    flat = values.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def model_identity(model: nn.Module, sample=None) -> dict:
    """What identifies the weights: class, config hash and the SHA-256 of every parameter's bytes.

    Every byte counts, so any change of any weight (one entry by 1e-3) changes the identity. On a
    loaded model hashing costs about a second per 1.4 GB of weights (one core; 10 s for 7B in bf16);
    ``checkpoint_sampler`` gets the same digests from the files (cached per file), for models that are
    never whole in one process (tensor parallel).

    Args:
        model: the unsharded model (its parameters may be on the meta device when ``sample`` is given).
        sample: optional ``sample(name, param) -> hex SHA-256`` of the parameter's values as the loaded
            model holds them, from elsewhere (see ``checkpoint_sampler``); default: the parameter itself.
    """
    config = getattr(model, "config", None)
    config_json = json.dumps(config.to_diff_dict() if config is not None else {}, sort_keys=True, default=str)
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor_digest = tensor_sha256(param) if sample is None else sample(name, param)
        digest.update(f"{name}:{tuple(param.shape)}:{tensor_digest}\n".encode())
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
    check_model_folder(path, tokenizer=False)  # the weights only
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} not in {sorted(DTYPES)}")
    with named_model_errors(path):
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
    """A ``sample`` for ``model_identity`` that hashes each tensor straight from the checkpoint files.

    Each tensor is read as stored, cast to ``dtype`` (what the loaded model holds) and hashed, so the
    identity equals that of the model loaded in ``dtype`` (``model_identity(load_model(path))``). The
    files are read once, several at a time; the digests are cached per (file, size, mtime, dtype) in
    ``weights_cache_path()``, so later runs (and other ranks on the node) read nothing. Tied
    parameters appear once, under the name the model gives them.
    """
    files = checkpoint_files(path)
    digests: dict[Path, dict[str, tuple[int, str]]] = {}

    def sample(name: str, param: torch.Tensor) -> str:
        key = checkpoint_key([name], files.keys(), base_prefix)
        if key is None:
            raise ConfigError(f"{name} is not in the checkpoint at {path}")
        if not digests:
            digests.update(_file_digests(sorted(set(files.values())), dtype))
        numel, digest = digests[files[key]][key]
        if numel != param.numel():
            raise ConfigError(f"{key}: {numel} values in the checkpoint, the model has {tuple(param.shape)}")
        return digest

    return sample


def weights_cache_path() -> Path:
    """The small JSON file of cached checkpoint digests, in ``user_cache_dir()`` (``$LORIF_RAY_CACHE_DIR`` or
    ``~/.cache/lorif-ray``)."""
    return user_cache_dir() / "weights-sha256.json"


def _file_digests(files: list[Path], dtype: torch.dtype) -> dict[Path, dict[str, tuple[int, str]]]:
    """{file: {tensor: (numel, hex SHA-256 in ``dtype``)}}, from the cache where the file is unchanged.

    Processes on one node take turns (a lock next to the cache), so the ranks of a replica read a new
    checkpoint once, not once each.
    """
    import fcntl

    cache_path = weights_cache_path()
    keys = {}
    for file in files:
        stat = file.stat()
        keys[file] = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{str(dtype).removeprefix('torch.')}"
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache_path.with_name(f".{cache_path.name}.lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
    except OSError as e:  # a read-only home: no cache, every process hashes for itself
        logger.warning("no weights digest cache at %s (%s): hashing the checkpoint", cache_path, e)
        lock = None
    try:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        todo = [file for file in files if keys[file] not in cache]
        if todo:
            logger.info("hashing %d checkpoint files for the model identity (cached in %s)", len(todo), cache_path)
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo), os.cpu_count() or 1))) as pool:
                for file, table in zip(todo, pool.map(lambda f: _hash_file(f, dtype), todo)):
                    cache[keys[file]] = table
            if lock is not None:
                try:
                    kept = {k: v for k, v in cache.items() if Path(k.split("|")[0]).is_file()}  # drop deleted files
                    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
                    tmp.write_text(json.dumps(kept))
                    os.replace(tmp, cache_path)
                except OSError as e:
                    logger.warning("cannot write the weights digest cache %s: %s", cache_path, e)
    finally:
        if lock is not None:
            lock.close()
    return {file: {name: tuple(entry) for name, entry in cache[keys[file]].items()} for file in files}


def _hash_file(file: Path, dtype: torch.dtype) -> dict[str, list]:
    """{tensor: [numel, hex SHA-256 of its values cast to ``dtype``]} of one safetensors file."""
    import struct

    out = {}
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            f.seek(8 + size + start)
            raw = bytearray(end - start)
            f.readinto(raw)
            numel = (end - start) // stored.itemsize
            if stored == dtype or numel == 0:
                out[name] = [numel, hashlib.sha256(raw).hexdigest()]
            else:
                out[name] = [numel, tensor_sha256(torch.frombuffer(raw, dtype=stored).to(dtype))]
            del raw
    return out
